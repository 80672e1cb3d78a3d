"""Best-of-N and rejection sampling on a tiny model with a rule reward."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkit.cli import main as alignkit
from alignkit.config import load_config
from alignkit.runs import read_metrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = str(CONFIGS / "best-of-n-tiny.yaml")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # A 64-wide model gains nothing from intra-op threads, and on a shared
    # 2-core machine two OpenMP threads per process spin and run several times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def best_of_n(out: Path, *overrides: str, resume: bool = False) -> int:
    args = ["best-of-n", "--config", TINY, f"run.output_dir={out}", *overrides]
    return alignkit(args + (["--resume"] if resume else []))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_best_of_8_beats_best_of_1_on_fixed_prompts_and_seed():
    from alignkit.data.formats import load_prompts
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.recipes.best_of_n import Config, sample_and_score
    from alignkit.rewards import build_reward

    cfg = load_config(Config, TINY, ["data.limit=12"])
    prompts = load_prompts(cfg.data.path, cfg.data.split, kind=cfg.data.kind, limit=cfg.data.limit)
    tok = load_tokenizer(cfg.model.name)
    model = load_causal_lm(cfg.model, trainable=False, tokenizer=tok)
    reward = build_reward("rule:length:20")
    means = {}
    for n in (1, 8):
        cfg.sampling.n = n
        samples = sample_and_score(model, tok, prompts, cfg, reward, seed=7)
        assert samples.scores.shape == (12, n)
        means[n] = samples.scores.max(axis=1).mean()
    # rule:length:20 = words / 20: a random model's lengths vary, so the best of 8
    # is longer on average than one draw (the sampler is not greedy: 8 draws differ)
    assert means[8] > means[1] + 0.05


def test_top_k_keeps_the_highest_scores_best_first():
    from alignkit.recipes.best_of_n import top_k

    scores = np.array([[0.2, 0.9, 0.1, 0.9], [-1.0, -3.0, 5.0, 0.0]])
    # row 0: 0.9 at 1 and 3 (a tie keeps sample order), then 0.2 at 0
    assert top_k(scores, 3).tolist() == [[1, 3, 0], [2, 3, 0]]


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    """Two rounds of best-of-4, keep 2, on 6 prompts; then a final sample."""
    out = tmp_path_factory.mktemp("bon") / "runs"
    assert best_of_n(out, "sampling.rounds=2", "sampling.keep=2", "train.save_every=1") == 0
    return out, out / "tiny" / "best-of-n"


def test_rounds_write_scored_data_sets_and_report_best_vs_single(two_rounds):
    _, run = two_rounds
    for r in (1, 2):
        rows = read_jsonl(run / f"round-{r}" / "dataset.jsonl")
        assert len(rows) == 6 * 2  # 6 prompts x keep 2 (a random model's text is never empty here)
        for row in rows:
            ordered = sorted(row["scores"], reverse=True)
            assert row["round"] == r and len(row["scores"]) == 4
            assert row["score"] == ordered[row["rank"] - 1]  # the kept ones are the top 2, best first
            assert row["score"] == pytest.approx(min(len(row["completion"].split()) / 20, 1.0))
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m["mean_best_score"] >= m["mean_kept_score"] >= m["mean_single_score"]
        assert m["mean_best_score"] > m["mean_single_score"]  # best of 4 random lengths beats their mean
    assert metrics[-1]["final"] == 1
    # final -> the newest round's model, which loads in plain transformers
    assert run.joinpath("final").resolve() == (run / "round-2" / "sft" / "final").resolve()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "final")
    done = json.loads((run / "DONE").read_text())
    assert len(done["per_round"]) == 2 and done["final"]["round"] == 3


def test_each_round_samples_from_the_newest_model(two_rounds):
    from alignkit.data.formats import load_prompts
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.recipes.best_of_n import Config, _round_seed, sample_and_score
    from alignkit.rewards import build_reward

    _, run = two_rounds
    cfg = load_config(Config, TINY, ["sampling.rounds=2", "sampling.keep=2"])
    prompts = load_prompts(cfg.data.path, cfg.data.split, kind=cfg.data.kind, limit=cfg.data.limit)
    tok = load_tokenizer(cfg.model.name)
    model = load_causal_lm(cfg.model, trainable=False, tokenizer=tok)
    reward = build_reward(cfg.reward.spec)
    initial = sample_and_score(model, tok, prompts, cfg, reward, seed=_round_seed(cfg, 1))
    kept_round1 = {(tuple(map(str, r["prompt"])), r["completion"]) for r in read_jsonl(run / "round-1" / "dataset.jsonl")}
    # round 1 sampled the initial model: its kept responses are among these samples
    assert kept_round1 <= {(tuple(map(str, p.prompt)), t) for p, row in zip(prompts, initial.texts) for t in row}
    # round 2 sampled the model fine-tuned in round 1: with round 2's seed the initial
    # model would give other text
    again = sample_and_score(model, tok, prompts, cfg, reward, seed=_round_seed(cfg, 2))
    round2 = {r["completion"] for r in read_jsonl(run / "round-2" / "dataset.jsonl")}
    assert not round2 <= {t for row in again.texts for t in row}


def test_resume_skips_finished_rounds_with_their_trained_weights(two_rounds, tmp_path, monkeypatch):
    import alignkit.recipes.sft as sft

    _, run = two_rounds
    copy = tmp_path / "runs" / "tiny" / "best-of-n"
    shutil.copytree(run, copy, symlinks=True)
    # Pretend the run died in round 2, after sampling, before its fine-tuning finished.
    shutil.rmtree(copy / "round-2" / "sft")
    (copy / "DONE").unlink()
    calls = []
    real = sft.train_sft
    monkeypatch.setattr(sft, "train_sft", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    assert best_of_n(tmp_path / "runs", "sampling.rounds=2", "sampling.keep=2", "train.save_every=1", resume=True) == 0
    assert [Path(p).parent.name for p in calls] == ["round-2"]  # round 1 was not trained again
    # round 2's fine-tuning started from round 1's weights, so it ends where the uninterrupted run did
    assert read_metrics(copy)[1]["sft_train_loss"] == pytest.approx(read_metrics(run)[1]["sft_train_loss"], rel=1e-4)
    # ... and the final model samples the same text as the uninterrupted run's
    assert read_metrics(copy)[2]["mean_single_score"] == pytest.approx(read_metrics(run)[2]["mean_single_score"])


def test_bad_config_and_generate_best_of(tmp_path, capsys):
    assert best_of_n(tmp_path, "sampling.keep=5") == 2
    assert "sampling.keep=5 must be <= sampling.n=4" in capsys.readouterr().err
    assert best_of_n(tmp_path, "reward.spec=rule:nope") == 2
    assert "unknown rule reward 'rule:nope'" in capsys.readouterr().err
    # inference-time best-of-N (alignkit generate) keeps the highest-scoring sample
    out = tmp_path / "best.jsonl"
    assert alignkit(["generate", "--model", "tiny:llama", "--prompts", "builtin:prompts", "--limit", "3",
                     "--best-of", "4", "--reward", "rule:length:20", "--max-new-tokens", "12", "--out", str(out)]) == 0
    for row in read_jsonl(out):
        assert row["score"] == max(row["scores"]) and row["response"] in row["completions"]


def test_shipped_best_of_n_configs_load():
    from alignkit.recipes.best_of_n import Config, check_config

    paths = sorted(CONFIGS.glob("best-of-n*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        check_config(load_config(Config, path))
