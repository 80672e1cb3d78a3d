"""Random-weight models of SmolLM2-135M's exact shape, for machines the built-in weights cannot reach.

    .venv/bin/python benchmarks/shapes.py tokenizer .gpu/smollm2-tokenizer     # here: 3 MB that can travel
    python3 benchmarks/shapes.py model /tmp/smollm2-shaped --tokenizer .gpu/smollm2-tokenizer   # there

The built-in SmolLM2 package (93 MB) is too large to carry to a GPU machine, but its
tokenizer is not: ``tokenizer`` writes it (with the chat template) to a folder, and
``model`` writes a folder that transformers, alignkit (``model.name=FOLDER``) and TRL
all load: SmolLM2-135M's depth, width, heads and vocabulary with seeded random
weights, and that tokenizer. What a step costs depends on the shape, not the weights;
random weights sample near-uniformly over 49,152 tokens, so EOS is rare and responses
run to their length limit.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048)


def smollm2_shaped(vocab: int = 49152, seed: int = 0, **special_tokens):
    """A ``LlamaForCausalLM`` of SmolLM2-135M's shape with seeded random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **SMOLLM2_SHAPE, **special_tokens))


def write_tokenizer(out: Path) -> None:
    """The built-in SmolLM2's tokenizer and chat template, as alignkit loads it, into ``out``."""
    from alignkit.models import SMOLLM2, load_tokenizer

    load_tokenizer(SMOLLM2).save_pretrained(out)


def write_model(out: Path, tokenizer: Path) -> None:
    """A folder with a SmolLM2-shaped random model and the tokenizer in ``tokenizer``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    model = smollm2_shaped(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("tokenizer", help="write the built-in SmolLM2 tokenizer").add_argument("out", type=Path)
    m = sub.add_parser("model", help="write a SmolLM2-shaped random model with a tokenizer")
    m.add_argument("out", type=Path)
    m.add_argument("--tokenizer", type=Path, required=True, help="a folder written by `shapes.py tokenizer`")
    args = p.parse_args()
    if args.what == "tokenizer":
        write_tokenizer(args.out)
    else:
        write_model(args.out, args.tokenizer)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
