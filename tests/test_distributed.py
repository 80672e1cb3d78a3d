"""Several processes (torchrun, gloo on the CPU) against one: the same run, step for step.

For sft, rm, dpo and ppo: 2 processes x batch b against 1 process x batch 2b (fp32,
same seed). The 2-process run is killed (SIGKILL, every process) right after its
step-2 checkpoint appears and continued with ``--resume``; the continued curve must
be the 1-process run's, step for step, and the final weights the same. Differences
come only from the order of float sums (the gradient all-reduce adds the two halves
of each batch; one process sums the batch at once): ~1e-7 relative, so losses
agree to 1e-5 and, at the learning rates below, weights to 1e-6 (Adam's g / sqrt(v)
scales a gradient's relative error by up to the learning rate, per step).

label-ai, best-of-n and eval split the prompts across the processes and gather the
results: the outputs must equal one process's, line for line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignkit import cli
from alignkit.runs import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed"),
              # CPU processes over gloo, compared with a CPU process to 1e-5; on a GPU machine run them with
              # CUDA_VISIBLE_DEVICES= (one GPU cannot hold two processes' devices)
              pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-process tests: run with CUDA_VISIBLE_DEVICES="),
              pytest.mark.usefixtures("one_thread")]


def _command(n: int, stage: str, args: list[str], accelerate_config: str | None = None) -> list[str]:
    if accelerate_config:  # the README's command: accelerate launch --config_file ... -m alignkit.cli
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(CONFIGS / "accelerate" / accelerate_config), "--num_processes", str(n), "--main_process_port",
                str(_free_port()), "-m", "alignkit.cli", stage, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            "-m", "alignkit.cli", stage, *args]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "ALIGNKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def launch(n: int, stage: str, *args: str, accelerate_config: str | None = None) -> str:
    """``alignkit STAGE ARGS`` in ``n`` processes; returns stdout (fails the test on an error)."""
    done = subprocess.run(_command(n, stage, list(args), accelerate_config), capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-8000:]
    return done.stdout


def launch_and_kill(n: int, stage: str, run: Path, after_step: int, *args: str,
                    accelerate_config: str | None = None) -> None:
    """Start ``n`` processes and SIGKILL every one of them once checkpoint ``after_step`` exists."""
    proc = subprocess.Popen(_command(n, stage, list(args), accelerate_config), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT, start_new_session=True)
    target = run / "checkpoints" / f"step-{after_step:06d}"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for pid in _descendants(proc.pid):
        with_missing_ok(lambda: os.kill(int(pid), signal.SIGKILL))
    with_missing_ok(lambda: os.killpg(proc.pid, signal.SIGKILL))
    _, err = proc.communicate(timeout=60)
    assert target.exists(), f"no checkpoint {target}: {err[-3000:]}"
    assert not (run / "DONE").exists(), "the run finished before it could be killed: give it more steps"


def _descendants(pid: int) -> list[str]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return children + [d for c in children for d in _descendants(int(c))]


def with_missing_ok(kill) -> None:
    try:
        kill()
    except ProcessLookupError:
        pass


def assert_same_curve(one: Path, two: Path, keys: tuple[str, ...], atol: float = 1e-5,
                      looser: dict[str, float] | None = None) -> None:
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]  # each step once: one process logs
    for x, y in zip(a, b):
        for key in keys:
            assert (key in x) == (key in y), (x["step"], key)
            if key in x:
                tol = (looser or {}).get(key, atol)
                assert y[key] == pytest.approx(x[key], abs=tol), (x["step"], key)


def assert_same_weights(one: Path, two: Path, atol: float = 1e-6) -> None:
    from safetensors.torch import load_file

    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=atol, rtol=0, msg=name)


def assert_main_process_wrote(run: Path, n: int) -> None:
    """What only the main process writes is there once; each process saved its own RNG state."""
    assert (run / "DONE").exists() and (run / "final" / "config.json").exists()
    assert len(list((run / "tb").glob("events.*"))) <= 2  # the first run's writer and the resumed one's
    latest = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert sorted(p.name for p in latest.glob("random_states_*.pkl")) == [f"random_states_{i}.pkl" for i in range(n)]
    assert not list((run / "checkpoints").glob(".tmp-*"))


def one_then_two(tmp_path: Path, stage: str, config: str, one: list[str], two: list[str], shared: list[str],
                 kill_after: int = 2, accelerate_config: str | None = None) -> tuple[Path, Path, str]:
    """1 process in this one; 2 processes killed after a checkpoint, then resumed.

    Returns both run folders and the resumed run's output.
    """
    assert cli.main([stage, "--config", str(CONFIGS / config), f"run.output_dir={tmp_path / 'one'}",
                     *shared, *one]) == 0
    args = ["--config", str(CONFIGS / config), f"run.output_dir={tmp_path / 'two'}", *shared, *two]
    run_two = tmp_path / "two" / "tiny" / stage
    launch_and_kill(2, stage, run_two, kill_after, *args, accelerate_config=accelerate_config)
    out = launch(2, stage, *args, "--resume", accelerate_config=accelerate_config)
    return tmp_path / "one" / "tiny" / stage, run_two, out


# --------------------------------------------------------------------------- the training recipes


def test_sft_two_processes_equal_one_with_twice_the_batch_and_resume_after_a_kill(tmp_path):
    # 25 examples, 8 per step (2 micro-batches of 4): steps of 8, 8, 8 and 1 per epoch. The
    # last step's one example leaves process 1 without a share: it runs a stand-in of weight 0.
    shared = ["data.path=synthetic:polite_vs_rude?n=25&seed=0", "data.eval_fraction=0",
              "data.eval_path=synthetic:polite_vs_rude?n=5&seed=9", "train.max_steps=null", "train.epochs=3",
              "train.grad_accum=2", "train.save_every=1", "train.eval_every=4", "train.learning_rate=1e-4"]
    one, two, out = one_then_two(tmp_path, "sft", "sft-tiny.yaml", ["train.batch_size=4"], ["train.batch_size=2"],
                                 shared, accelerate_config="ddp.yaml")  # the README's launch command
    assert len(read_metrics(one)) == 12
    assert_same_curve(one, two, ("loss", "tokens", "grad_norm", "lr", "eval_loss", "eval_tokens"))
    assert_same_weights(one / "final", two / "final")
    assert_main_process_wrote(two, 2)
    assert out.count("alignkit sft:") == 1  # one process prints


def test_two_machines_of_one_process_each_equal_one_process(tmp_path):
    # The README's two-machine command, both "machines" on this host, one process each, the run
    # folder shared: the same run as one process with the batch of both.
    shared = ["--config", str(CONFIGS / "sft-tiny.yaml"), "train.max_steps=3", "train.learning_rate=1e-4"]
    assert cli.main(["sft", *shared, f"run.output_dir={tmp_path / 'one'}", "train.batch_size=4"]) == 0
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                               str(CONFIGS / "accelerate" / "ddp.yaml"), "--num_machines", "2", "--machine_rank",
                               str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                               "--num_processes", "2", "-m", "alignkit.cli", "sft", *shared,
                               f"run.output_dir={tmp_path / 'two'}", "train.batch_size=2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
             for rank in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    one, two = tmp_path / "one" / "tiny" / "sft", tmp_path / "two" / "tiny" / "sft"
    assert_same_curve(one, two, ("loss", "tokens", "grad_norm", "eval_loss"))
    assert_same_weights(one / "final", two / "final")


def test_rm_two_processes_equal_one_with_twice_the_batch_and_resume_after_a_kill(tmp_path):
    shared = ["train.max_steps=8", "train.save_every=1", "train.eval_every=4", "train.learning_rate=2e-5"]
    one, two, _ = one_then_two(tmp_path, "rm", "rm-tiny.yaml", ["train.batch_size=8"], ["train.batch_size=4"], shared)
    assert_same_curve(one, two, ("loss", "accuracy", "pairs", "grad_norm", "eval_loss", "eval_accuracy"))
    assert_same_weights(one / "final", two / "final")
    assert json.loads((two / "final" / "alignkit.json").read_text())["mean"] == pytest.approx(
        json.loads((one / "final" / "alignkit.json").read_text())["mean"], abs=1e-5)
    assert_main_process_wrote(two, 2)


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_dpo_two_processes_equal_one_with_twice_the_batch_and_resume_after_a_kill(tmp_path, loss):
    # KTO's reference point z0 is a mean over the whole micro-batch: summed over both processes.
    shared = [f"loss.type={loss}", "train.max_steps=8", "train.save_every=1", "train.eval_every=4",
              "train.grad_accum=2", "train.learning_rate=1e-4"]
    one, two, _ = one_then_two(tmp_path, "dpo", "dpo-tiny.yaml", ["train.batch_size=8"], ["train.batch_size=4"],
                               shared)
    # (not reward accuracy: at step 1 policy == reference and the sign of a zero margin is float noise)
    keys = ("loss", "grad_norm", "eval_loss") + (("chosen_reward", "rejected_reward", "reward_margin",
                                                  "eval_reward_margin") if loss == "dpo" else ("kl_ref_point",))
    # z0 is a difference of summed sequence log-probs (~350 nats: fp32 resolves ~4e-5 of that)
    assert_same_curve(one, two, keys, looser={"kl_ref_point": 1e-4})
    # The LM head runs from the first position a chunk's responses need, and a chunk is one process's
    # rows: other widths, so the tied embedding's gradient is summed in another order (~1e-7), which
    # Adam's g / sqrt(v) lifts to ~3e-6 on its few near-zero entries; a step taken on other data would
    # differ by the learning rate, 1e-4.
    assert_same_weights(one / "final", two / "final", atol=1e-5)
    assert_main_process_wrote(two, 2)


def test_ppo_two_processes_equal_one_with_twice_the_batch_and_resume_after_a_kill(tmp_path):
    # 8 prompts per step in both (4 per process), minibatches of 8 (4 per process) in 2 micro-batches;
    # the adaptive KL controller and the advantage whitening see the whole rollout.
    shared = ["ppo.steps=6", "generation.max_new_tokens=4", "ppo.ppo_epochs=2", "train.grad_accum=2",
              "reward.spec=rule:length:4", "ppo.kl.adaptive=true", "ppo.kl.horizon=100", "ppo.kl.target=0.5",
              "train.learning_rate=1e-4", "train.save_every=1"]
    one, two, _ = one_then_two(
        tmp_path, "ppo", "ppo-tiny.yaml",
        ["ppo.rollout_batch_size=8", "ppo.minibatch_size=8", "generation.batch_size=8"],
        ["ppo.rollout_batch_size=4", "ppo.minibatch_size=4", "generation.batch_size=4"], shared)
    keys = ("policy_loss", "value_loss", "score/mean", "score/std", "kl", "kl_coef", "entropy", "clip_fraction",
            "approx_kl", "ratio_max", "response_length", "explained_variance", "grad_norm")
    assert_same_curve(one, two, keys)
    assert len({r["kl_coef"] for r in read_metrics(one)}) > 1  # the controller moved: its state matters
    # Each forward runs on the columns its rows use, and one process's micro-batch of 4 rows is
    # two processes' 2 + 2: other widths, other rounding (~1e-7), which Adam's first steps lift
    # to ~3e-6 here; a step taken on other data would differ by the learning rate, 1e-4.
    assert_same_weights(one / "final", two / "final", atol=1e-5)
    assert (two / "samples.jsonl").read_text() == (one / "samples.jsonl").read_text()
    assert_main_process_wrote(two, 2)


def test_grpo_two_processes_equal_one_with_twice_the_batch_and_resume_after_a_kill(tmp_path):
    # 8 prompts x 4 answers per step in both (4 prompts per process); the groups, the
    # token counts of the aggregation and the KL loss see every process's answers.
    shared = ["rl.steps=6", "generation.max_new_tokens=4", "rl.epochs=2", "train.grad_accum=2",
              "reward.spec=rule:length:4", "rl.aggregation=sequence", "rl.clip_eps_high=0.28",
              "train.learning_rate=1e-4", "train.save_every=1"]
    one, two, _ = one_then_two(tmp_path, "rl", "rl-grpo-tiny.yaml",
                               ["rl.prompts_per_step=8", "rl.minibatch_size=16", "generation.batch_size=32"],
                               ["rl.prompts_per_step=4", "rl.minibatch_size=8", "generation.batch_size=16"], shared)
    keys = ("policy_loss", "kl_loss", "score/mean", "score/std", "kl", "entropy", "clip_fraction", "approx_kl",
            "ratio_max", "response_length", "grad_norm")
    assert_same_curve(one, two, keys)
    assert_same_weights(one / "final", two / "final")
    assert_main_process_wrote(two, 2)


# --------------------------------------------------------------------------- sampling stages


def test_label_ai_two_processes_write_what_one_writes(tmp_path):
    config = str(CONFIGS / "label-ai-tiny.yaml")
    assert cli.main(["label-ai", "--config", config, f"run.output_dir={tmp_path / 'one'}"]) == 0
    launch(2, "label-ai", "--config", config, f"run.output_dir={tmp_path / 'two'}")
    for name in ("rankings.jsonl", "pairs.jsonl"):
        a = (tmp_path / "one" / "tiny" / "label-ai" / "final" / name).read_text()
        assert a and (tmp_path / "two" / "tiny" / "label-ai" / "final" / name).read_text() == a


def test_best_of_n_two_processes_write_what_one_writes(tmp_path):
    config = str(CONFIGS / "best-of-n-tiny.yaml")
    shared = ["sampling.rounds=2", "data.limit=7", "train.learning_rate=1e-4"]  # 7 prompts: shares of 4 and 3
    assert cli.main(["best-of-n", "--config", config, f"run.output_dir={tmp_path / 'one'}", *shared,
                     "train.batch_size=4"]) == 0
    # the fine-tuning's batch is per process: 2 x 2 is the one process's 4
    launch(2, "best-of-n", "--config", config, f"run.output_dir={tmp_path / 'two'}", *shared, "train.batch_size=2")
    one, two = tmp_path / "one" / "tiny" / "best-of-n", tmp_path / "two" / "tiny" / "best-of-n"
    for r in (1, 2):  # round 2 samples from the model round 1 fine-tuned in 2 processes
        assert (two / f"round-{r}" / "dataset.jsonl").read_text() == (one / f"round-{r}" / "dataset.jsonl").read_text()
    assert_same_weights(one / "final", two / "final")


def test_eval_two_processes_report_what_one_reports(tmp_path):
    from alignkit.recipes.eval import SAMPLES_FILE

    config = str(CONFIGS / "eval-tiny.yaml")
    shared = ["prompts.limit=5"]  # shares of 3 and 2 prompts
    assert cli.main(["eval", "--config", config, f"run.output_dir={tmp_path / 'one'}", *shared]) == 0
    launch(2, "eval", "--config", config, f"run.output_dir={tmp_path / 'two'}", *shared)
    one = sorted((tmp_path / "one").rglob(SAMPLES_FILE))
    two = sorted((tmp_path / "two").rglob(SAMPLES_FILE))
    assert len(one) == len(two) == 1
    a = [json.loads(line) for line in one[0].read_text().splitlines()]
    b = [json.loads(line) for line in two[0].read_text().splitlines()]
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "kl"} == {k: v for k, v in y.items() if k != "kl"}
        assert y.get("kl") == pytest.approx(x.get("kl"), abs=1e-5)


def test_the_whole_loop_runs_as_a_pipeline_in_two_processes(tmp_path):
    # label-ai -> rm -> ppo -> dpo -> eval, every stage in both processes, one run folder
    import shutil as sh

    sh.copy(CONFIGS / "run-tiny.yaml", tmp_path / "run.yaml")
    text = (tmp_path / "run.yaml").read_text().replace("output_dir: runs", f"output_dir: {tmp_path / 'runs'}")
    (tmp_path / "run.yaml").write_text(text)
    out = launch(2, "run", str(tmp_path / "run.yaml"))
    folder = tmp_path / "runs" / "tiny-pipeline"
    for stage in ("label-ai", "rm", "ppo", "dpo", "eval"):
        assert (folder / stage / "DONE").exists(), stage
    assert out.count("finished in") == 5  # one process reports
    assert (folder / "eval" / "final" / "report.html").exists()


def test_fsdp_on_the_cpu_is_refused_not_silently_ddp(tmp_path):
    # accelerate enables FSDP on accelerator devices only; on the CPU it would quietly run DDP.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(CONFIGS / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "-m", "alignkit.cli", "sft",
           "--config", str(CONFIGS / "sft-tiny.yaml"), f"run.output_dir={tmp_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert done.returncode != 0
    assert "FSDP needs GPUs" in done.stderr
    assert not (tmp_path / "tiny" / "sft" / "DONE").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)
