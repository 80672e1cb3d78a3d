"""Tokens per second of alignkit's sampler against plain ``model.generate``, same distribution.

    .venv/bin/python benchmarks/generation.py                                    # CPU, tiny model
    .venv/bin/python benchmarks/generation.py --model tiny:llama-30x576 --batches 8,32 --new-tokens 64
    python benchmarks/generation.py --smollm2-shape --batches 8,32,64 --dtypes float32,bfloat16 --caches dynamic,static

Both sides sample from the full tempered softmax (top-k 0, top-p 1) from the same
random-weight model and the same left-padded prompts of ``--prompt-tokens`` tokens:
``plain`` is ``model.generate(do_sample=True)`` (transformers' multinomial draw),
``alignkit`` is :func:`alignkit.rollout.generate`'s batch sampler (one uniform per row
against the cumulative distribution, log-probs recorded). Each cell: one warm-up
batch (with a static cache on a GPU that is where the decoding step compiles), then
the median of ``--repeats`` timed batches; tokens are every row's new tokens
(``batch x new tokens``: EOS is switched off so that every row runs to the end).
Ratios are alignkit over plain in the same dtype and cache, and over plain fp32
dynamic (the default path of every recipe before this option existed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from shapes import smollm2_shaped


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny:llama")
    p.add_argument("--smollm2-shape", action="store_true", help="SmolLM2-135M's exact shape, vocabulary 49,152")
    p.add_argument("--batches", default="8,32")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--caches", default="dynamic")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from alignkit.config import GenerationConfig, ModelConfig
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.rollout import _sample

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(args.model)
    base = smollm2_shaped(49152) if args.smollm2_shape else load_causal_lm(ModelConfig(name=args.model), tokenizer=tok)
    vocab = base.config.vocab_size
    name = "SmolLM2-135M shape" if args.smollm2_shape else args.model
    print(f"{name}, {sum(p.numel() for p in base.parameters()) / 1e6:.0f}M weights, vocabulary {vocab}, "
          f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens, device {device}, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}", flush=True)

    class Tok:  # what the batch sampler reads of a tokenizer; EOS off so every row runs to the end
        eos_token_id = None
        pad_token_id = 0

    baseline = None
    print(f"{'dtype':<9} {'cache':<8} {'batch':>5} {'plain tok/s':>12} {'alignkit tok/s':>15} {'ratio':>6} "
          f"{'vs fp32 plain':>14}")
    for dtype in args.dtypes.split(","):
        model = base.to(device=device, dtype=getattr(torch, dtype)).eval()
        model.generation_config.eos_token_id = None
        for cache in args.caches.split(","):
            for b in (int(x) for x in args.batches.split(",")):
                g = torch.Generator().manual_seed(b)
                seqs = [torch.randint(3, vocab, (args.prompt_tokens,), generator=g).tolist() for _ in range(b)]
                ids = torch.tensor(seqs, device=device)
                gen = GenerationConfig(max_new_tokens=args.new_tokens, temperature=1.0, batch_size=b, cache=cache)
                extra = {"cache_implementation": "static"} if cache == "static" else {}

                def plain():
                    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                          temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                                          min_new_tokens=args.new_tokens, pad_token_id=0, **extra)

                def ours():
                    return _sample(model, Tok, seqs, [(0, i) for i in range(b)], gen, seed=b)

                rates = {}
                for label, fn in (("plain", plain), ("alignkit", ours)):
                    times = []
                    with torch.no_grad():
                        for k in range(args.repeats + 1):
                            if device.type == "cuda":
                                torch.cuda.synchronize()
                            t0 = time.perf_counter()
                            fn()
                            if device.type == "cuda":
                                torch.cuda.synchronize()
                            if k:
                                times.append(time.perf_counter() - t0)
                    rates[label] = b * args.new_tokens / statistics.median(times)
                if baseline is None or (dtype, cache) == ("float32", "dynamic"):
                    baseline = baseline or {}
                    baseline.setdefault(b, rates["plain"])
                ref = baseline.get(b, float("nan"))
                print(f"{dtype:<9} {cache:<8} {b:>5} {rates['plain']:>12.0f} {rates['alignkit']:>15.0f} "
                      f"{rates['alignkit'] / rates['plain']:>6.2f} {rates['alignkit'] / ref:>14.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
