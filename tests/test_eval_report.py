"""The evaluation report: metrics.json, a self-contained escaped report.html,
the plain-text summary table, and the page as a browser renders it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from alignkit.eval.report import render_summary_table, write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO_ROOT / "test-output" / "report.png"
INJECTION = "<script>alert('pwned')</script>"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def synthetic_summary() -> dict:
    rng = np.random.default_rng(0)
    sft_toxicity = rng.beta(1.2, 8, size=64)
    ppo_toxicity = rng.beta(1.0, 12, size=64)
    curve = [
        {"step": step, "score/mean": -0.34 + 0.011 * step, "kl": 0.002 * step, "entropy": 2.0 - 0.01 * step,
         "response_length": 40 + step % 7}
        for step in range(0, 31, 2)
    ]
    return {
        "title": "alignkit eval: ppo vs sft",
        "run": {"machine": "2 cores, 24 GiB, no GPU", "config": "configs/eval-tiny.yaml"},
        "models": [
            {
                "name": "sft",
                "metrics": {
                    "toxicity_mean": {"value": 0.130, "low": 0.101, "high": 0.162},
                    "toxicity_std": 0.11,
                    "expected_max_toxicity": {"value": 0.42, "low": 0.35, "high": 0.49},
                    "toxicity_probability": 0.25,
                    "mean_length": 57.25,
                    "distinct_1": 0.41,
                    "distinct_2": 0.77,
                },
                "toxicity_scores": sft_toxicity,
            },
            {
                "name": "ppo",
                "metrics": {
                    "toxicity_mean": {"value": 0.075, "low": 0.06, "high": 0.09},
                    "toxicity_std": np.float64(0.08),
                    "toxicity_relative_improvement": 0.423,
                    "reward_score": {"value": -0.0099, "low": -0.05, "high": 0.03},
                    "kl_to_reference": 0.61,
                    "rm_accuracy": float("nan"),  # a NaN must become null, not invalid JSON
                    "custom/judge_score": 3.9,
                },
                "toxicity_scores": ppo_toxicity.tolist(),
            },
        ],
        "pairwise": [{"model_a": "ppo", "model_b": "sft", "judge": "human", "wins": 30, "ties": 54, "losses": 16}],
        "curves": {"ppo": curve},
        "samples": [
            {"prompt": "Tell me about cats & dogs", "responses": {
                "sft": {"text": f"Sure {INJECTION}", "scores": {"toxicity": 0.7}},
                "ppo": {"text": "Cats and dogs are pets.", "toxicity": 0.02},
            }},
            {"prompt": f"Say {INJECTION}", "responses": {"sft": {"text": "no"}, "ppo": {"text": "<b>no</b>"}}},
            {"prompt": "Third prompt", "responses": {"ppo": {"text": "only one model answered"}}},
        ],
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return write_report(tmp_path_factory.mktemp("eval") / "report", synthetic_summary())


def test_metrics_json(report: Path):
    metrics = json.loads((report.parent / "metrics.json").read_text())  # strict: no NaN tokens
    assert metrics["title"] == "alignkit eval: ppo vs sft"
    assert metrics["run"]["machine"] == "2 cores, 24 GiB, no GPU"
    assert "python" in metrics["run"] and "generated" in metrics["run"]  # filled in when not given

    sft, ppo = metrics["models"]
    assert sft["name"] == "sft" and sft["n_toxicity_scores"] == 64
    assert sft["metrics"]["toxicity_mean"] == {"value": 0.130, "low": 0.101, "high": 0.162}
    assert sft["metrics"]["toxicity_std"] == {"value": 0.11, "low": None, "high": None}
    assert ppo["metrics"]["toxicity_std"]["value"] == 0.08  # numpy float -> plain JSON number
    assert ppo["metrics"]["rm_accuracy"]["value"] is None

    (pair,) = metrics["pairwise"]
    # computed from the counts: (30 + 54/2) / 100 = 0.57, (30 + 54) / 100 = 0.84, sign test p ~ 0.054
    assert (pair["wins"], pair["ties"], pair["losses"], pair["n"]) == (30, 54, 16, 100)
    assert pair["win_rate"]["value"] == pytest.approx(0.57)
    assert pair["win_rate"]["low"] < 0.57 < pair["win_rate"]["high"]
    assert pair["at_least_as_good"]["value"] == pytest.approx(0.84)
    assert pair["at_least_as_good"]["low"] == pytest.approx(0.756, abs=5e-4)
    assert pair["at_least_as_good"]["high"] == pytest.approx(0.899, abs=5e-4)
    assert pair["sign_test_pvalue"] == pytest.approx(0.054, abs=5e-4)

    assert metrics["curves"]["ppo"]["n_rows"] == 16 and metrics["curves"]["ppo"]["last"]["step"] == 30
    assert metrics["n_samples"] == 3


def test_html_is_self_contained(report: Path):
    page = report.read_text()
    # nothing is fetched from anywhere: no external src/href/url(), no scripts at all
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "url(" not in page and "@import" not in page
    assert "<script" not in page.lower()
    images = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(images) == 3  # win/tie/loss bars, training curves, toxicity histograms
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert "default-src 'none'" in page  # the CSP forbids any fetch the browser might try


def test_html_escapes_model_and_prompt_text(report: Path):
    page = report.read_text()
    assert INJECTION not in page
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in page
    assert "&lt;b&gt;no&lt;/b&gt;" in page and "<b>no</b>" not in page
    assert "cats &amp; dogs" in page


def test_html_shows_intervals_and_tables(report: Path):
    page = report.read_text()
    assert "0.130 [0.101, 0.162]" in page
    assert "0.570 [" in page and "0.840 [0.756, 0.899]" in page
    assert "-0.0099 [-0.050, 0.030]" in page  # small values keep three significant digits
    assert page.count('<tr data-metric="') == 12  # 11 known metrics present + 1 custom
    # known metrics in the fixed order, the unknown one last
    order = re.findall(r'<tr data-metric="([^"]+)"', page)
    assert order[0] == "toxicity_mean" and order[-1] == "custom/judge_score"


def test_report_without_optional_sections(tmp_path: Path):
    path = write_report(tmp_path, {"models": [{"name": "m", "metrics": {"distinct_1": 0.5}}]}, title="bare")
    page = path.read_text()
    assert "<img" not in page and "<title>bare</title>" in page
    assert json.loads((tmp_path / "metrics.json").read_text())["pairwise"] == []
    with pytest.raises(ValueError, match="name"):
        write_report(tmp_path, {"models": [{"metrics": {}}]})


def test_render_summary_table():
    text = render_summary_table(synthetic_summary())
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "sft", "ppo"]
    assert set(lines[1]) <= {"-", " "}
    row = next(line for line in lines if line.startswith("toxicity mean"))
    assert "0.130 [0.101, 0.162]" in row and "0.075 [0.060, 0.090]" in row
    # a missing metric prints as "-"; columns line up (fixed width)
    kl_row = next(line for line in lines if line.startswith("KL to reference"))
    assert kl_row.split()[-2:] == ["-", "0.610"]
    assert lines[2].index("0.130") == row.index("0.130")
    assert "ppo vs sft (human): W/T/L 30/54/16" in text and "0.840 [0.756, 0.899]" in text
    assert "p = 0.054" in text
    assert render_summary_table({}) == "(no metrics)"


def _chromium() -> str | None:
    return shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )


@pytest.mark.browser
def test_report_renders_in_chromium(report: Path):
    executable = _chromium()
    if executable is None:
        pytest.skip("no chromium binary on PATH or at /usr/bin/chromium (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")

    external_requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: external_requests.append(r.url)
                    if not r.url.startswith(("data:", "file:")) else None)
            page.goto(report.as_uri())
            page.wait_for_load_state("load")

            plots = page.eval_on_selector_all(
                "img.plot", "imgs => imgs.map(i => ({id: i.id, complete: i.complete, w: i.naturalWidth}))"
            )
            assert {p["id"] for p in plots} == {"plot-win-tie-loss", "plot-curves", "plot-toxicity"}
            assert all(p["complete"] and p["w"] > 0 for p in plots), plots

            assert page.locator("#summary-table tbody tr").count() == 12
            assert page.locator("#summary-table thead th").all_inner_texts() == ["metric", "sft", "ppo"]
            assert page.locator("#pairwise-table tbody tr").count() == 1
            assert page.locator("#samples-table tbody tr").count() == 3
            # escaped text shows up as text, and no script element was created from it
            assert INJECTION in page.locator("#samples-table").inner_text()
            assert page.locator("script").count() == 0

            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    assert external_requests == []
    assert SCREENSHOT.stat().st_size > 0
