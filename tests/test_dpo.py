"""alignkit dpo end to end on a tiny model: learning, the reference cache, resume, every loss type, bad input.

The loss math itself is tested in test_losses.py; here the recipe around it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alignkit.cli import main as alignkit
from alignkit.config import load_config
from alignkit.data.synthetic import kto_records, polite_vs_rude_pairs
from alignkit.runs import read_metrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = str(CONFIGS / "dpo-tiny.yaml")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # A 64-wide model gains nothing from intra-op threads, and on a shared
    # 2-core machine two OpenMP threads per process spin and run several times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dpo(tmp: Path, *overrides: str, resume: bool = False) -> int:
    args = ["dpo", "--config", TINY, f"run.output_dir={tmp / 'runs'}", *overrides]
    return alignkit(args + (["--resume"] if resume else []))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One DPO run on 400 synthetic pairs, 100 of them held out; 24 steps of 16 pairs."""
    tmp = tmp_path_factory.mktemp("dpo")
    data = write_jsonl(tmp / "pairs.jsonl", polite_vs_rude_pairs(400, seed=3))
    rc = dpo(tmp, f"data.path={data}", "data.eval_fraction=0.25", "train.max_steps=24", "train.log_every=1",
             "train.eval_every=12", "train.save_every=12")
    assert rc == 0
    return tmp, data, tmp / "runs" / "tiny" / "dpo"


def test_dpo_starts_at_log2_and_learns_the_held_out_preference(trained):
    _, _, run = trained
    rows = read_metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    # Step 1's loss is measured before any update: policy == reference, so every
    # pair gives -log sigmoid(0) = log 2, and no implicit reward beats another.
    assert train_rows[0]["step"] == 1
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert train_rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-3)
    evals = [r for r in rows if "eval_reward_accuracy" in r]
    assert [r["step"] for r in evals] == [12, 24]
    # Chance is 0.5; 24 steps on a random 2-layer model get well above it.
    assert evals[-1]["eval_reward_accuracy"] >= 0.75
    assert evals[-1]["eval_chosen_reward"] > evals[-1]["eval_rejected_reward"]
    assert train_rows[-1]["loss"] < math.log(2) - 0.1
    done = json.loads((run / "DONE").read_text())
    assert done["eval_reward_accuracy"] == evals[-1]["eval_reward_accuracy"]
    assert (run / "final" / "model.safetensors").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000012", "step-000024"]


def test_cached_reference_logps_equal_a_fresh_computation(trained, tiny_tokenizer):
    from safetensors.torch import load_file

    from alignkit.models import load_causal_lm
    from alignkit.recipes.dpo import Config, load_examples

    tmp, data, run = trained
    cfg = load_config(Config, TINY, [f"data.path={data}", "data.eval_fraction=0.25"])
    train, held = load_examples(cfg, tiny_tokenizer)
    cache = load_file(str(run / "ref_logps.safetensors"))
    assert cache["train.a"].shape == (len(train),) and cache["eval.b"].shape == (len(held),)
    model = load_causal_lm(cfg.model, trainable=False, tokenizer=tiny_tokenizer)  # the initial weights

    def fresh(enc) -> float:
        # One sequence alone (no padding), plain log_softmax: log p of response tokens, summed.
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
        return float(picked[enc.prompt_len - 1:].sum())

    for split, examples in (("train", train), ("eval", held)):
        for i in (0, 7, len(examples) - 1):
            assert cache[f"{split}.a"][i].item() == pytest.approx(fresh(examples[i].a), abs=1e-3)
            assert cache[f"{split}.b"][i].item() == pytest.approx(fresh(examples[i].b), abs=1e-3)
    # chosen and rejected differ, so a swapped or shifted index could not pass the checks above
    assert not torch.allclose(cache["train.a"], cache["train.b"])


def test_resume_reuses_the_reference_cache_and_continues_the_same_curve(trained, monkeypatch):
    import shutil

    import alignkit.recipes.dpo as recipe

    tmp, data, run = trained
    before = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    # Pretend the run died after the step-12 checkpoint.
    shutil.rmtree(run / "checkpoints" / "step-000024")
    shutil.rmtree(run / "final")
    (run / "DONE").unlink()

    def no_recompute(*a, **k):
        raise AssertionError("the reference was recomputed on resume")

    monkeypatch.setattr(recipe, "compute_reference_logps", no_recompute)
    assert dpo(tmp, f"data.path={data}", "data.eval_fraction=0.25", "train.max_steps=24", "train.log_every=1",
               "train.eval_every=12", "train.save_every=12", resume=True) == 0
    after = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    assert sorted(after) == list(range(1, 25))
    for step in (13, 18, 24):  # the same batches from the same weights and optimizer state
        assert after[step]["loss"] == pytest.approx(before[step]["loss"], rel=1e-4, abs=1e-6)
    assert (run / "DONE").exists()


@pytest.mark.parametrize("loss_type,extra,first_loss", [
    # policy == reference at step 1, so h = 0:
    # IPO: (h - 1/(2 beta))^2 = (0 - 1/(2*0.5))^2 = 1; on mean token log-probs,
    # as IPO is usually run (summed ones overshoot the target of 1 at this rate)
    ("ipo", ["loss.average_logprobs=true"], 1.0),
    # conservative DPO: -(1 - 0.2) log sigmoid(0) - 0.2 log sigmoid(0) = log 2 still
    ("dpo", ["loss.label_smoothing=0.2"], math.log(2)),
    # LoRA: the cached reference is the base with the adapter off, and the adapter
    # starts at zero (B = 0), so step 1 is at log 2 again
    ("dpo", ["model.lora.enabled=true", "model.lora.r=4", "train.learning_rate=1e-2"], math.log(2)),
    # KTO: log ratio 0, z0 = max(0, 0) = 0, each example 1 - sigmoid(0) = 0.5 (weights 1)
    ("kto", [], 0.5),
    # SimPO has no reference: its first loss depends on the random model
    ("simpo", ["loss.simpo_gamma=0.5"], None),
])
def test_each_loss_type_runs_and_improves(tmp_path, loss_type, extra, first_loss):
    rows = polite_vs_rude_pairs(96, seed=5)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert dpo(tmp_path, f"data.path={data}", f"loss.type={loss_type}", "loss.beta=0.5", "train.max_steps=8",
               "train.log_every=1", "data.eval_fraction=0.0", *extra) == 0
    run = tmp_path / "runs" / "tiny" / "dpo"
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    if first_loss is not None:
        assert losses[0] == pytest.approx(first_loss, abs=1e-4)
    assert sum(losses[-3:]) / 3 < losses[0]
    assert (run / "ref_logps.safetensors").exists() == (loss_type != "simpo")
    assert (run / "final" / "adapter").exists() == ("model.lora.enabled=true" in extra)


def test_kto_reads_unpaired_records_and_dpo_refuses_them(tmp_path, capsys):
    data = write_jsonl(tmp_path / "kto.jsonl", kto_records(40, seed=1))
    assert dpo(tmp_path, f"data.path={data}", "loss.type=kto", "train.max_steps=2", "data.eval_fraction=0") == 0
    metrics = [r for r in read_metrics(tmp_path / "runs" / "tiny" / "dpo") if "loss" in r]
    assert metrics[0]["desirable_count"] + metrics[0]["undesirable_count"] == 16
    assert dpo(tmp_path, f"data.path={data}", "run.name=x", "train.max_steps=2") == 2
    assert "need loss.type=kto" in capsys.readouterr().err


def test_kto_mismatched_completions_come_from_other_prompts():
    from alignkit.data.formats import KTOExample
    from alignkit.recipes.dpo import _other_prompt, _unpair

    a, b = [{"role": "user", "content": "A?"}], [{"role": "user", "content": "B?"}]
    pairs = _unpair([KTOExample(a, "good a", True), KTOExample(a, "bad a", False),
                     KTOExample(b, "good b", True), KTOExample(b, "bad b", False)])
    # neighbours 0/1 and 2/3 share a prompt, so the partner skips to the next prompt
    assert [_other_prompt(pairs, i) for i in range(4)] == [2, 2, 0, 0]


def test_bad_input_is_one_located_line(tmp_path, capsys):
    rows = polite_vs_rude_pairs(6, seed=0)
    rows[3]["rejected"] = "word " * 400
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    assert dpo(tmp_path, f"data.path={data}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alignkit: error:") and len(err.splitlines()) == 1
    assert "long.jsonl:line 4: field 'rejected'" in err and "data.max_length=256" in err
    # with on_error=skip the long pair is dropped and counted, the rest trains
    assert dpo(tmp_path, f"data.path={data}", "data.on_error=skip", "train.max_steps=1", "data.eval_fraction=0") == 0
    assert "skipped 1 of 6" in capsys.readouterr().out
    assert dpo(tmp_path, f"data.path={data}", "loss.label_smoothing=0.7") == 2
    assert "'loss.label_smoothing' must be < 0.5" in capsys.readouterr().err


def test_shipped_dpo_configs_load():
    from alignkit.recipes.dpo import Config

    paths = sorted(CONFIGS.glob("dpo*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        cfg = load_config(Config, path)
        assert cfg.loss.type in ("dpo", "ipo", "simpo", "kto")


def test_sequence_logps_in_length_sorted_chunks_equal_one_padded_batch(monkeypatch):
    # Chunks padded to their own longest row give each sequence the log-prob one batch padded
    # to the longest of all gives, back in example order, with gradients to the same weights.
    from alignkit.config import ModelConfig
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.recipes import dpo as recipe

    tok = load_tokenizer("tiny:llama")
    cfg = load_config(recipe.Config, TINY, ["data.eval_fraction=0"])
    examples, _ = recipe.load_examples(cfg, tok)
    examples = examples[:5]
    assert len({len(e.a.input_ids) for e in examples} | {len(e.b.input_ids) for e in examples}) > 2
    model = load_causal_lm(ModelConfig(name="tiny:llama", seed=1), tokenizer=tok)
    results = {}
    for chunk in (100, 3):
        monkeypatch.setattr(recipe, "FORWARD_CHUNK", chunk)
        model.zero_grad()
        out = recipe.sequence_logps(model, examples, tok.pad_token_id)
        (out.a.sum() - 2 * out.b.sum()).backward()
        results[chunk] = (out, model.model.embed_tokens.weight.grad.clone())
    whole, chunked = results[100][0], results[3][0]
    for key in ("a", "b", "len_a", "len_b"):
        torch.testing.assert_close(getattr(chunked, key), getattr(whole, key), atol=1e-5, rtol=1e-6)  # sums ~300
    torch.testing.assert_close(results[3][1], results[100][1], atol=1e-5, rtol=1e-4)
    # and they are each sequence's own: example 0's a-side scored alone
    alone = recipe.sequence_logps(model, examples[:1], tok.pad_token_id)
    torch.testing.assert_close(alone.a, whole.a[:1], atol=1e-5, rtol=1e-6)


def test_the_lm_head_runs_only_where_a_response_token_is_predicted(tiny_tokenizer):
    # Row 0: a 5-token prompt and 3 response tokens (ids 5-7); row 1: 8 + 4 (ids 8-11). Token t+1 is
    # predicted at position t, so the first position any row needs is 4: the head runs on positions
    # 4..11 (8 of 12), and the log-probs are those of the whole forward.
    from alignkit.config import ModelConfig
    from alignkit.data.collate import response_logits
    from alignkit.losses import sequence_logprobs, token_logprobs
    from alignkit.models import load_causal_lm

    model = load_causal_lm(ModelConfig(name="tiny:llama", seed=3), tokenizer=tiny_tokenizer)
    widths = []
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[1]))
    ids = torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    attention = torch.tensor([[1] * 8 + [0] * 4, [1] * 12]).bool()
    response = torch.zeros(2, 12, dtype=torch.bool)
    response[0, 5:8], response[1, 8:12] = True, True
    inputs = {"input_ids": ids, "attention_mask": attention}
    logits, labels, mask = response_logits(model, inputs, response)
    assert widths == [8] and logits.shape[:2] == (2, 7)  # positions 4..10 predict tokens 5..11
    torch.testing.assert_close(labels, ids[:, 5:])
    torch.testing.assert_close(mask, response[:, 5:])
    full = model(**inputs).logits[:, :-1]
    torch.testing.assert_close(sequence_logprobs(token_logprobs(logits, labels), mask),
                               sequence_logprobs(token_logprobs(full, ids[:, 1:]), response[:, 1:]))
    # no response token anywhere: the whole width, as before
    widths.clear()
    logits, labels, mask = response_logits(model, inputs, torch.zeros_like(response))
    assert widths == [12] and logits.shape[1] == 11 and not mask.any()


def test_chosen_and_rejected_run_their_shared_prompt_once_with_the_same_log_probs(monkeypatch, forward_tokens):
    # Examples 0-3 share their prompt between chosen and rejected; example 4's rejected gets another
    # prompt (as truncation can make it), so it runs as two whole sequences. The log-probs, lengths and
    # gradients are those of every sequence run whole; the model sees each shared prompt once.
    from alignkit.config import ModelConfig
    from alignkit.data.collate import Encoded
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.recipes import dpo as recipe

    tok = load_tokenizer("tiny:llama")
    cfg = load_config(recipe.Config, TINY, ["data.eval_fraction=0"])
    examples, _ = recipe.load_examples(cfg, tok)
    examples = examples[:5]
    other = examples[4].b
    examples[4] = recipe.Example(examples[4].a, Encoded([7, 8, 9] + other.input_ids[other.prompt_len:], 3))
    assert [recipe._same_prompt(e) for e in examples] == [True] * 4 + [False]
    model = load_causal_lm(ModelConfig(name="tiny:llama", seed=1), tokenizer=tok)
    tokens = forward_tokens(model)
    results = {}
    for share in (True, False):
        monkeypatch.setattr(recipe, "can_share_prefixes", lambda m: share)
        model.zero_grad()
        tokens.clear()
        out = recipe.sequence_logps(model, examples, tok.pad_token_id)
        (out.a.sum() - 2 * out.b.sum()).backward()
        results[share] = (out, model.model.embed_tokens.weight.grad.clone(), sum(tokens))
    (shared, grad, run), (whole, whole_grad, whole_run) = results[True], results[False]
    for key in ("a", "b", "len_a", "len_b"):
        torch.testing.assert_close(getattr(shared, key), getattr(whole, key), atol=1e-4, rtol=1e-6)  # sums ~300
    torch.testing.assert_close(grad, whole_grad, atol=1e-4, rtol=1e-4)
    # a response's length is its tokens: the sequence minus its prompt
    assert shared.len_a.tolist() == [len(e.a.input_ids) - e.a.prompt_len for e in examples]
    # each shared prompt but its last token once, then every answer after that token (whose logits
    # predict the answer's first); example 4's two sequences whole
    prompts = sum(e.a.prompt_len for e in examples[:4])
    answers = sum(len(s.input_ids) - s.prompt_len for e in examples[:4] for s in (e.a, e.b))
    assert run == (prompts - 4) + (8 + answers) + len(examples[4].a.input_ids) + len(examples[4].b.input_ids)
    assert whole_run == sum(len(s.input_ids) for e in examples for s in (e.a, e.b)) == run + prompts - 4
    # under gradient checkpointing transformers gives no cache in training: whole sequences
    from alignkit.shared_prefix import can_share_prefixes
    from alignkit.training import enable_gradient_checkpointing

    assert can_share_prefixes(model)
    enable_gradient_checkpointing(model)
    assert not can_share_prefixes(model)
