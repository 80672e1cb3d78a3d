"""The training engine in one process: mixed precision, loss scaling, gradient checkpointing,
non-finite steps, where every model of a stage lives, and the final save of a sharded model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from alignkit import cli
from alignkit.config import ModelConfig, TrainConfig, load_config
from alignkit.data.collate import encode_example
from alignkit.errors import ConfigError
from alignkit.models import load_causal_lm
from alignkit.recipes import sft
from alignkit.runs import read_metrics
from alignkit.training import Engine, build_optimizer, build_scheduler, share_of, trainable_parameters

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_SFT = str(CONFIGS / "sft-tiny.yaml")
PROMPT = [{"role": "user", "content": "How do I boil an egg?"}]


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(tok):
    enc = encode_example(tok, PROMPT, "Put it in boiling water for nine minutes.", 256)
    ids = torch.tensor([enc.input_ids])
    return ids, torch.tensor([enc.response_mask])


def _nll(model, ids, mask):
    device = next(model.parameters()).device  # the engine's (a GPU where there is one)
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()


# --------------------------------------------------------------------------- shares of a micro-batch


def test_shares_cover_the_batch_in_order_and_differ_by_at_most_one():
    for n in range(0, 9):
        items = list(range(n))
        shares = [share_of(items, i, 3) for i in range(3)]
        assert sum(shares, []) == items  # contiguous, in order: gathering restores the batch
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


# --------------------------------------------------------------------------- mixed precision


def test_bf16_autocasts_the_forward_and_keeps_fp32_master_weights_and_optimizer_state(tiny_tokenizer):
    engine = Engine("bf16")
    model = load_causal_lm(ModelConfig(name="tiny:llama"), tokenizer=tiny_tokenizer)
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    train = TrainConfig(learning_rate=1e-3)
    opt = build_optimizer(trainable_parameters(model), train)
    model, opt, sched = engine.prepare(model, opt, build_scheduler(opt, train), train)
    ids, mask = _batch(tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in engine.unwrap(model).named_parameters()}
    for step in (1, 2):
        engine.backward(_nll(model, ids, mask))
        engine.step(model, opt, sched, train, step)
    assert seen == [torch.bfloat16, torch.bfloat16]  # the matmuls ran in bf16...
    params = dict(engine.unwrap(model).named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float32}  # ...the weights stay fp32 masters
    state = [v for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    assert state and {v.dtype for v in state} == {torch.float32}  # Adam's moments too
    # a step of 1e-3 on fp32 weights survives; in bf16 weights (8 mantissa bits) most would round away
    moved = params["model.layers.0.mlp.down_proj.weight"] - before["model.layers.0.mlp.down_proj.weight"]
    assert (moved.abs() > 0).float().mean() > 0.9


def test_bf16_loss_curve_stays_within_bf16_rounding_of_fp32(tmp_path):
    # bf16 keeps 8 mantissa bits: each activation is off by at most 2^-9 relative (0.2%).
    # The loss is a mean over ~450 response tokens of log-softmax values computed from such
    # activations (in fp32: the engine up-casts logits), so its error stays within that bound;
    # 0.2% of a loss of ~6.9 is 0.014. A bf16 *weight* cast would drift further every step.
    curves = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        assert cli.main(["sft", "--config", TINY_SFT, f"run.output_dir={out}",
                         f"train.mixed_precision={precision}"]) == 0
        curves[precision] = [r["loss"] for r in read_metrics(out / "tiny" / "sft")]
    assert len(curves["no"]) == len(curves["bf16"]) == 6
    assert curves["bf16"] != curves["no"]  # it did run in another precision
    for a, b in zip(curves["no"], curves["bf16"]):
        assert abs(a - b) <= 2 ** -9 * a


def test_fp16_scales_the_loss_and_skips_a_step_whose_gradients_overflow(tiny_tokenizer):
    engine = Engine("fp16")
    scaler = engine.accelerator.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    model = load_causal_lm(ModelConfig(name="tiny:llama"), tokenizer=tiny_tokenizer)
    train = TrainConfig(learning_rate=1e-3, warmup_steps=4, mixed_precision="fp16")
    opt = build_optimizer(trainable_parameters(model), train)
    assert not opt.defaults.get("fused")  # the scaler's own overflow check must run
    model, opt, sched = engine.prepare(model, opt, build_scheduler(opt, train), train)
    ids, mask = _batch(tiny_tokenizer)
    weights = lambda: torch.cat([p.detach().flatten() for p in engine.unwrap(model).parameters()])  # noqa: E731
    w0, scale0 = weights(), scaler.get_scale()
    # 1e5 x the loss: its fp16 gradients overflow (max 65504) -> inf: the step is skipped, not an error
    engine.backward(_nll(model, ids, mask) * 1e5)
    lr, norm = engine.step(model, opt, sched, train, 1)
    assert not math.isfinite(norm) and engine.step_was_skipped
    assert torch.equal(weights(), w0) and scaler.get_scale() == scale0 / 2
    assert sched.get_last_lr()[0] == lr  # a skipped step does not advance the warm-up either
    engine.backward(_nll(model, ids, mask))
    engine.step(model, opt, sched, train, 2)
    assert not engine.step_was_skipped and not torch.equal(weights(), w0)
    assert {p.dtype for p in engine.unwrap(model).parameters()} == {torch.float32}


def test_adamw_is_fused_except_under_fp16_loss_scaling(tiny_tokenizer):
    # fused: one kernel for every tensor (torch's CPU default loops in Python); the same update
    model = load_causal_lm(ModelConfig(name="tiny:llama"), tokenizer=tiny_tokenizer)
    params = trainable_parameters(model)
    assert build_optimizer(params, TrainConfig()).defaults["fused"]
    assert build_optimizer(params, TrainConfig(mixed_precision="bf16")).defaults["fused"]
    assert not build_optimizer(params, TrainConfig(mixed_precision="fp16")).defaults.get("fused")
    fused = build_optimizer(params, TrainConfig())
    with pytest.raises(ConfigError, match="fp16 loss scaling"):
        Engine("fp16").prepare(model, fused, build_scheduler(fused, TrainConfig()), TrainConfig())
    # one step of each from the same weights and gradient: the same weights to float rounding
    torch.manual_seed(0)
    w = [torch.randn(5, 3, requires_grad=True) for _ in range(2)]
    g = [torch.randn(5, 3) for _ in range(2)]
    after = []
    for kwargs in ({"fused": True}, {"foreach": False}):
        copies = [x.detach().clone().requires_grad_() for x in w]
        for c, gi in zip(copies, g):
            c.grad = gi.clone()
        torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1, **kwargs).step()
        after.append(torch.cat([c.detach().flatten() for c in copies]))
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=1e-7)


def test_low_precision_trainable_weights_are_refused(tmp_path, capsys):
    rc = cli.main(["sft", "--config", TINY_SFT, f"run.output_dir={tmp_path}", "model.dtype=bfloat16"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "fp32 master weights" in err and "train.mixed_precision=bf16" in err
    # a frozen bf16 base under a LoRA adapter is fine: the adapter's weights are fp32
    assert cli.main(["sft", "--config", TINY_SFT, f"run.output_dir={tmp_path}", "model.dtype=bfloat16",
                     "model.lora.enabled=true", "train.max_steps=1"]) == 0


# --------------------------------------------------------------------------- options on the model


def test_gradient_checkpointing_gives_the_same_curve(tmp_path):
    curves = {}
    for on in ("false", "true"):
        out = tmp_path / on
        assert cli.main(["sft", "--config", TINY_SFT, f"run.output_dir={out}", f"train.gradient_checkpointing={on}",
                         "model.lora.enabled=true", "train.max_steps=3"]) == 0
        curves[on] = [v for r in read_metrics(out / "tiny" / "sft") for v in (r["loss"], r["grad_norm"])]
    assert curves["true"] == pytest.approx(curves["false"], abs=1e-6)


def test_gradient_checkpointing_keeps_fewer_activations_for_the_backward(tiny_tokenizer):
    saved = {}
    for on in (False, True):
        model = load_causal_lm(ModelConfig(name="tiny:llama"), tokenizer=tiny_tokenizer)
        engine = Engine()
        train = TrainConfig(gradient_checkpointing=on)
        opt = build_optimizer(trainable_parameters(model), train)
        model, opt, _ = engine.prepare(model, opt, build_scheduler(opt, train), train)
        model.train()
        ids, mask = _batch(tiny_tokenizer)
        count = [0]

        def pack(t):
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = _nll(model, ids, mask)
        engine.backward(loss)  # and the backward still works, recomputing what was not kept
        saved[on] = count[0]
    assert saved[True] < saved[False] / 2


def test_attention_implementation_is_a_model_option(tiny_tokenizer, capsys):
    ids, _ = _batch(tiny_tokenizer)
    logits = {}
    for impl in ("eager", "sdpa"):
        model = load_causal_lm(ModelConfig(name="tiny:llama", attn_implementation=impl), tokenizer=tiny_tokenizer)
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            logits[impl] = model(input_ids=ids).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], atol=1e-5, rtol=0)
    assert cli.main(["sft", "--config", TINY_SFT, "model.attn_implementation=no_such_kernel"]) == 2
    err = capsys.readouterr().err
    assert "model.attn_implementation='no_such_kernel'" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- a broken step stops every loop


def _nan_at_step(monkeypatch, module, name, step_of_call):
    real = getattr(module, name)
    calls = {"n": 0}

    def broken(*a, **kw):
        calls["n"] += 1
        loss, metrics = real(*a, **kw)
        return (loss * float("nan") if step_of_call(calls["n"]) else loss), metrics

    monkeypatch.setattr(module, name, broken)


@pytest.mark.parametrize("stage, target", [("sft", "response_nll"), ("rm", "pairwise_loss"), ("dpo", "batch_loss")])
def test_a_non_finite_loss_stops_the_run_at_its_step_without_done_or_final(tmp_path, monkeypatch, capsys, stage,
                                                                          target):
    import importlib

    module = importlib.import_module(f"alignkit.recipes.{stage}")
    # one micro-batch per step in these configs (no eval until the end): call 3 is step 3
    _nan_at_step(monkeypatch, module, target, lambda n: n == 3)
    rc = cli.main([stage, "--config", str(CONFIGS / f"{stage}-tiny.yaml"), f"run.output_dir={tmp_path}",
                   "train.save_every=1", "train.grad_accum=1", "train.eval_every=0", "data.eval_fraction=0"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "step 3: the loss is not finite" in err and "step-000002" in err
    run = tmp_path / "tiny" / stage
    assert not (run / "DONE").exists() and not (run / "final").exists()
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


# --------------------------------------------------------------------------- every model on the engine's device


def _on(device_type: str, *models) -> bool:
    return all(p.device.type == device_type for m in models for p in m.parameters())


def test_every_model_of_a_ppo_stage_is_placed_on_the_engine_device(tmp_path, monkeypatch):
    # The engine's device is 'meta' here: any model the stage builds but does not place stays
    # on the CPU and shows up. (prepare is skipped: accelerate would place for us.)
    from alignkit.recipes import ppo
    from test_ppo import save_tiny_reward_model

    save_tiny_reward_model(tmp_path / "rm" / "final")
    rm_dir = tmp_path / "rm"
    for lora in ("false", "true"):
        cfg = load_config(ppo.Config, CONFIGS / "ppo-tiny.yaml", [
            f"run.output_dir={tmp_path}", "value.mode=separate", f"value.init={rm_dir}", f"reward.spec=rm:{rm_dir}",
            f"model.lora.enabled={lora}"])
        engine = Engine()
        engine.device = torch.device("meta")
        monkeypatch.setattr(engine, "prepare", lambda model, opt, sched, train: (model, opt, sched))
        setup = ppo.build(cfg, engine)
        frozen_reference = [setup.reference.model] if setup.reference.model is not None else []
        assert (lora == "true") == (not frozen_reference)  # LoRA: the policy with its adapter off
        assert _on("meta", setup.ac.policy, setup.ac.value_model, setup.reward_fn.model, *frozen_reference)


@pytest.fixture
def meta_engines(monkeypatch):
    """Every Engine a stage makes reports the 'meta' device; returns where generate found its model."""
    from alignkit import rollout
    from alignkit.recipes import best_of_n
    from alignkit.recipes import eval as eval_recipe

    real_init = Engine.__init__

    def meta_init(self, *a, **kw):
        real_init(self, *a, **kw)
        self.device = torch.device("meta")

    devices = []

    def fake_generate(model, tok, prompts, gen, n=1, **kw):
        devices.append(next(model.parameters()).device.type)
        return [rollout.Generation(i, s, (1,), (5 + s, tok.eos_token_id), f"answer {'x ' * s}{i}", True, (-1.0, -1.0))
                for i in range(len(prompts)) for s in range(n)]

    monkeypatch.setattr(Engine, "__init__", meta_init)
    monkeypatch.setattr(rollout, "generate", fake_generate)
    monkeypatch.setattr(eval_recipe, "generate", fake_generate)
    monkeypatch.setattr(best_of_n, "generate", fake_generate)
    return devices


def test_label_ai_samples_on_the_engine_device(tmp_path, meta_engines):
    from alignkit.recipes import label_ai

    label_ai.main(load_config(label_ai.Config, CONFIGS / "label-ai-tiny.yaml", [f"run.output_dir={tmp_path}"]))
    assert meta_engines == ["meta"]


def test_eval_loads_and_scores_every_model_on_the_engine_device(tmp_path, monkeypatch, meta_engines):
    import numpy as np

    from alignkit.eval import helpfulness, metrics, refusal

    scored, encoded = [], []
    monkeypatch.setattr(metrics, "response_kl", lambda model, ref, samples, *a, **kw: scored.append(
        {next(model.parameters()).device.type, next(ref.parameters()).device.type}) or np.zeros(len(samples.texts)))
    # the helpfulness judge's encoder is built on the engine's device; a forward on 'meta' cannot run
    # (transformers reads mask values), so its relevance records the device and returns zeros
    monkeypatch.setattr(helpfulness.HelpfulnessJudge, "relevance", lambda self, prompts, answers: encoded.append(
        self.encoder.device.type) or np.zeros(len(answers)))
    monkeypatch.setattr(refusal, "refusal_probability", lambda texts: np.zeros(len(texts)))
    from alignkit.recipes import eval as eval_recipe

    eval_recipe.main(load_config(eval_recipe.Config, CONFIGS / "eval-tiny.yaml",
                                 [f"run.output_dir={tmp_path}", "prompts.limit=3"]))
    assert meta_engines == ["meta", "meta"] and scored == [{"meta"}]
    assert encoded and set(encoded) == {"meta"}


def test_best_of_n_samples_on_the_engine_device(tmp_path, monkeypatch, meta_engines):
    from alignkit.recipes import best_of_n, sft

    class Stop(Exception):
        pass

    def stop(*a, **kw):
        raise Stop

    monkeypatch.setattr(sft, "train_sft", stop)
    with pytest.raises(Stop):
        best_of_n.main(load_config(best_of_n.Config, CONFIGS / "best-of-n-tiny.yaml", [f"run.output_dir={tmp_path}"]))
    assert meta_engines == ["meta"]


def test_model_rewards_and_judges_load_on_the_given_device(tmp_path):
    from alignkit.judges import JudgeConfig, build_judge
    from alignkit.rewards import build_reward
    from test_ppo import save_tiny_reward_model

    save_tiny_reward_model(tmp_path / "rm")
    meta = torch.device("meta")
    assert _on("meta", build_reward(f"rm:{tmp_path / 'rm'}", device=meta).model)
    # a weighted combination passes the device to each of its parts
    combined = build_reward({"weighted": [{"reward": f"rm:{tmp_path / 'rm'}", "weight": 1.0}]}, device=meta)
    assert _on("meta", *[part.model for part in combined.sources])
    judge = build_judge(JudgeConfig(template="toxicity", model=ModelConfig(name="tiny:llama")), device=meta)
    model, _ = judge.backend._load()
    assert _on("meta", model)


# --------------------------------------------------------------------------- the final save of a sharded model


@pytest.mark.parametrize("lora", [False, True])
def test_a_gathered_state_dict_saves_the_same_model(tmp_path, tiny_tokenizer, lora):
    # Under FSDP / ZeRO-3 the model's own tensors are shards: the final save loads the gathered
    # full state into a fresh copy built from the config (LoRA included) and saves that.
    from safetensors.torch import load_file

    from alignkit.config import LoraConfig
    from alignkit.models import save_model

    model = load_causal_lm(ModelConfig(name="tiny:llama", lora=LoraConfig(enabled=lora, r=4)), tokenizer=tiny_tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))  # trained: LoRA's B is no longer zero
    save_model(model, tiny_tokenizer, tmp_path / "direct")
    save_model(model, tiny_tokenizer, tmp_path / "gathered", state_dict=model.state_dict())
    a, b = load_file(tmp_path / "direct" / "model.safetensors"), load_file(tmp_path / "gathered" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "gathered" / "adapter").exists() == lora
    with pytest.raises(Exception, match="do not match"):
        save_model(model, tiny_tokenizer, tmp_path / "bad", state_dict={"nonsense": torch.zeros(1)})


def test_resuming_another_models_checkpoint_is_a_one_line_error(tmp_path, capsys):
    args = ["sft", "--config", TINY_SFT, f"run.output_dir={tmp_path}", "train.save_every=2"]
    assert cli.main(args + ["train.max_steps=2"]) == 0
    (tmp_path / "tiny" / "sft" / "DONE").unlink()
    capsys.readouterr()
    assert cli.main(args + ["train.max_steps=4", "model.lora.enabled=true", "--resume"]) == 2
    err = capsys.readouterr().err  # the run's config.yaml says which setting changed
    assert "model.lora.enabled: False -> True" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "tiny" / "sft" / "config.yaml").unlink()  # without it, the weights tell
    assert cli.main(args + ["train.max_steps=4", "model.lora.enabled=true", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "checkpoints: cannot read checkpoint (step-000002:" in err and len(err.strip().splitlines()) == 1


def test_a_checkpoint_holds_the_trainable_weights_under_plain_names(tmp_path):
    from safetensors.torch import load_file

    assert cli.main(["sft", "--config", TINY_SFT, f"run.output_dir={tmp_path}", "model.lora.enabled=true",
                     "train.max_steps=2", "train.save_every=2"]) == 0
    saved = load_file(tmp_path / "tiny" / "sft" / "checkpoints" / "step-000002" / "model.safetensors")
    assert saved and all("lora_" in k and not k.startswith("module.") for k in saved)  # the adapter, not the base


@pytest.mark.parametrize("lora", ["false", "true"])
def test_ppo_in_bf16_starts_at_zero_kl_and_ratio_one(tmp_path, lora):
    # Policy, reference and the rollout's scoring all run under the engine's autocast, so before
    # any update the reference is exactly the policy. The update's forward sees the same rows in
    # another batch: equal up to bf16 rounding of the batch-dependent kernels (2^-8 relative).
    from alignkit.recipes import ppo

    cfg = load_config(ppo.Config, CONFIGS / "ppo-tiny.yaml", [
        f"run.output_dir={tmp_path}", "train.mixed_precision=bf16", "reward.spec=rule:length:4",
        f"model.lora.enabled={lora}", "ppo.rollout_batch_size=8", "ppo.minibatch_size=4", "ppo.ppo_epochs=1",
        "generation.max_new_tokens=4", "generation.batch_size=8"])
    engine = Engine(cfg.train.mixed_precision)
    setup = ppo.build(cfg, engine)
    first, records = ppo.ppo_step(1, cfg, setup, engine)
    assert first["kl"] == 0.0
    assert records[0]["ratio_mean"] == pytest.approx(1.0, abs=2 ** -8)
    assert {p.dtype for p in engine.unwrap(setup.ac).parameters() if p.requires_grad} == {torch.float32}


def test_rl_updates_forward_in_length_sorted_pieces_sized_for_the_device():
    from alignkit.training import forward_rows, length_pieces

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    full = torch.nn.Sequential(torch.nn.Linear(40, 40), torch.nn.Linear(40, 2))  # 1,722 weights, all trained
    adapted = torch.nn.Sequential(torch.nn.Linear(40, 40).requires_grad_(False), torch.nn.Linear(40, 2))
    # 0 (auto): 4 rows on a CPU when the trained weights are adapters (82 of 1,722 here: 4.8%), never more
    # than the micro-batch; the whole micro-batch on an accelerator or when trained in full
    assert forward_rows(0, 8, cpu, adapted) == 4 and forward_rows(0, 2, cpu, adapted) == 2
    assert forward_rows(0, 16, cuda, adapted) == 16 and forward_rows(0, 8, cpu, full) == 8
    assert forward_rows(3, 8, cuda, full) == 3 and forward_rows(32, 8, cpu, adapted) == 8  # a setting, capped
    # a minibatch's items, shortest first (ties by item), in pieces of rows x processes
    lengths = {7: 30, 2: 5, 9: 12, 4: 5, 1: 40}
    assert length_pieces([7, 2, 9, 4, 1], lengths, 2) == [[2, 4], [9, 7], [1]]
    assert length_pieces([7, 2, 9, 4, 1], lengths, 2, num_processes=2) == [[2, 4, 9, 7], [1]]
