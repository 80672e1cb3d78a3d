"""Bad input to the feedback app and ``alignkit serve`` found by probing, class by class.

Each class was a 500, a traceback, a silent drop or a false success before its fix:

1. JSON types read loosely: ``true`` taken as rank 1, overlap 1, n=1 or temperature 1.0, ``"yes"``
   as ``cant_rank``/``stream``, ``"5"`` as a number; now a 4xx naming the field (both servers).
2. A ``submission_id`` used again for another item: answered "unchanged" and the label never
   stored; now 409 naming the id.
3. ``label create-project --overlap`` past a 64-bit integer: a traceback from the database driver;
   now one line, exit 2, in the range the API takes.
4. ``label export --out`` that is a file, or whose target file is a folder: a traceback, after some
   files were already replaced; now one line, exit 2, and nothing written.
5. A project uploaded over HTTP split at U+2028 / U+0085 (valid inside a JSON string), refused a
   byte-order mark the CLI takes, and named no line for bytes that are not UTF-8; guidelines that
   are not UTF-8 were stored with U+FFFD put in silently. Now read as the CLI reads files.
6. Text PostgreSQL's text columns cannot hold (NUL) or that names nobody (control characters,
   only invisible characters) in labeler names, item ids, model names and guidelines: stored
   (PostgreSQL: a driver error, 500); now refused naming the field (and line).
7. An export item whose completions all tie gave no pair and was counted nowhere; now
   ``dropped_all_tied``.
8. serve: a body that is not JSON reported a character offset as the field (``param: "1"``); a bad
   ``stop`` named the union's member (``stop.str``); a request for another model was answered by
   this one under that name; ``logprobs``, ``tools``, ``response_format``, penalties and
   ``logit_bias`` were ignored while the answer claimed success. Now 400/404 naming the field.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

JSON = {"content-type": "application/json"}
HI = [{"role": "user", "content": "Hi"}]


# --------------------------------------------------------------------------- the feedback app


@pytest.fixture
def app(tmp_path):
    from fastapi.testclient import TestClient

    from alignkit.feedback.config import LabelConfig
    from alignkit.feedback.items import parse_project_lines
    from alignkit.feedback.server import create_app
    from alignkit.feedback.storage import Store

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    lines = [json.dumps({"id": f"i{i}", "prompt": "p", "completions": ["x", "y", "z"]}) for i in range(2)]
    store.create_project("p", parse_project_lines(lines, "ranking", "t.jsonl"), 2)
    token = store.invite("p", "ann")
    client = TestClient(create_app(LabelConfig(admin_token="admin"), store=store), raise_server_exceptions=False)
    yield client, store, {"authorization": f"Bearer {token}"}, {"authorization": "Bearer admin"}
    store.close()


def _names_field(resp, field):
    assert 400 <= resp.status_code < 500, resp.text
    detail = resp.json()["detail"]
    if isinstance(detail, list):  # FastAPI's validation errors: the field is the last part of loc
        assert detail[0]["loc"][-1] == field or field in map(str, detail[0]["loc"]), detail
    else:
        assert field in detail, detail


@pytest.mark.parametrize("body, field", [
    ({"item_id": 1, "ranks": [True, 2, 3]}, 0),  # was stored as ranks [1, 2, 3]
    ({"item_id": 1, "ranks": ["1", "2", "3"]}, 0),
    ({"item_id": 1, "cant_rank": "yes"}, "cant_rank"),  # was stored as can't rank
    ({"item_id": 1, "cant_rank": 1}, "cant_rank"),
    ({"item_id": "1", "ranks": [1, 2, 3]}, "item_id"),
    ({"item_id": 1.0, "ranks": [1, 2, 3]}, "item_id"),
    ({"item_id": 1, "ranks": [1, 2, 3], "order": "5"}, "order"),
])
def test_label_fields_of_the_wrong_json_type_are_refused(app, body, field):
    client, store, labeler, _ = app
    resp = client.post("/api/labels", json=body, headers=labeler)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"][-1] == field
    assert store.project_summary("p").n_labels == 0


@pytest.mark.parametrize("method, path, body, field", [
    ("patch", "/api/projects/p", {"overlap": True}, "overlap"),  # was overlap 1
    ("patch", "/api/projects/p", {"overlap": "3"}, "overlap"),
])
def test_admin_fields_of_the_wrong_json_type_are_refused(app, method, path, body, field):
    client, store, _, admin = app
    resp = client.request(method, path, json=body, headers=admin)
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"][-1] == field, resp.text
    assert store.project_summary("p").overlap == 2


def test_a_submission_id_used_for_another_item_is_a_conflict_not_a_silent_drop(app):
    client, store, labeler, _ = app
    first = client.post("/api/labels", json={"item_id": 1, "ranks": [1, 2, 3], "submission_id": "s1"}, headers=labeler)
    assert first.json()["status"] == "created"
    resend = client.post("/api/labels", json={"item_id": 1, "ranks": [1, 2, 3], "submission_id": "s1"}, headers=labeler)
    assert resend.status_code == 200 and resend.json()["status"] == "unchanged"  # a retry stays a no-op
    other = client.post("/api/labels", json={"item_id": 2, "ranks": [3, 2, 1], "submission_id": "s1"}, headers=labeler)
    assert other.status_code == 409, other.text
    assert "submission_id 's1'" in other.json()["detail"] and "item 1" in other.json()["detail"]
    # with a new id the label is stored
    again = client.post("/api/labels", json={"item_id": 2, "ranks": [3, 2, 1], "submission_id": "s2"}, headers=labeler)
    assert again.json()["status"] == "created" and store.project_summary("p").n_labels == 2


def _upload(client, admin, data: bytes, name="u", guidelines: bytes | None = None, filename="items.jsonl"):
    files = {"file": (filename, data)}
    if guidelines is not None:
        files["guidelines_file"] = ("guide.md", guidelines)
    return client.post("/api/projects", data={"name": name, "kind": "ranking", "overlap": "1"}, files=files,
                       headers=admin)


def _line(i: int, prompt: str = "p") -> str:
    return json.dumps({"id": f"u{i}", "prompt": prompt, "completions": ["x", "y"]}, ensure_ascii=False)


def test_an_upload_is_split_into_lines_as_the_cli_reads_a_file(app):
    client, store, _, admin = app
    # U+2028, U+2029 and U+0085 are allowed raw in a JSON string; str.splitlines breaks lines at them
    text = "\n".join([_line(0, "a\u2028b"), _line(1, "c\u2029d\x85e"), _line(2)]) + "\n"
    resp = _upload(client, admin, b"\xef\xbb\xbf" + text.encode())  # with a byte-order mark, as the CLI takes
    assert resp.status_code == 200, resp.text
    assert resp.json()["n_items"] == 3
    records = store.project_records("u")[1]
    assert [r.prompt for r in records] == ["a\u2028b", "c\u2029d\x85e", "p"]


def test_an_upload_that_is_not_utf8_names_its_line(app):
    client, store, _, admin = app
    data = (_line(0) + "\n" + _line(1) + "\n").encode() + b'{"prompt": "\xff"}\n'
    resp = _upload(client, admin, data)
    assert resp.status_code == 422 and resp.json()["detail"].startswith("items.jsonl:line 3: not UTF-8"), resp.text
    assert "u" not in store.project_names()


@pytest.mark.parametrize("guidelines, problem", [
    (b"# Rules\n\nBe \xff kind", "line 3: not UTF-8"),  # was stored with U+FFFD in place of the byte
    (b"# Rules\x00", "NUL"),
])
def test_uploaded_guidelines_that_are_not_text_are_refused_naming_the_field(app, guidelines, problem):
    client, store, _, admin = app
    resp = _upload(client, admin, (_line(0) + "\n").encode(), guidelines=guidelines)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"].startswith("guidelines_file: ") and problem in resp.json()["detail"]
    assert "u" not in store.project_names()


@pytest.mark.parametrize("labeler", ["a\x00b", "bob\nalice", "tab\there", "\u200b", "\u200b\u200c "])
def test_labeler_names_with_control_or_only_invisible_characters_are_refused(app, labeler):
    client, store, _, admin = app
    resp = client.post("/api/projects/p/labelers", json={"labeler": labeler}, headers=admin)
    assert resp.status_code == 422 and resp.json()["detail"].startswith("labeler: "), resp.text
    assert store.project_summary("p").n_labelers == 1


def test_labeler_names_in_any_script_are_taken(app):
    client, _, _, admin = app
    resp = client.post("/api/projects/p/labelers", json={"labeler": "  Zoë 田中 \U0001F600 "}, headers=admin)
    assert resp.status_code == 200 and resp.json()["labeler"] == "Zoë 田中 \U0001F600"


@pytest.mark.parametrize("row, field", [
    ({"id": "a\x00b", "prompt": "p", "completions": ["x", "y"]}, "id"),
])
def test_item_ids_with_nul_are_refused_naming_line_and_field(row, field):
    from alignkit.errors import DataError
    from alignkit.feedback.items import parse_project_lines

    lines = [_line(0), json.dumps(row)]
    with pytest.raises(DataError, match=rf"t\.jsonl:line 2: field '{field}': holds a NUL"):
        parse_project_lines(lines, "ranking", "t.jsonl")


def test_model_names_with_nul_are_refused_naming_line_and_field():
    from alignkit.errors import DataError
    from alignkit.feedback.items import parse_project_lines

    row = {"prompt": "p", "response_a": "x", "response_b": "y", "model_a": "m\x00", "model_b": "n"}
    with pytest.raises(DataError, match=r"t\.jsonl:line 1: field 'model_a': holds a NUL"):
        parse_project_lines([json.dumps(row)], "pairwise", "t.jsonl")


def test_an_item_whose_completions_all_tie_is_counted_in_the_export_summary(app):
    from alignkit.feedback.export import build_export

    client, store, labeler, _ = app
    assert client.post("/api/labels", json={"item_id": 1, "ranks": [2, 2, 2]}, headers=labeler).status_code == 200
    assert client.post("/api/labels", json={"item_id": 2, "ranks": [1, 2, 3]}, headers=labeler).status_code == 200
    summary, _ = build_export(store, "p")
    assert summary["items_labeled"] == 2 and summary["preference_pairs"] == 3
    assert summary["dropped_all_tied"] == 1 and summary["dropped_cant_rank"] == 0


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
def labelled_db(tmp_path, capsys):
    from alignkit.feedback.storage import Store

    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    items = tmp_path / "items.jsonl"
    items.write_text(_line(0) + "\n" + _line(1) + "\n")
    assert _label(capsys, "create-project", "--db", db, "--file", str(items), "--kind", "ranking", "--name", "p")[0] == 0
    store = Store(db)
    token = store.invite("p", "ann")
    store.submit(store.labeler_for_token(token), 1, ranks=[1, 2])
    store.close()
    return db, items


@pytest.mark.parametrize("overlap", ["0", "1001", "99999999999999999999"])  # the last was a traceback
def test_create_project_overlap_out_of_range_is_one_line_exit_2(capsys, labelled_db, overlap):
    db, items = labelled_db
    code, _, err = _label(capsys, "create-project", "--db", db, "--file", str(items), "--kind", "ranking",
                          "--name", "q", "--overlap", overlap)
    assert code == 2 and "overlap must be an integer from 1 to 1000" in err


def test_export_to_a_file_is_one_line_exit_2(capsys, tmp_path, labelled_db):
    db, items = labelled_db
    code, _, err = _label(capsys, "export", "--db", db, "--project", "p", "--out", str(items))
    assert code == 2 and f"--out {items}: is a file" in err
    assert items.read_text().startswith('{"id": "u0"')  # untouched


def test_export_whose_target_is_a_folder_writes_nothing(capsys, tmp_path, labelled_db):
    db, _ = labelled_db
    out = tmp_path / "out"
    (out / "preferences.jsonl").mkdir(parents=True)
    (out / "rankings.jsonl").write_text("an older export\n")
    code, _, err = _label(capsys, "export", "--db", db, "--project", "p", "--out", str(out))
    assert code == 2 and "preferences.jsonl is a folder" in err
    # nothing replaced, no temporary files left
    assert (out / "rankings.jsonl").read_text() == "an older export\n"
    assert sorted(p.name for p in out.iterdir()) == ["preferences.jsonl", "rankings.jsonl"]
    code, out_text, _ = _label(capsys, "export", "--db", db, "--project", "p", "--out", str(tmp_path / "new" / "dir"))
    assert code == 0 and json.loads(out_text)["labels"] == 1


# --------------------------------------------------------------------------- alignkit serve


@pytest.fixture(scope="module")
def serve():
    from fastapi.testclient import TestClient

    from alignkit.config import ModelConfig
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.recipes.serve import create_app

    tok = load_tokenizer("tiny:llama")
    model = load_causal_lm(ModelConfig(name="tiny:llama"), trainable=False, tokenizer=tok)
    return TestClient(create_app(model, tok, "tiny"), raise_server_exceptions=False)


def _serve_refused(resp, param, status=400):
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param, error
    if param:
        assert error["message"].startswith(f"{param}: "), error
    return error


@pytest.mark.parametrize("extra, param", [
    ({"n": True}, "n"),  # was n=1
    ({"n": "2"}, "n"),
    ({"n": 2.0}, "n"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": True}, "temperature"),  # was temperature 1.0
    ({"seed": "7"}, "seed"),
    ({"stream": "yes"}, "stream"),  # was streamed
    ({"stop": 5}, "stop"),  # was "stop.str"
    ({"stop": ["ok", 1]}, "stop.1"),
])
def test_serve_fields_of_the_wrong_json_type_are_400_naming_the_field(serve, extra, param):
    _serve_refused(serve.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, **extra}), param)


def test_serve_takes_numbers_as_openai_clients_write_them(serve):
    resp = serve.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, "temperature": 1, "top_p": 1,
                                                     "n": 2, "stop": "\n", "presence_penalty": 0, "logprobs": False})
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 2, resp.text


@pytest.mark.parametrize("body, message", [
    (b"{", "the request body is not valid JSON (Expecting property name"),  # was param "1"
    (b'{"messages": []} trailing', "the request body is not valid JSON (Extra data"),
    (b"null", "the request body must be a JSON object"),
    (b"[1, 2]", "the request body must be a JSON object"),
])
def test_serve_body_that_is_not_a_json_object_says_so(serve, body, message):
    error = _serve_refused(serve.post("/v1/chat/completions", content=body, headers=JSON), None)
    assert error["message"].startswith(message), error


def test_serve_refuses_a_model_it_does_not_serve(serve):
    error = _serve_refused(serve.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HI,
                                                                    "max_tokens": 2}), "model", status=404)
    assert error["type"] == "model_not_found" and "'tiny'" in error["message"]
    assert serve.post("/v1/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": True}, "logprobs"),  # was answered with "logprobs": null
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 1.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
])
def test_serve_refuses_what_it_cannot_honour_instead_of_ignoring_it(serve, extra, param):
    error = _serve_refused(serve.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, **extra}), param)
    assert "does not support" in error["message"]
