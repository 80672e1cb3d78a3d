"""Each model source loads; LoRA's reference shares the base weights; dropout is off in RL."""

import os
from pathlib import Path

import pytest
import torch

from alignkit.config import LoraConfig, ModelConfig
from alignkit.errors import AlignkitError
from alignkit.models import (
    MINILM, SMOLLM2, adapter_disabled, count_storage, load_causal_lm, load_sequence_scorer, load_tokenizer,
    resolve, save_model)


def logits_of(model, tok, text="hello there, how are you?"):
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def test_tiny_models_are_seeded_and_small(tiny_tokenizer):
    a = load_causal_lm(ModelConfig(name="tiny:llama", seed=1), tokenizer=tiny_tokenizer)
    b = load_causal_lm(ModelConfig(name="tiny:llama", seed=1), tokenizer=tiny_tokenizer)
    c = load_causal_lm(ModelConfig(name="tiny:llama", seed=2), tokenizer=tiny_tokenizer)
    assert torch.equal(logits_of(a, tiny_tokenizer), logits_of(b, tiny_tokenizer))
    assert not torch.equal(logits_of(a, tiny_tokenizer), logits_of(c, tiny_tokenizer))
    big = load_causal_lm(ModelConfig(name="tiny:llama-3x32"), tokenizer=tiny_tokenizer)
    assert big.config.num_hidden_layers == 3 and big.config.hidden_size == 32
    assert sum(p.numel() for p in a.parameters()) < 500_000
    # a real tokenizer: chat template, pad distinct from EOS
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    assert "<|im_start|>assistant" in tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    with pytest.raises(AlignkitError, match="unknown tiny model"):
        load_causal_lm(ModelConfig(name="tiny:gpt"), tokenizer=tiny_tokenizer)


def test_local_folder_round_trip(tmp_path, tiny_tokenizer):
    model = load_causal_lm(ModelConfig(name="tiny:llama"), tokenizer=tiny_tokenizer)
    save_model(model, tiny_tokenizer, tmp_path / "m")
    again = load_causal_lm(ModelConfig(name=str(tmp_path / "m")), trainable=False)
    tok = load_tokenizer(str(tmp_path / "m"))
    assert tok.pad_token_id == tiny_tokenizer.pad_token_id
    assert torch.allclose(logits_of(model, tiny_tokenizer), logits_of(again, tok))
    assert not any(p.requires_grad for p in again.parameters())


def test_unknown_names_give_clear_errors(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AlignkitError, match="cannot load model 'no-such-org/no-such-model'"):
        load_causal_lm(ModelConfig(name="no-such-org/no-such-model"))
    with pytest.raises(AlignkitError, match="unknown built-in model"):
        resolve("builtin:gpt5")


def test_lora_reference_shares_base_weights(tiny_tokenizer):
    base_logits = logits_of(load_causal_lm(ModelConfig(name="tiny:llama"), tokenizer=tiny_tokenizer), tiny_tokenizer)
    base_bytes = count_storage(load_causal_lm(ModelConfig(name="tiny:llama"), tokenizer=tiny_tokenizer))
    policy = load_causal_lm(ModelConfig(name="tiny:llama", lora=LoraConfig(enabled=True, r=4, dropout=0.1)),
                            tokenizer=tiny_tokenizer, rl=True)
    # only the adapter adds storage: no second copy of the base weights
    lora_bytes = sum(p.numel() * p.element_size() for n, p in policy.named_parameters() if "lora_" in n)
    assert count_storage(policy) == base_bytes + lora_bytes
    assert lora_bytes < 0.2 * base_bytes
    # train the adapter a little so that policy and reference differ
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    assert not torch.allclose(logits_of(policy, tiny_tokenizer), base_logits)
    with adapter_disabled(policy) as ref:
        assert ref is policy  # the same module, adapter switched off
        assert torch.allclose(logits_of(ref, tiny_tokenizer), base_logits, atol=1e-6)
    assert not torch.allclose(logits_of(policy, tiny_tokenizer), base_logits)
    # rl=True forces every dropout (LoRA's included) to 0
    drops = [m for m in policy.modules() if isinstance(m, torch.nn.Dropout)]
    assert all(m.p == 0.0 for m in drops)
    assert policy.peft_config["default"].lora_dropout == 0.0  # asked for 0.1, forced off
    assert policy.config.attention_dropout == 0.0


def test_sequence_scorer_reads_last_non_pad_token(tiny_tokenizer):
    rm = load_sequence_scorer(ModelConfig(name="tiny:llama"), tokenizer=tiny_tokenizer)
    tok = tiny_tokenizer
    short = tok("a short text", return_tensors="pt")
    batch = tok(["a short text", "a much longer text than the first one"], return_tensors="pt", padding=True)
    with torch.no_grad():
        alone = rm(**short).logits[0, 0]
        padded = rm(**batch).logits[0, 0]
    assert rm.config.num_labels == 1
    assert torch.allclose(alone, padded, atol=1e-5)  # right padding does not move the score


def test_builtin_minilm_encoder_as_reward_backbone():
    rm = load_sequence_scorer(ModelConfig(name=MINILM))
    tok = load_tokenizer(MINILM, padding_side="right")
    out = rm(**tok(["good answer", "bad answer"], ["q", "q"], return_tensors="pt", padding=True))
    assert out.logits.shape == (2, 1)
    assert type(rm).__name__ == "BertForSequenceClassification"
    assert Path(resolve(MINILM), "model.safetensors").exists()


def test_builtin_smollm2_converts_once_and_chats():
    folder = Path(resolve(SMOLLM2))  # the first call converts the GGUF (~30 s); later calls are instant
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    tok = load_tokenizer(SMOLLM2)
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    model = load_causal_lm(ModelConfig(name=SMOLLM2), trainable=False, tokenizer=tok)
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    from alignkit.config import GenerationConfig
    from alignkit.rollout import generate

    (g,) = generate(model, tok, [[{"role": "user", "content": "What is the capital of France?"}]],
                    GenerationConfig(max_new_tokens=12, do_sample=False))
    assert "Paris" in g.text
