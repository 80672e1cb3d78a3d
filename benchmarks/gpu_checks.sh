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
BUDGET=${BUDGET:-570}  # seconds for the whole script: a device command may run 600
mkdir -p "$OUT"
# part NAME LIMIT COMMAND...: run with LIMIT seconds or what is left of the budget, whichever is less
part() {
  local name=$1 limit=$2 left=$((BUDGET - SECONDS)); shift 2
  if [ "$left" -lt 30 ]; then echo "skipped: out of time" > "$OUT/$name.txt"; return; fi
  timeout $((limit < left ? limit : left)) "$@" > "$OUT/$name.txt" 2>&1
}
export ALIGNKIT_NO_PROGRESS=1 TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, transformers, accelerate, trl; print(torch.__version__, transformers.__version__,
accelerate.__version__, trl.__version__)" >> "$OUT/gpu.txt" 2>&1

# 0. SmolLM2-135M's exact shape and tokenizer, random weights
part shapes 60 python3 benchmarks/shapes.py model "$SHAPED" --tokenizer "$TOKENIZER"

# 1. sampling at batch 64 x 128 tokens: alignkit's sampler against plain generate, dynamic and
#    static KV cache, fp32 and bf16 (the "vs fp32 plain" column is today's rollout path)
part generation 45 python3 benchmarks/generation.py --smollm2-shape --batches 64 --new-tokens 128 \
  --dtypes float32,bfloat16 --caches dynamic --repeats 1
part generation-static 150 python3 benchmarks/generation.py --smollm2-shape --batches 64 --new-tokens 128 \
  --dtypes float32,bfloat16 --caches static --repeats 2

# 2. PPO against TRL 1.12 in each library's recommended set-up, bf16 on CUDA, 64 prompts x 128 tokens
part ppo-recommended 240 python3 benchmarks/ppo_vs_trl.py --recommended --gpu --model "$SHAPED" --prompts 64 \
  --tokens 128 --minibatch 16 --steps 4

# 3. the sampler's tests with CUDA visible (the compiled static-cache step against the dynamic cache)
part pytest 60 python3 -m pytest -q -n 4 -p no:cacheprovider -W ignore tests/test_rollout.py

# 4. GRPO against the current TRL (16 prompts x 4 answers of 128 tokens), alignkit sampling from its
#    bf16 copy with a static cache; then PPO with equal work (separate value model, full fine-tuning)
part grpo 120 python3 benchmarks/compare.py --gpu --model "$SHAPED" --parts grpo-bf16 --steps 5
part ppo-equal 120 python3 benchmarks/ppo_vs_trl.py --gpu --model "$SHAPED" --prompts 64 --tokens 128 \
  --minibatch 16 --steps 3
tail -n 8 "$OUT"/*.txt
