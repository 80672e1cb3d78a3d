#!/usr/bin/env bash
# The checks the engine and performance issues ask for on a GPU machine, in one run that fits a
# 15-minute device session (see the README's "Many GPUs and many machines"). Each part has its own
# time limit and writes to $OUT as it goes, so a part cut short leaves the others' figures.
#   bash benchmarks/gpu_checks.sh            # on the GPU machine, dependencies on PYTHONPATH
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export ALIGNKIT_NO_PROGRESS=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)" >> "$OUT/gpu.txt" 2>&1

# 1. every training recipe on a model of SmolLM2-135M's depth and width, fp32 and bf16 autocast
timeout 150 python3 benchmarks/precision.py --model tiny:llama-30x576 --steps 5 --json "$OUT/precision.json" \
  > "$OUT/precision.txt" 2>&1

# 2. the test suite with CUDA visible (the 2-process tests are CPU tests: they skip themselves here)
timeout 150 python3 -m pytest -q -n 12 -p no:cacheprovider -W ignore tests > "$OUT/pytest.txt" 2>&1

# 3. sampling: alignkit's sampler against plain generate, dynamic and static KV cache, fp32 and bf16
timeout 60 python3 benchmarks/generation.py --smollm2-shape --batches 8,32,64 --new-tokens 128 \
  --dtypes float32,bfloat16 --caches dynamic --repeats 1 > "$OUT/generation.txt" 2>&1
timeout 80 python3 benchmarks/generation.py --smollm2-shape --batches 64 --new-tokens 128 \
  --dtypes float32,bfloat16 --caches static --repeats 2 > "$OUT/generation-static.txt" 2>&1
tail -n 3 "$OUT"/*.txt
