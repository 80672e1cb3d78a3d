"""The app as a labeler uses it: Debian's Chromium, headless, driven by Playwright.

Screenshots go to test-output/feedback/<test>/. With ALIGNKIT_UPDATE_SCREENSHOT=1
the ranking screenshot also replaces docs/images/ranking-task.png.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from alignkit.feedback.storage import Store

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "ranking-task.png"

SKY = {
    "id": "sky",
    "prompt": "Explain to a ten-year-old why the sky is blue.",
    "completions": [
        "Sunlight looks white but is made of all the colours. When it hits the air, the tiny gas molecules "
        "bounce the blue light around much more than the red light, so blue comes at you from every part "
        "of the sky. That scattered blue light is what you see when you look up.",
        "Because the sky reflects the ocean, which is blue.",
        "Light from the Sun is a mix of colours. Air scatters short wavelengths (blue) more strongly than long "
        "ones (red) - this is called Rayleigh scattering - so the sky looks blue. At sunset the light travels "
        "through more air, the blue is scattered away, and the reds and oranges are left.",
        "The sky is blue. Blue blue blue. It is the colour of the sky because it is blue.",
    ],
}
XSS_PROMPT = 'Summarise this page: <script>document.title="pwned"; alert(1)</script>'


@pytest.fixture(scope="module")
def chromium():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/services.sh does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _wait_next_item(page, item_id: str) -> None:
    page.wait_for_function("id => document.querySelector('#task')?.dataset.itemId !== id", arg=item_id)


def _ranks_of(db_url: str, labeler: str) -> dict[str, object]:
    store = Store(db_url)
    _, records = store.project_records("ranking-demo")
    store.close()
    return {r.ext_id: (lab.ranks, lab.cant_rank) for r in records for lab in r.labels if lab.labeler == labeler}


def test_ranking_by_keyboard_and_drag(tmp_path, chromium, live_server, output_dir, fb):
    db_url = f"sqlite:///{tmp_path / 'browser.db'}"
    src = tmp_path / "gen.jsonl"
    lines = [json.dumps(SKY)] + fb.ranking_lines(2) + [json.dumps({"id": "xss", "prompt": XSS_PROMPT, "completions": ["a", "b", "c"]})]
    src.write_text("\n".join(lines) + "\n")
    store = Store(db_url)
    from alignkit.feedback.items import read_project_file

    store.create_project("ranking-demo", read_project_file(src, "ranking"), overlap=1)
    token = store.invite("ranking-demo", "ann")
    store.close()
    server = live_server(db_url)

    page = chromium.new_page(viewport={"width": 1280, "height": 680})
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{server.url}/l/{token}")

    # 1. The sky item, 3 > 1 > 2 = 4, typed as 3, 1, 2, "=", 4 (the "=" ties 4 with 2).
    item = page.locator("#task").get_attribute("data-item-id")
    assert page.locator("#prompt-text").inner_text() == SKY["prompt"]
    for key in ["3", "1", "2", "=", "4"]:
        page.keyboard.press(key)
    assert page.locator("#rank-list .rank-row").count() == 3
    assert "Ranking complete" in page.locator("#status").inner_text()
    page.screenshot(path=str(output_dir / "1-ranking-task.png"))
    if os.environ.get("ALIGNKIT_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(DOCS_SCREENSHOT))
    # Guidelines are one key (or click) away, and Escape brings the task back.
    page.keyboard.press("g")
    assert page.locator("#guidelines-dialog").is_visible()
    assert "Ties: use them sparingly" in page.locator("#guidelines-dialog").inner_text()
    page.screenshot(path=str(output_dir / "2-guidelines.png"))
    page.keyboard.press("Escape")
    assert not page.locator("#guidelines-dialog").is_visible()
    page.keyboard.press("Enter")
    _wait_next_item(page, item)

    # 2. Second item: a slip, undone with Backspace; Enter places the last one.
    item = page.locator("#task").get_attribute("data-item-id")
    for key in ["4", "4", "Backspace", "2", "1", "3"]:
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    _wait_next_item(page, item)

    # 3. Third item: flagged as can't rank.
    item = page.locator("#task").get_attribute("data-item-id")
    page.keyboard.press("x")
    assert "can't rank" in page.locator("#status").inner_text()
    page.keyboard.press("Enter")
    _wait_next_item(page, item)

    # 4. The hostile prompt is shown as text and runs nothing. Ranked by dragging.
    item = page.locator("#task").get_attribute("data-item-id")
    assert page.locator("#prompt-text").inner_text() == XSS_PROMPT
    assert page.title() != "pwned"
    page.drag_and_drop("#completion-2", "#drop-next")
    page.drag_and_drop("#completion-3", "#drop-next")
    page.drag_and_drop("#completion-1", ".rank-row[data-group='1'] .tie-zone")  # 1 ties with 3
    assert page.locator("#rank-list .rank-row").count() == 2
    page.screenshot(path=str(output_dir / "3-dragged.png"))
    page.keyboard.press("Enter")
    _wait_next_item(page, item)

    assert "All done" in page.content()
    page.screenshot(path=str(output_dir / "4-all-done.png"))
    assert dialogs == []

    ranks = _ranks_of(db_url, "ann")
    assert ranks["sky"] == ([2, 3, 1, 3], False)  # 3 best; 1 second; 2 and 4 tied behind
    assert ranks["r0"] == ([2, 1, 3, 4], False)
    assert ranks["r1"] == (None, True)
    assert ranks["xss"] == ([2, 1, 2], False)

    # Changing a label: "My labels" -> Change -> new ranking replaces the old one.
    page.goto(f"{server.url}/mine")
    page.screenshot(path=str(output_dir / "5-my-labels.png"))
    page.goto(f"{server.url}/task/{item}")
    assert page.locator("#rank-list .rank-row").count() == 2  # the saved ranking is shown
    page.click("#clear")
    for key in ["1", "2", "3", "Enter"]:
        page.keyboard.press(key)
    page.wait_for_url("**/mine")
    assert _ranks_of(db_url, "ann")["xss"] == ([1, 2, 3], False)
    page.close()


def test_pairwise_evaluation_by_keyboard(tmp_path, chromium, live_server, output_dir, fb):
    db_url = f"sqlite:///{tmp_path / 'pair.db'}"
    store = Store(db_url)
    from alignkit.feedback.items import parse_project_lines

    store.create_project("human-eval", parse_project_lines(fb.pairwise_lines(2), "pairwise", "eval.jsonl"), overlap=1)
    token = store.invite("human-eval", "bob")
    store.close()
    server = live_server(db_url)

    page = chromium.new_page(viewport={"width": 1280, "height": 700})
    page.goto(f"{server.url}/l/{token}")
    html = page.content()
    assert "sft-model" not in html and "rlhf-model" not in html
    picked = []
    for _ in range(2):
        item = page.locator("#task").get_attribute("data-item-id")
        left = page.locator("#response-A .text").inner_text()
        picked.append("model_b" if left.startswith("rlhf") else "model_a")  # choose A, whichever model it is
        page.keyboard.press("a")
        assert "A is better" in page.locator("#status").inner_text()
        page.screenshot(path=str(output_dir / f"pair-{item}.png"))
        page.keyboard.press("Enter")
        _wait_next_item(page, item)
    assert "All done" in page.content()
    page.close()

    resp = httpx.get(f"{server.url}/api/projects/human-eval/export/winloss.jsonl",
                     headers={"Authorization": f"Bearer {fb.ADMIN_TOKEN}"})
    winners = [json.loads(line)["winner"] for line in resp.text.splitlines()]
    assert winners == picked
