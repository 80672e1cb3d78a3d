"""alignkit sft: response-only loss, packing, LoRA/merged outputs, resume, located errors."""

from pathlib import Path

import pytest
import torch

from alignkit import cli
from alignkit.config import ModelConfig, load_config
from alignkit.data.collate import encode_example, shift_for_lm
from alignkit.data.formats import SFTExample
from alignkit.losses import sft_loss
from alignkit.models import load_causal_lm
from alignkit.recipes import sft
from alignkit.runs import read_metrics
from alignkit.training import Engine

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DATA = Path(__file__).resolve().parent / "data"
TINY = str(CONFIGS / "sft-tiny.yaml")


def user(text):
    return [{"role": "user", "content": text}]


EXAMPLES = [
    SFTExample(user("How do I boil an egg?"), "Put it in boiling water for nine minutes.", "mem:1"),
    SFTExample(user("Name a colour."), "Red.", "mem:2"),
    SFTExample(user("Say hello politely, please."), "Hello! It is nice to meet you.", "mem:3"),
    SFTExample([{"role": "system", "content": "Be brief."}, *user("Why is the sky blue?")],
               "Air scatters blue light the most.", "mem:4"),
]


@pytest.fixture(scope="module")
def tiny_lm(tiny_tokenizer):
    return load_causal_lm(ModelConfig(name="tiny:llama"), tokenizer=tiny_tokenizer).eval()


def test_mask_covers_response_and_eos_only(tiny_tokenizer):
    enc = sft.encode_all(tiny_tokenizer, EXAMPLES[:2], max_length=256, on_error="raise")
    inputs, mask = sft.make_batch(enc, tiny_tokenizer.pad_token_id)
    for row, e in enumerate(enc):
        n = len(e.input_ids)
        assert mask[row, :e.prompt_len].sum() == 0
        assert mask[row, e.prompt_len:n].all()
        assert not mask[row, n:].any()  # padding
        assert inputs["input_ids"][row, n - 1] == tiny_tokenizer.eos_token_id  # learns to stop
    response = tiny_tokenizer.decode(inputs["input_ids"][0][mask[0]], skip_special_tokens=True)
    assert response == EXAMPLES[0].completion


def test_changing_a_prompt_label_leaves_the_loss_unchanged(tiny_lm, tiny_tokenizer):
    enc = sft.encode_all(tiny_tokenizer, EXAMPLES[:2], max_length=256, on_error="raise")
    inputs, response_mask = sft.make_batch(enc, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        logits = tiny_lm(**inputs).logits[:, :-1]
    labels, mask = shift_for_lm(inputs["input_ids"], response_mask)
    base, _ = sft_loss(logits, labels, mask)

    prompt_pos = enc[0].prompt_len - 2  # label index of a prompt token
    changed = labels.clone()
    changed[0, prompt_pos] = (changed[0, prompt_pos] + 7) % len(tiny_tokenizer)
    assert torch.equal(sft_loss(logits, changed, mask)[0], base)

    response_pos = enc[0].prompt_len  # label index of the second response token
    changed = labels.clone()
    changed[0, response_pos] = (changed[0, response_pos] + 7) % len(tiny_tokenizer)
    assert not torch.isclose(sft_loss(logits, changed, mask)[0], base)


def test_packing_keeps_examples_apart(tiny_lm, tiny_tokenizer):
    enc = sft.encode_all(tiny_tokenizer, EXAMPLES, max_length=96, on_error="raise")
    rows = sft.pack(enc, max_length=96)
    assert 1 < len(rows) < len(enc)  # some rows hold several examples
    assert all(len(r.input_ids) <= 96 for r in rows)
    segments = []  # split rows where the position ids restart: whole examples, none lost or cut
    for r in rows:
        starts = [i for i, p in enumerate(r.position_ids) if p == 0] + [len(r.input_ids)]
        segments += [tuple(r.input_ids[a:b]) for a, b in zip(starts, starts[1:])]
    assert sorted(segments) == sorted(tuple(e.input_ids) for e in enc)
    # Position ids restart per example, so attention stays within each example:
    # the held-out NLL of packed rows equals that of one example per row.
    unpacked = sft.evaluate(tiny_lm, enc, tiny_tokenizer.pad_token_id, batch_size=4)
    packed = sft.evaluate(tiny_lm, rows, tiny_tokenizer.pad_token_id, batch_size=4)
    assert packed["eval_tokens"] == unpacked["eval_tokens"]
    assert packed["eval_loss"] == pytest.approx(unpacked["eval_loss"], abs=1e-5)


def test_cli_lora_output_loads_merged_and_as_peft_adapter(tmp_path, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rc = cli.main(["sft", "--config", TINY, f"run.output_dir={tmp_path}", "model.lora.enabled=true",
                   "model.lora.r=4", "packing=true"])
    assert rc == 0
    run = tmp_path / "tiny" / "sft"
    final = run / "final"
    assert (run / "DONE").exists() and (final / "adapter" / "adapter_config.json").exists()
    rows = read_metrics(run)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert rows[-1]["eval_perplexity"] == pytest.approx(torch.tensor(rows[-1]["eval_loss"]).exp().item(), rel=1e-5)

    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    base = load_causal_lm(ModelConfig(name="tiny:llama"), tokenizer=tiny_tokenizer)
    adapted = PeftModel.from_pretrained(base, final / "adapter").eval()
    ids = torch.tensor([encode_example(tiny_tokenizer, EXAMPLES[0].prompt, EXAMPLES[0].completion, 256).input_ids])
    with torch.no_grad():
        a, b = merged(ids).logits, adapted(ids).logits
        with adapted.disable_adapter():
            untouched = adapted(ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, untouched, atol=1e-4)  # the adapter learned something


def test_resume_after_interruption_gives_the_same_curve(tmp_path, monkeypatch):
    args = ["sft", "--config", TINY, "train.save_every=2", "train.max_steps=4", "train.eval_every=2"]
    assert cli.main(args + [f"run.output_dir={tmp_path / 'straight'}"]) == 0
    straight = read_metrics(tmp_path / "straight" / "tiny" / "sft")

    # Die during step 4: after the step-2 checkpoint and the step-3 log line.
    calls = {"n": 0}
    real_step = Engine.step

    def dying_step(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(*a, **kw)

    broken = tmp_path / "broken"
    monkeypatch.setattr(Engine, "step", dying_step)
    assert cli.main(args + [f"run.output_dir={broken}"]) == 130
    monkeypatch.setattr(Engine, "step", real_step)
    assert [r["step"] for r in read_metrics(broken / "tiny" / "sft")] == [1, 2, 3]
    assert cli.main(args + [f"run.output_dir={broken}", "--resume"]) == 0
    resumed = read_metrics(broken / "tiny" / "sft")

    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        for key in ("loss", "eval_loss", "grad_norm"):
            assert (key in a) == (key in b)
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-6)


def test_grad_accumulation_1x4_equals_4x1_through_train_sft(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    # Plain SGD with lr 1 makes the weight change equal the (clipped) gradient; Adam's
    # first step, g / (|g| + eps), would magnify float noise in near-zero entries.
    monkeypatch.setattr(sft, "build_optimizer", lambda params, train: torch.optim.SGD(params, lr=1.0))
    cfg = load_config(sft.Config, TINY, ["train.max_steps=1", "train.save_every=0", "train.max_grad_norm=1e6"])
    weights = {}
    for batch, accum in ((4, 1), (1, 4)):
        cfg.train.batch_size, cfg.train.grad_accum = batch, accum
        final = sft.train_sft(cfg, EXAMPLES, tmp_path / f"{batch}x{accum}")  # the API other recipes call
        assert final == tmp_path / f"{batch}x{accum}" / "final"
        weights[batch] = load_file(final / "model.safetensors")
    # Short and long examples weigh per token in both, so one step moves the weights alike.
    initial = load_causal_lm(ModelConfig(name="tiny:llama")).state_dict()
    moved = 0
    for name, w in weights[4].items():
        assert torch.allclose(w, weights[1][name], atol=1e-6), name
        moved += not torch.equal(w, initial[name])
    assert moved > 0


def test_too_long_example_is_a_located_one_line_error(tmp_path, capsys):
    rc = cli.main(["sft", "--config", TINY, f"run.output_dir={tmp_path}", f"data.path={DATA / 'sft.jsonl'}",
                   "data.eval_fraction=0",
                   "data.max_length=16"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "sft.jsonl:line 1: field 'completion'" in err and "data.max_length=16" in err


def test_shipped_sft_and_rm_configs_load():
    from alignkit.recipes import rm

    found = sorted(CONFIGS.glob("sft*.yaml")) + sorted(CONFIGS.glob("rm*.yaml"))
    assert len(found) >= 4
    for path in found:
        cfg = load_config(sft.Config if path.name.startswith("sft") else rm.Config, path)
        assert cfg.data.path and cfg.run.name
