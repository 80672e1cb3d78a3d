"""The HTTP API and pages, in process: auth, hidden models, escaping, size limits, schema."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from alignkit.feedback.config import LabelConfig
from alignkit.feedback.server import create_app

XSS = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'


@pytest.fixture
def app(tmp_path, fb):
    config = LabelConfig(db_url=f"sqlite:///{tmp_path / 'api.db'}", admin_token=fb.ADMIN_TOKEN,
                         max_request_bytes=4096, max_upload_bytes=64 * 1024)
    return create_app(config)


@pytest.fixture
def admin(app, fb):
    with TestClient(app, headers={"Authorization": f"Bearer {fb.ADMIN_TOKEN}"}) as c:
        yield c


def _create(admin, name, kind, lines, overlap=2):
    files = {"file": (f"{name}.jsonl", ("\n".join(lines) + "\n").encode(), "application/jsonl")}
    return admin.post("/api/projects", data={"name": name, "kind": kind, "overlap": str(overlap)}, files=files)


def _labeler(app, admin, project, name):
    resp = admin.post(f"/api/projects/{project}/labelers", json={"labeler": name})
    assert resp.status_code == 200, resp.text
    assert resp.json()["link"].endswith("/l/" + resp.json()["token"])
    return TestClient(app, headers={"Authorization": f"Bearer {resp.json()['token']}"})


def test_a_script_can_do_everything_the_pages_do(app, admin, fb):
    resp = _create(admin, "round1", "ranking", fb.ranking_lines(3, k=3))
    assert resp.status_code == 200, resp.text
    assert resp.json()["n_items"] == 3
    ann = _labeler(app, admin, "round1", "ann")
    assert ann.get("/api/me").json() == {"labeler": "ann", "project": "round1", "kind": "ranking", "done": 0, "open": 0}
    tasks = ann.get("/api/tasks", params={"limit": 3}).json()["tasks"]
    assert [t["prompt"] for t in tasks] == ["Prompt number 0", "Prompt number 1", "Prompt number 2"]
    for t in tasks:
        resp = ann.post("/api/labels", json={"item_id": t["item_id"], "ranks": [3, 1, 2], "submission_id": "x" + str(t["item_id"])})
        assert resp.json()["status"] == "created"
    assert ann.get(f"/api/tasks/{tasks[0]['item_id']}").json()["my_label"] == {"ranks": [3, 1, 2], "cant_rank": False}
    assert len(ann.get("/api/labels").json()["labels"]) == 3

    assert admin.patch("/api/projects/round1", json={"overlap": 1}).json()["n_items_complete"] == 3
    assert admin.get("/api/projects").json()[0]["progress"] == 1.0
    assert admin.get("/api/projects/round1/agreement").json()["items_with_2plus_labels"] == 0
    assert admin.get("/api/projects/round1/export").json()["preference_pairs"] == 9
    prefs = admin.get("/api/projects/round1/export/preferences.jsonl")
    assert prefs.headers["content-type"].startswith("application/x-ndjson")
    assert json.loads(prefs.text.splitlines()[0]) == {
        "prompt": "Prompt number 0", "chosen": "completion 1 of prompt 0", "rejected": "completion 0 of prompt 0", "margin": 2.0,
    }
    assert admin.get("/api/projects/round1/export/nope.jsonl").status_code == 404


def test_openapi_schema_lists_the_api(app):
    with TestClient(app) as c:
        paths = c.get("/openapi.json").json()["paths"]
    for path in ("/api/tasks", "/api/labels", "/api/projects", "/api/projects/{name}/labelers", "/api/projects/{name}/export/{file}"):
        assert path in paths
    assert "/task" not in paths  # pages are not API


def test_auth_boundaries(app, admin, fb):
    _create(admin, "p", "ranking", fb.ranking_lines(2))
    _create(admin, "q", "ranking", fb.ranking_lines(2))
    ann = _labeler(app, admin, "p", "ann")
    bob = _labeler(app, admin, "p", "bob")
    eve = _labeler(app, admin, "q", "eve")
    with TestClient(app) as anon:
        assert anon.get("/api/tasks").status_code == 401
        assert anon.get("/api/projects").status_code == 401
        assert anon.get("/api/tasks", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert ann.get("/api/projects").status_code == 401  # a labeler token is not the admin token
    assert ann.get("/api/projects/p/export/rankings.jsonl").status_code == 401

    item = ann.get("/api/tasks").json()["tasks"][0]["item_id"]
    ann.post("/api/labels", json={"item_id": item, "ranks": [1, 2, 3, 4]})
    # Bob sees the item, but not Ann's label on it; his own list is empty.
    assert bob.get(f"/api/tasks/{item}").json()["my_label"] is None
    assert bob.get("/api/labels").json() == {"labels": []}
    # Bob's label is his own row; Ann's is untouched.
    bob.post("/api/labels", json={"item_id": item, "ranks": [4, 3, 2, 1]})
    assert ann.get(f"/api/tasks/{item}").json()["my_label"]["ranks"] == [1, 2, 3, 4]
    # Another project's labeler cannot see or label it.
    assert eve.get(f"/api/tasks/{item}").status_code == 404
    assert eve.post("/api/labels", json={"item_id": item, "ranks": [1, 2, 3, 4]}).status_code == 404
    assert ann.post("/api/labels", json={"item_id": item, "ranks": [1, 2, 3, 4], "labeler": "bob"}).status_code == 422


def test_pairwise_model_names_never_reach_labelers(app, admin, fb):
    _create(admin, "h", "pairwise", fb.pairwise_lines(6), overlap=1)
    ann = _labeler(app, admin, "h", "ann")
    seen = [ann.get("/api/tasks", params={"limit": 6}).text, ann.get("/api/me").text]
    tasks = ann.get("/api/tasks", params={"limit": 6}).json()["tasks"]
    for t in tasks:
        seen.append(ann.post("/api/labels", json={"item_id": t["item_id"], "choice": "tie"}).text)
        seen.append(ann.get(f"/api/tasks/{t['item_id']}").text)
        seen.append(ann.get(f"/task/{t['item_id']}").text)
    seen.append(ann.get("/api/labels").text)
    seen.append(ann.get("/mine").text)
    for text in seen:
        assert "sft-model" not in text and "rlhf-model" not in text and "model_a" not in text
    assert ann.post("/api/labels", json={"item_id": tasks[0]["item_id"], "ranks": [1, 2]}).status_code == 422
    # The admin does see them, and the export maps choices back to names.
    assert "rlhf-model" in admin.get("/api/projects/h").text


def test_untrusted_text_is_escaped_and_scripts_are_forbidden(app, admin, fb):
    lines = fb.ranking_lines(1, k=2, prompt=XSS)
    line = json.loads(lines[0])
    line["completions"][1] = XSS
    _create(admin, "x", "ranking", [json.dumps(line)])
    ann = _labeler(app, admin, "x", "ann")
    token = ann.headers["authorization"].split()[1]
    with TestClient(app) as browser:
        page = browser.get(f"/l/{token}", follow_redirects=True)
        assert page.status_code == 200
        assert "<script>alert" not in page.text and "<img src=x" not in page.text
        assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"  # the invite token stays out of Referer


def test_guidelines_markdown_raw_html_is_shown_as_text(app, admin, fb):
    files = {
        "file": ("g.jsonl", "\n".join(fb.ranking_lines(1)).encode(), "application/jsonl"),
        "guidelines_file": ("g.md", b"# Our rules\n\n<script>alert(1)</script> [x](javascript:alert(1))", "text/markdown"),
    }
    assert admin.post("/api/projects", data={"name": "g", "kind": "ranking"}, files=files).status_code == 200
    ann = _labeler(app, admin, "g", "ann")
    assert ann.get("/api/guidelines").json()["markdown"].startswith("# Our rules")
    token = ann.headers["authorization"].split()[1]
    with TestClient(app) as browser:
        browser.get(f"/l/{token}")
        html = browser.get("/guidelines").text
        assert "<h1>Our rules</h1>" in html
        assert "&lt;script&gt;" in html and "<script>alert" not in html and "javascript:" not in html
        task_page = browser.get("/task").text
        assert 'id="guidelines-dialog"' in task_page and "<h1>Our rules</h1>" in task_page  # one click away
    with TestClient(app) as anon:
        assert "Labeling guidelines" in anon.get("/guidelines").text  # the default ones


def test_request_size_limits(app, admin, fb):
    _create(admin, "s", "ranking", fb.ranking_lines(1))
    ann = _labeler(app, admin, "s", "ann")
    big = {"item_id": 1, "ranks": [1, 2, 3, 4], "submission_id": "x" * 8000}
    assert ann.post("/api/labels", json=big).status_code == 413

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 1000
    assert ann.post("/api/labels", content=chunks(), headers={"content-type": "application/json"}).status_code == 413
    resp = _create(admin, "huge", "ranking", fb.ranking_lines(1000))
    assert resp.status_code == 413
    assert "huge" not in [p["name"] for p in admin.get("/api/projects").json()]


def test_bad_upload_names_file_line_and_field(admin, fb):
    lines = fb.ranking_lines(2)
    lines[1] = '{"prompt": "q", "completions": ["only one"]}'
    resp = _create(admin, "bad", "ranking", lines)
    assert resp.status_code == 422
    assert resp.json()["detail"] == "bad.jsonl:line 2: field 'completions': needs 2 to 9 completions, got 1"
    assert _create(admin, "not/ok", "ranking", fb.ranking_lines(1)).status_code == 422
    assert _create(admin, "dup", "ranking", fb.ranking_lines(1)).status_code == 200
    assert _create(admin, "dup", "ranking", fb.ranking_lines(1)).status_code == 409


def test_admin_pages_and_cross_site_requests(app, fb):
    with TestClient(app) as browser:
        assert "Admin token" in browser.get("/admin").text
        assert browser.post("/admin/login", data={"token": "wrong"}).status_code == 401
        resp = browser.post("/admin/login", data={"token": fb.ADMIN_TOKEN})
        assert resp.status_code == 200 and "New project" in resp.text
        files = {"file": ("c.jsonl", "\n".join(fb.ranking_lines(2)).encode(), "application/jsonl")}
        # The admin cookie works for the API, but not from another site.
        evil = browser.post("/api/projects", data={"name": "c", "kind": "ranking"}, files=files,
                            headers={"Origin": "http://evil.example"})
        assert evil.status_code == 403
        ok = browser.post("/api/projects", data={"name": "c", "kind": "ranking"}, files=files,
                          headers={"Origin": "http://testserver"})
        assert ok.status_code == 200
        page = browser.get("/admin/projects/c").text
        assert "Labels" in page and "rankings.jsonl" in page and "krippendorff alpha ordinal" in page


def test_labeler_pages(app, admin, fb):
    _create(admin, "pages", "ranking", fb.ranking_lines(1), overlap=1)
    ann = _labeler(app, admin, "pages", "ann")
    token = ann.headers["authorization"].split()[1]
    with TestClient(app) as browser:
        assert browser.get("/task").status_code == 401
        assert browser.get("/l/not-a-token").status_code == 404
        page = browser.get(f"/l/{token}", follow_redirects=True)
        assert 'data-page="ranking"' in page.text
        assert 'id="completion-4"' in page.text
        item = int(page.text.split('data-item-id="')[1].split('"')[0])
        # The page's script posts JSON with the cookie; a foreign origin is refused.
        assert browser.post("/api/labels", json={"item_id": item, "ranks": [1, 2, 3, 4]},
                            headers={"Origin": "http://evil.example"}).status_code == 403
        assert browser.post("/api/labels", json={"item_id": item, "ranks": [1, 2, 3, 4]}).status_code == 200
        assert "All done" in browser.get("/task").text
        assert "Change" in browser.get("/mine").text
        assert 'data-ranks="[1, 2, 3, 4]"' in browser.get(f"/task/{item}").text
