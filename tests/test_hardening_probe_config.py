"""Numeric and contradictory settings of the training stages, class by class: a one-line error
(exit 2) naming the config key, or, for a setting that runs but not as its value suggests, a
one-line warning naming it; never a setting silently ignored or a run that trained nothing
reported as a success.

Classes:

1. a warm-up longer than the run (``train.warmup_steps`` past its last optimizer step): the
   learning rate never reached ``train.learning_rate``, the run trained at a fraction of it, and
   nothing said so (now a warning: a short trial of a full config is a reasonable run);
2. out-of-range loss settings: ``loss.label_smoothing=0.5`` (coin-flip labels: conservative DPO
   learns no preference) and ``ppo.clip_eps >= 1`` (no clipping below: the ratio is > 0) ran;
3. a setting the stage does not read: ``train.epochs`` / ``train.batch_size`` / ``train.eval_every``
   and ``data.prompts.eval_fraction`` / ``eval_path`` / ``max_length`` in ppo and rl, the other loss
   types' settings in dpo (``loss.label_smoothing`` with ipo, ``loss.simpo_gamma`` with dpo, the
   KTO weights), another algorithm's knob in rl (``rl.gamma``, ``rl.dpo_beta``,
   ``rl.scale_rewards``), ``ppo.kl.target`` without ``ppo.kl.adaptive``, ``margin_scale`` without
   ``use_margin`` in rm, ``data.max_prompt_length`` in sft and rm: all accepted and ignored;
4. ``train.eval_every`` with no held-out set (sft, rm, dpo): no evaluation, no word (now a warning);
5. greedy decoding (``generation.do_sample=false``) where a stage compares several answers to
   one prompt (best-of-n with ``sampling.n > 1``, label-ai, cai's feedback phase): n identical
   answers;
6. an rl run in which no step had anything to learn (every group's scores equal, or no pair):
   the unchanged policy was saved and the run reported done with exit 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_hardening import (
    run,  # alignkit ARGS -> (exit code, stderr), a failure one line
)

from alignkit.errors import ConfigWarning

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

pytestmark = pytest.mark.usefixtures("one_thread")


def stage(tmp_path, name: str, config: str, *overrides) -> list[str]:
    return [name, "--config", str(CONFIGS / f"{config}.yaml"), f"run.output_dir={tmp_path / 'runs'}", *overrides]


# --------------------------------------------------------------------------- 1. warm-up past the run


@pytest.mark.parametrize("name, config, overrides, steps", [
    ("sft", "sft-tiny", ["train.max_steps=2", "train.warmup_steps=3"], 2),
    ("rm", "rm-tiny", ["train.max_steps=1", "train.warmup_steps=2"], 1),
    ("dpo", "dpo-tiny", ["train.max_steps=1", "train.warmup_steps=2"], 1),
    # 1 step x 4 ppo_epochs x 32/16 minibatches = 8 optimizer steps
    ("ppo", "ppo-tiny", ["ppo.steps=1", "train.warmup_steps=9"], 8),
    # 1 step x 2 epochs x 32/16 minibatches = 4
    ("rl", "rl-grpo-tiny", ["rl.steps=1", "train.warmup_steps=5"], 4),
])
def test_a_warmup_longer_than_the_run_is_said(tmp_path, capsys, name, config, overrides, steps):
    with pytest.warns(ConfigWarning) as caught:
        code, err = run(capsys, *stage(tmp_path, name, config, *overrides, "data.eval_fraction=0"
                                       if name in ("sft", "rm", "dpo") else "run.name=tiny"))
    assert code == 0, err
    warm = overrides[-1].split("=")[1]
    said = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
    assert len(said) == 1 and said[0].startswith(f"train.warmup_steps={warm} is more than the run's {steps} "
                                                 f"optimizer steps"), said


def test_a_warmup_that_ends_on_the_last_step_runs_without_a_word(tmp_path, capsys):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        code, err = run(capsys, *stage(tmp_path, "sft", "sft-tiny", "train.max_steps=2", "train.warmup_steps=2",
                                       "data.eval_fraction=0"))
    assert code == 0, err


# --------------------------------------------------------------------------- 2. ranges


@pytest.mark.parametrize("name, config, override, expected", [
    ("dpo", "dpo-tiny", "loss.label_smoothing=0.5", "'loss.label_smoothing' must be < 0.5"),
    ("ppo", "ppo-tiny", "ppo.clip_eps=1", "'ppo.clip_eps' must be < 1"),
    ("ppo", "ppo-tiny", "ppo.clip_eps=5", "'ppo.clip_eps' must be < 1"),
])
def test_loss_settings_out_of_range_name_the_key(tmp_path, capsys, name, config, override, expected):
    code, err = run(capsys, *stage(tmp_path, name, config, override))
    assert code == 2 and expected in err, err


# --------------------------------------------------------------------------- 3. settings a stage does not read


UNUSED = [
    ("ppo", "ppo-tiny", ["train.epochs=3"], "train.epochs=3.0 is not used by PPO: set ppo.ppo_epochs"),
    ("ppo", "ppo-tiny", ["train.batch_size=64"], "train.batch_size=64 is not used by PPO"),
    ("ppo", "ppo-tiny", ["train.eval_every=1"], "train.eval_every=1 is not used by PPO"),
    ("ppo", "ppo-tiny", ["data.prompts.eval_fraction=0.5"], "data.prompts.eval_fraction=0.5 is not used by PPO"),
    ("ppo", "ppo-tiny", ["data.prompts.eval_path=held.jsonl"], "data.prompts.eval_path=held.jsonl is not used"),
    ("ppo", "ppo-tiny", ["data.prompts.max_length=64"], "data.prompts.max_length=64 is not used by PPO"),
    ("ppo", "ppo-tiny", ["ppo.kl.target=1"], "ppo.kl.target=1.0 is not used by a fixed KL coefficient"),
    ("rl", "rl-grpo-tiny", ["train.epochs=3"], "train.epochs=3.0 is not used by alignkit rl: set rl.epochs"),
    ("rl", "rl-grpo-tiny", ["train.batch_size=64"], "train.batch_size=64 is not used by alignkit rl"),
    ("rl", "rl-grpo-tiny", ["data.prompts.eval_fraction=0.5"], "data.prompts.eval_fraction=0.5 is not used"),
    ("rl", "rl-grpo-tiny", ["rl.gamma=0.5"], "rl.gamma=0.5 is not used by rl.algorithm=grpo"),
    ("rl", "rl-grpo-tiny", ["rl.dpo_beta=0.5"], "rl.dpo_beta=0.5 is not used by rl.algorithm=grpo"),
    ("rl", "rl-grpo-tiny", ["rl.algorithm=rloo", "rl.scale_rewards=false"],
     "rl.scale_rewards=False is not used by rl.algorithm=rloo"),
    ("rl", "rl-grpo-tiny", ["rl.algorithm=online_dpo", "rl.samples_per_prompt=2", "rl.kl_in=reward"],
     "rl.kl_in=reward is not used by rl.algorithm=online_dpo"),
    ("dpo", "dpo-tiny", ["loss.type=ipo", "loss.label_smoothing=0.2"],
     "loss.label_smoothing=0.2 is not used by loss.type=ipo"),
    ("dpo", "dpo-tiny", ["loss.simpo_gamma=2"], "loss.simpo_gamma=2.0 is not used by loss.type=dpo"),
    ("dpo", "dpo-tiny", ["loss.kto_desirable_weight=3"], "loss.kto_desirable_weight=3.0 is not used by loss.type=dpo"),
    ("rm", "rm-tiny", ["margin_scale=2"], "margin_scale=2.0 is not used without use_margin=true"),
    ("rm", "rm-tiny", ["data.max_prompt_length=32"], "data.max_prompt_length=32 is not used by alignkit rm"),
    ("sft", "sft-tiny", ["data.max_prompt_length=32"], "data.max_prompt_length=32 is not used by alignkit sft"),
]


@pytest.mark.parametrize("name, config, overrides, expected", UNUSED)
def test_a_setting_the_stage_does_not_read_is_an_error_naming_it(tmp_path, capsys, name, config, overrides,
                                                                  expected):
    code, err = run(capsys, *stage(tmp_path, name, config, *overrides))
    assert code == 2 and expected in err, err


@pytest.mark.parametrize("name, config, overrides", [
    # the shipped configs switched to another algorithm or loss, as their comments show
    ("rl", "rl-grpo", ["rl.algorithm=online_dpo", "rl.samples_per_prompt=2"]),
    ("rl", "rl-grpo", ["rl.algorithm=rloo"]),
    ("rl", "rl-grpo-tiny", ["rl.algorithm=reinforce_pp", "rl.gamma=0.9"]),
    ("rl", "rl-grpo-tiny", ["rl.algorithm=rloo", "rl.kl_in=reward"]),  # what rloo does anyway
    ("dpo", "dpo-tiny", ["loss.type=kto", "loss.kto_desirable_weight=2"]),
    ("dpo", "dpo-tiny", ["loss.type=simpo", "loss.simpo_gamma=1"]),
    ("ppo", "ppo-tiny", ["ppo.kl.adaptive=true", "ppo.kl.target=1"]),
    ("rm", "rm-tiny", ["use_margin=true", "margin_scale=2"]),
])
def test_settings_the_stage_reads_pass_its_check(name, config, overrides):
    import importlib

    from alignkit.cli import STAGES
    from alignkit.config import load_config

    module = importlib.import_module(STAGES[name][0])
    module.check_config(load_config(module.Config, CONFIGS / f"{config}.yaml", overrides))


# --------------------------------------------------------------------------- 4. eval_every without a held-out set


@pytest.mark.parametrize("name, config", [("sft", "sft-tiny"), ("rm", "rm-tiny"), ("dpo", "dpo-tiny")])
def test_eval_every_without_a_held_out_set_is_said(tmp_path, capsys, name, config):
    with pytest.warns(ConfigWarning, match=r"train.eval_every=2 has no held-out set to evaluate .*: no evaluation"):
        code, err = run(capsys, *stage(tmp_path, name, config, "data.eval_fraction=0", "train.eval_every=2",
                                       "train.max_steps=2"))
    assert code == 0, err


def test_alignkit_warnings_print_as_one_line_from_the_command_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "alignkit", *stage(tmp_path, "sft", "sft-tiny", "data.eval_fraction=0",
                                                                     "train.eval_every=2", "train.max_steps=1")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    said = [ln for ln in done.stderr.splitlines() if "eval_every" in ln]
    assert said == ["alignkit: warning: train.eval_every=2 has no held-out set to evaluate (data.eval_fraction=0 "
                    "and no data.eval_path): no evaluation runs"], done.stderr


# --------------------------------------------------------------------------- 5. greedy decoding, several answers


@pytest.mark.parametrize("name, config, overrides, expected", [
    ("best-of-n", "best-of-n-tiny", [], "sampling.n=4 samples per prompt with generation.do_sample=false"),
    ("label-ai", "label-ai-tiny", [], "generation.do_sample=false gives k identical answers"),
    ("cai", "cai-tiny", [], "generation.do_sample=false gives the same answer twice"),
])
def test_greedy_decoding_where_answers_are_compared_is_an_error(tmp_path, capsys, name, config, overrides, expected):
    code, err = run(capsys, *stage(tmp_path, name, config, "generation.do_sample=false", *overrides))
    assert code == 2 and expected in err, err


# --------------------------------------------------------------------------- 6. an rl run that learned nothing


@pytest.mark.parametrize("overrides", [
    ["rl.algorithm=grpo"],
    ["rl.algorithm=grpo", "rl.filter_uniform_groups=true"],
    ["rl.algorithm=rloo"],
    ["rl.algorithm=online_dpo", "rl.samples_per_prompt=2"],
])
def test_an_rl_run_whose_scores_never_differ_is_not_a_success(tmp_path, capsys, overrides):
    # no answer holds the token, so every score is 0: every advantage 0, no pair
    code, err = run(capsys, *stage(tmp_path, "rl", "rl-grpo-tiny", "rl.steps=2", "reward.spec=rule:token_share:QQQZZZ",
                                   *overrides))
    assert code == 2 and "no step of the 2 had anything to learn" in err and "policy was never updated" in err, err
    assert not (tmp_path / "runs" / "tiny" / "rl" / "DONE").exists()


def test_an_rl_run_with_a_score_that_varies_still_succeeds(tmp_path, capsys):
    code, err = run(capsys, *stage(tmp_path, "rl", "rl-grpo-tiny", "rl.steps=2"))
    assert code == 0, err
    assert (tmp_path / "runs" / "tiny" / "rl" / "DONE").exists()
