"""Bad input to the two HTTP servers and the feedback CLI, class by class: a 400 naming the field
(never a 500), a one-line error (never a traceback), and no password in any message."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

JSON = {"content-type": "application/json"}
HI = [{"role": "user", "content": "Hi"}]


# --------------------------------------------------------------------------- alignkit serve


@pytest.fixture(scope="module")
def serve():
    from fastapi.testclient import TestClient

    from alignkit.config import ModelConfig
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.recipes.serve import create_app

    tok = load_tokenizer("tiny:llama")
    model = load_causal_lm(ModelConfig(name="tiny:llama"), trainable=False, tokenizer=tok)
    return TestClient(create_app(model, tok, "tiny", max_request_bytes=4000), raise_server_exceptions=False)


def _refused(resp, param):
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["message"].startswith(f"{param}: "), error
    return error


@pytest.mark.parametrize("content, param", [
    ([{"type": "text", "text": 5}], "messages.0.content.0.text"),
    ([{"type": "text", "text": None}], "messages.0.content.0.text"),
    ([{"type": "text", "text": ["a"]}], "messages.0.content.0.text"),
    ([{"type": "text"}], "messages.0.content.0.text"),
    ([{"text": "hi"}], "messages.0.content.0.type"),
    ([{"type": 3, "text": "hi"}], "messages.0.content.0.type"),
    (["hi"], "messages.0.content.0"),
    ([5], "messages.0.content.0"),
    ({"type": "text", "text": "hi"}, "messages.0.content"),
    (5, "messages.0.content"),
    (None, "messages.0.content"),
])
def test_serve_content_that_is_not_text_or_text_parts_is_400_naming_the_field(serve, content, param):
    _refused(serve.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]}), param)


def test_serve_reads_text_parts_and_passes_over_other_parts(serve):
    content = [{"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "Hi"}]
    resp = serve.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], "max_tokens": 1})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("body, param", [
    (r'{"messages": [{"role": "user", "content": "\ud800"}]}', "messages.0.content"),
    (r'{"messages": [{"role": "user", "content": "Hi \udfff there"}]}', "messages.0.content"),
    (r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}', "messages.0.content.0.text"),
    (r'{"messages": [{"role": "us\ud800er", "content": "Hi"}]}', "messages.0.role"),
    (r'{"messages": [{"role": "user", "content": "Hi"}], "stop": ["ok", "\ud800"]}', "stop.1"),
    (r'{"messages": [{"role": "user", "content": "Hi"}], "model": "\ud800"}', "model"),
    (r'{"messages": [{"role": "user", "content": "Hi"}], "user": "\ud800"}', "user"),  # an ignored field too
    (r'{"messages": [{"role": "user", "content": "Hi", "\ud800": 1}]}', "messages.0 (a key)"),
    (b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', "messages.0.content"),  # raw surrogate bytes
])
def test_serve_refuses_strings_utf8_cannot_encode_naming_the_field(serve, body, param):
    error = _refused(serve.post("/v1/chat/completions", content=body, headers=JSON), param)
    assert "surrogate" in error["message"]


def test_serve_takes_escaped_text_that_is_valid(serve):
    body = r'{"messages": [{"role": "user", "content": "caf\u00e9 \ud83d\ude00"}], "max_tokens": 1}'
    assert serve.post("/v1/chat/completions", content=body, headers=JSON).status_code == 200


def test_serve_body_errors_are_4xx_in_openai_shape(serve):
    resp = serve.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "\xff"}]}',
                      headers=JSON)
    assert resp.status_code == 400 and "not UTF-8" in resp.json()["error"]["message"]

    def chunks():  # a streamed body over the limit
        yield b'{"messages": [{"role": "user", "content": "'
        yield b"x" * 5000
        yield b'"}]}'

    resp = serve.post("/v1/chat/completions", content=chunks(), headers=JSON)
    assert resp.status_code == 413 and "larger than" in resp.json()["error"]["message"]
    assert serve.get("/v1/nothing-here").json()["error"]["message"] == "Not Found"


# --------------------------------------------------------------------------- the feedback app


@pytest.fixture
def feedback(tmp_path):
    from fastapi.testclient import TestClient

    from alignkit.feedback.config import LabelConfig
    from alignkit.feedback.items import parse_project_lines
    from alignkit.feedback.server import create_app
    from alignkit.feedback.storage import Store

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    lines = [json.dumps({"id": "a", "prompt": "p", "completions": ["x", "y"]})]
    store.create_project("p", parse_project_lines(lines, "ranking", "t.jsonl"), 1)
    token = store.invite("p", "ann")
    client = TestClient(create_app(LabelConfig(admin_token="admin"), store=store), raise_server_exceptions=False)
    yield client, store, {**JSON, "authorization": f"Bearer {token}"}, {**JSON, "authorization": "Bearer admin"}
    store.close()


@pytest.mark.parametrize("method, path, body, who, field", [
    ("post", "/api/labels", r'{"item_id": 1, "ranks": [1, 2], "submission_id": "\ud800"}', "labeler", "submission_id"),
    ("post", "/api/labels", r'{"item_id": 1, "ranks": [1, 2], "submission_id": "ok\udc00"}', "labeler", "submission_id"),
    ("post", "/api/labels", r'{"item_id": 1, "ranks": [1, 2], "\ud800": 1}', "labeler", "body (a key)"),
    ("post", "/api/labels", r'{"item_id": 1, "choice": "\udbff"}', "labeler", "choice"),
    ("post", "/api/projects/p/labelers", r'{"labeler": "b\ud800ob"}', "admin", "labeler"),
    ("post", "/api/projects/p/labelers", b'{"labeler": "b\xed\xb0\x80ob"}', "admin", "labeler"),
    ("patch", "/api/projects/p", r'{"overlap": "\ud800"}', "admin", "overlap"),
])
def test_feedback_app_refuses_strings_utf8_cannot_encode_naming_the_field(feedback, method, path, body, who, field):
    client, store, labeler, admin = feedback
    resp = client.request(method, path, content=body, headers=labeler if who == "labeler" else admin)
    assert resp.status_code == 400, resp.text
    assert resp.json()["detail"].startswith(f"{field}: not valid text")
    summary = store.project_summary("p")
    assert (summary.n_labels, summary.n_labelers, summary.overlap) == (0, 1, 1)  # nothing was stored


def test_feedback_app_takes_escaped_text_that_is_valid(feedback):
    client, store, labeler, admin = feedback
    resp = client.post("/api/projects/p/labelers", content=r'{"labeler": "Zo\u00eb \ud83d\ude00"}', headers=admin)
    assert resp.status_code == 200 and resp.json()["labeler"] == "Zoë \U0001F600"
    resp = client.post("/api/labels", content=r'{"item_id": 1, "ranks": [1, 2], "submission_id": "s\u00e9"}',
                       headers=labeler)
    assert resp.status_code == 200 and resp.json()["status"] == "created"


# --------------------------------------------------------------------------- the feedback CLI


def _label(capsys, *argv) -> tuple[int, str, str]:
    from alignkit.feedback.cli import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    if code:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return code, out, err


@pytest.fixture
def project_db(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"prompt": "p", "completions": ["x", "y"]}) + "\n")
    assert _label(capsys, "create-project", "--db", db, "--file", str(items), "--kind", "ranking", "--name", "p")[0] == 0
    return db, items


NOT_UTF8 = os.fsdecode(b"b\xffob")  # how Python hands over argument bytes the locale cannot decode


@pytest.mark.parametrize("command, flag", [
    ("invite", "--labeler"),
    ("invite", "--project"),
    ("invite", "--base-url"),
    ("create-project", "--name"),
    ("export", "--project"),
])
def test_label_cli_refuses_names_that_are_not_utf8(capsys, tmp_path, project_db, command, flag):
    db, items = project_db
    args = {"invite": {"--project": "p", "--labeler": "ann"},
            "create-project": {"--file": str(items), "--kind": "ranking", "--name": "q"},
            "export": {"--project": "p", "--out": str(tmp_path / "out")}}[command]
    args[flag] = NOT_UTF8
    code, _, err = _label(capsys, command, "--db", db, *[x for kv in args.items() for x in kv])
    assert code == 2 and f"error: {flag}: not valid text" in err


def test_label_cli_takes_a_project_file_whose_name_is_not_utf8(capsys, tmp_path, project_db):
    db, items = project_db
    odd = tmp_path / os.fsdecode(b"items-\xff.jsonl")
    try:
        odd.write_bytes(items.read_bytes())
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only valid names")
    code, out, err = _label(capsys, "create-project", "--db", db, "--file", str(odd), "--kind", "ranking", "--name", "q")
    assert code == 0 and "created project 'q'" in out, err


# --------------------------------------------------------------------------- --db URLs


@pytest.mark.parametrize("make_url, expected", [
    (lambda d: f"sqlite:///{d / 'x.db'}?timeout=abc", "could not convert string to float"),
    (lambda d: f"sqlite:///{d / 'x.db'}?check_same_thread=maybe", "true/false"),
    (lambda d: f"sqlite:///{d / 'x.db'}?cached_statements=many", "cannot open the database"),
    (lambda d: "sqlite:///" + str(d / NOT_UTF8), "--db: not valid text"),
    (lambda d: "postgresql://u:secret@h:notaport/db", "not a database URL"),
    (lambda d: "postgresql+psycopg://u:secret@[::1/db", "not a database URL"),
    (lambda d: "postgresql+psycopg://u:p%40secret@127.0.0.1:9/db", "cannot open the database"),
    (lambda d: "postgresql+psycopg://u@127.0.0.1:9/db?password=secret", "cannot open the database"),
    (lambda d: "postgresql+psycopg://u:secret@127.0.0.1:9/db?connect_timeout=abc", "cannot open the database"),
    (lambda d: "nosuchdialect://u:sec@ret@h/db", "cannot use this database"),  # an unescaped '@' in the password
    (lambda d: "notaurl u:secret@", "not a database URL"),
    (lambda d: "u:secret@h/db", "not a database URL"),  # no scheme
])
def test_db_urls_that_cannot_be_opened_are_one_line_errors_without_the_password(tmp_path, capsys, make_url, expected):
    code, _, err = _label(capsys, "status", "--db", make_url(tmp_path))
    assert code == 2 and expected in err, err
    assert "secret" not in err and "sec@" not in err and "ret@" not in err


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://u:secret@db.example:5432/labels", "postgresql+psycopg://u:***@db.example:5432/labels"),
    ("postgresql://u:secret@h:notaport/db", "postgresql://u:***@h:notaport/db"),  # does not parse
    ("postgresql+psycopg://u@h/db?password=secret&sslmode=require", "postgresql+psycopg://u@h/db?password=***&sslmode=require"),
    ("nosuchdialect://u:sec@ret@h/db", "nosuchdialect://u:***@***@h/db"),
    ("u:secret@h/db", "u:***@h/db"),
    ("sqlite:///runs/feedback/feedback.db", "sqlite:///runs/feedback/feedback.db"),
])
def test_shown_db_urls_hide_the_password(url, shown):
    from alignkit.feedback.storage import shown_url

    assert shown_url(url) == shown


def test_label_serve_prints_its_database_without_the_password(capsys, monkeypatch):
    import uvicorn

    from alignkit.feedback import server

    monkeypatch.setattr(server, "create_app", lambda config: None)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: None)
    monkeypatch.setenv("ALIGNKIT_ADMIN_TOKEN", "admin")
    code, out, _ = _label(capsys, "serve", "--db", "postgresql+psycopg://u:secret@127.0.0.1:9/db")
    assert code == 0 and "postgresql+psycopg://u:***@127.0.0.1:9/db" in out and "secret" not in out
