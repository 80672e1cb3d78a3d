#!/usr/bin/env bash
# The performance issue's checks on a GPU machine, in one run that fits a 15-minute device session
# (see the README's "Benchmarks"). Each part has its own time limit and writes to $OUT as it goes,
# so a part cut short leaves the others' figures. Most important first.
#
# Before: the built-in SmolLM2 package cannot travel, its tokenizer (3 MB) can:
#   .venv/bin/python benchmarks/shapes.py tokenizer .gpu/smollm2-tokenizer
# There, with the dependencies on PYTHONPATH (../shared/gpu/README.md):
#   bash benchmarks/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-gpu-out}
TOKENIZER=${TOKENIZER:-.gpu/smollm2-tokenizer}
SHAPED=${SHAPED:-/tmp/smollm2-shaped}
mkdir -p "$OUT"
export ALIGNKIT_NO_PROGRESS=1 TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, transformers, accelerate, trl; print(torch.__version__, transformers.__version__,
accelerate.__version__, trl.__version__)" >> "$OUT/gpu.txt" 2>&1

# 0. SmolLM2-135M's exact shape and tokenizer, random weights
timeout 60 python3 benchmarks/shapes.py model "$SHAPED" --tokenizer "$TOKENIZER" > "$OUT/shapes.txt" 2>&1

# 1. sampling at batch 64 x 128 tokens: alignkit's sampler against plain generate, dynamic and
#    static KV cache, fp32 and bf16 (the "vs fp32 plain" column is today's rollout path)
timeout 45 python3 benchmarks/generation.py --smollm2-shape --batches 64 --new-tokens 128 \
  --dtypes float32,bfloat16 --caches dynamic --repeats 1 > "$OUT/generation.txt" 2>&1
timeout 80 python3 benchmarks/generation.py --smollm2-shape --batches 64 --new-tokens 128 \
  --dtypes float32,bfloat16 --caches static --repeats 2 > "$OUT/generation-static.txt" 2>&1

# 2. PPO against TRL 1.12 in each library's recommended set-up, bf16 on CUDA, 64 prompts x 128 tokens
timeout 200 python3 benchmarks/ppo_vs_trl.py --recommended --gpu --model "$SHAPED" --prompts 64 --tokens 128 \
  --minibatch 16 --steps 4 > "$OUT/ppo-recommended.txt" 2>&1

# 3. the sampler's tests with CUDA visible (the compiled static-cache step against the dynamic cache)
timeout 60 python3 -m pytest -q -n 4 -p no:cacheprovider -W ignore tests/test_rollout.py > "$OUT/pytest.txt" 2>&1

# 4. PPO equal work (separate value model, full fine-tuning), bf16 on CUDA
timeout 120 python3 benchmarks/ppo_vs_trl.py --gpu --model "$SHAPED" --prompts 64 --tokens 128 --minibatch 16 \
  --steps 3 > "$OUT/ppo-equal.txt" 2>&1
tail -n 8 "$OUT"/*.txt
