"""Checkpoints, resume and several processes: what a probe of run folders found, one class each.

1. ``--resume`` with a changed config continued the checkpoints of one run as another, exit 0
   (batch size, data path, learning rate: a different run than the one checkpointed), and on a
   finished run said "already complete" for a config it never ran. Now a one-line error naming
   the keys and the run's ``config.yaml``; step counts and how often to log / evaluate / save may
   still change. (config.yaml is written atomically, since --resume now reads it.)
2. ``--resume`` with fewer steps than the checkpoint it resumes from ran no step, saved the
   checkpoint's model as final and wrote DONE with the smaller step count, exit 0. Now an error.
3. PPO resumed from a checkpoint whose meta.json has no KL controller state: a KeyError
   traceback, or (an empty ``extra``) a silent restart of the adaptive KL coefficient. Now a
   one-line error naming meta.json and the field.
4. A non-finite next-token distribution on one process only (its share of the prompts): the
   other process died in the gather with gloo's "Connection closed by peer" traceback (two
   machines) or was killed by torchrun without a word. Now both stop with the error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from alignkit import cli
from alignkit.runs import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SFT = ["sft", "--config", str(CONFIGS / "sft-tiny.yaml"), "data.eval_fraction=0", "train.save_every=1",
       "train.keep_checkpoints=4"]


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A finished 3-step tiny SFT run with a checkpoint per step, copied by each test."""
    base = tmp_path_factory.mktemp("sft") / "runs"
    assert cli.main([*SFT, f"run.output_dir={base}", "train.max_steps=3"]) == 0
    return base


def copy_of(sft_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    runs = tmp_path / "runs"
    shutil.copytree(sft_run, runs)
    return runs, runs / "tiny" / "sft"


# --------------------------------------------------------------------------- 1. resume with another config


@pytest.mark.parametrize("override, shown", [
    ("train.batch_size=2", "train.batch_size: 4 -> 2"),
    ("data.path=synthetic:polite_vs_rude?n=32&seed=1", ("data.path: 'synthetic:polite_vs_rude?n=64&seed=0' -> "
                                                        "'synthetic:polite_vs_rude?n=32&seed=1'")),
    ("model.lora.enabled=true", "model.lora.enabled: False -> True"),
    ("train.learning_rate=0.01", "train.learning_rate: 0.001 -> 0.01"),
])
def test_resume_with_a_changed_setting_is_an_error_naming_it(sft_run, tmp_path, capsys, override, shown):
    runs, run_dir = copy_of(sft_run, tmp_path)
    (run_dir / "DONE").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "step-000003")  # killed after step 2
    config = (run_dir / "config.yaml").read_text()
    code, _, err = run(capsys, *SFT, f"run.output_dir={runs}", "train.max_steps=3", override, "--resume")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert shown in err and str(run_dir / "config.yaml") in err and "start without --resume" in err
    # nothing trained, nothing rewritten: the run still resumes with its own config
    assert (run_dir / "config.yaml").read_text() == config and not (run_dir / "DONE").exists()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


def test_resume_may_change_the_step_count_and_the_saving(sft_run, tmp_path, capsys):
    runs, run_dir = copy_of(sft_run, tmp_path)
    code, _, err = run(capsys, *SFT, f"run.output_dir={runs}", "train.max_steps=5", "train.save_every=2",
                       "train.log_every=1", "--resume")
    assert code == 0, err
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    assert json.loads((run_dir / "DONE").read_text())["steps"] == 5


def test_resume_of_a_finished_run_with_another_config_is_not_called_complete(sft_run, tmp_path, capsys):
    runs, _ = copy_of(sft_run, tmp_path)
    code, out, err = run(capsys, *SFT, f"run.output_dir={runs}", "train.max_steps=3", "train.learning_rate=0.01",
                         "--resume")
    assert code == 2 and "already complete" not in out and "train.learning_rate: 0.001 -> 0.01" in err
    code, out, _ = run(capsys, *SFT, f"run.output_dir={runs}", "train.max_steps=3", "--resume")
    assert code == 0 and "already complete" in out  # the same config: nothing to do


# --------------------------------------------------------------------------- 2. fewer steps than the checkpoint


def test_resume_with_fewer_steps_than_the_checkpoint_is_an_error(sft_run, tmp_path, capsys):
    runs, run_dir = copy_of(sft_run, tmp_path)
    done = (run_dir / "DONE").read_text()
    final = (run_dir / "final" / "model.safetensors").read_bytes()
    code, _, err = run(capsys, *SFT, f"run.output_dir={runs}", "train.max_steps=2", "--resume")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "step 3, past this config's last step 2" in err and "at least 3 steps" in err
    # the finished run is as it was: its DONE still says 3 steps, its final model untouched
    assert (run_dir / "DONE").read_text() == done and json.loads(done)["steps"] == 3
    assert (run_dir / "final" / "model.safetensors").read_bytes() == final


# --------------------------------------------------------------------------- 3. PPO's KL controller state


PPO = ["ppo", "--config", str(CONFIGS / "ppo-tiny.yaml"), "ppo.steps=2", "ppo.rollout_batch_size=4",
       "ppo.minibatch_size=4", "train.save_every=1", "ppo.kl.adaptive=true"]


@pytest.mark.parametrize("extra, got", [({}, "None"), ({"other": 1}, "None"),
                                        ({"kl_controller": {"value": "x"}}, "'x'"),
                                        ({"kl_controller": {"value": -1.0}}, "-1.0")])
def test_ppo_resume_without_its_kl_controller_state_is_an_error_naming_the_field(tmp_path, capsys, extra, got):
    assert cli.main([*PPO, f"run.output_dir={tmp_path}"]) == 0
    run_dir = tmp_path / "tiny" / "ppo"
    (run_dir / "DONE").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "step-000002")
    meta = run_dir / "checkpoints" / "step-000001" / "meta.json"
    assert json.loads(meta.read_text())["extra"]["kl_controller"]["value"] > 0  # what a checkpoint holds
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "extra": extra}))
    code, _, err = run(capsys, *PPO, f"run.output_dir={tmp_path}", "--resume")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{meta}: field 'extra.kl_controller.value'" in err and f"got {got}" in err


# --------------------------------------------------------------------------- 4. a non-finite distribution on one process


NAN_ON_PROCESS_1 = textwrap.dedent("""
    # alignkit's CLI, with a NaN next-token distribution on process 1 only
    import os, sys
    import torch
    import alignkit.rollout as rollout

    if os.environ.get("RANK") == "1":
        real = rollout.draw
        rollout.draw = lambda logits, *a, **k: real(torch.full_like(logits, float("nan")), *a, **k)
    from alignkit import cli

    sys.argv = ["alignkit", *sys.argv[1:]]
    cli.entry()
""")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-process test: run with CUDA_VISIBLE_DEVICES=")
@pytest.mark.parametrize("stage, config, args", [
    ("ppo", "ppo-tiny.yaml", ["ppo.steps=2", "ppo.rollout_batch_size=4", "ppo.minibatch_size=4"]),
    ("label-ai", "label-ai-tiny.yaml", ["data.limit=4"]),
])
def test_a_non_finite_distribution_on_one_process_stops_both_with_the_error(tmp_path, stage, config, args):
    script = tmp_path / "nan_on_process_1.py"
    script.write_text(NAN_ON_PROCESS_1)
    env = {**os.environ, "ALIGNKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), stage, "--config", str(CONFIGS / config), f"run.output_dir={tmp_path}",
                           *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False)
    assert done.returncode != 0
    # process 0 saw finite distributions only; it stops with process 1's error rather than dying in
    # (or being killed while waiting at) the gather of the samples. The two processes write at the same
    # moment and their lines may interleave: count the messages, not the lines.
    said = done.stdout + done.stderr
    error = "alignkit: error: step 1: sampling: the model's next-token distribution is not finite"
    if stage == "label-ai":
        error = error.replace("step 1: ", "")
    assert said.count(error) == 2 and said.count(f"[process 1] {error}") == 1, said[-4000:]
    assert "Connection closed by peer" not in done.stderr
