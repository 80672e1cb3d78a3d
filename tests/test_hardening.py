"""Bad input, class by class: every member a located one-line error (or a counted skip), never a
traceback, a silent drop, a stalled server or a broken run reported as a success."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from alignkit import cli
from alignkit.data.io import DataWarning

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *args) -> tuple[int, str]:
    """``alignkit ARGS``: (exit code, stderr); a failure must be one line without a traceback."""
    capsys.readouterr()
    code = cli.main(list(args))
    err = capsys.readouterr().err
    if code:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return code, err


def sft(tmp_path, *overrides):
    return ["sft", "--config", str(CONFIGS / "sft-tiny.yaml"), f"run.output_dir={tmp_path / 'runs'}",
            "train.max_steps=1", "data.eval_fraction=0", *overrides]


GOOD = {"prompt": "Say hi", "completion": "Hello there, nice to meet you."}


def jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


# --------------------------------------------------------------------------- 1. bytes and files


@pytest.mark.parametrize("name, content, expected", [
    ("latin1.jsonl", jsonl(GOOD, b'{"prompt": "Say hi", "completion": "caf\xe9"}'), "latin1.jsonl:line 2: not UTF-8"),
    ("latin1.json", b'[{"prompt": "a", "completion": "b"},\n {"prompt": "c", "completion": "caf\xe9"}]',
     "latin1.json:line 2: not UTF-8"),
    ("latin1.csv", b"prompt,completion\nSay hi,Hello\nSay hi,caf\xe9\n", "latin1.csv:row 3: not UTF-8"),
    ("fake.parquet", b"PAR1 this is not parquet", "fake.parquet: not a readable Parquet file"),
    ("folder.jsonl", None, "folder.jsonl: cannot read data file (it is a folder)"),
])
def test_files_that_are_not_what_their_name_says_are_located_errors(tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    code, err = run(capsys, *sft(tmp_path, f"data.path={path}"))
    assert code == 2 and expected in err


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_a_line_that_is_not_utf8_is_skipped_and_counted_with_on_error_skip(tmp_path, capsys, suffix):
    path = tmp_path / f"data.{suffix}"
    if suffix == "jsonl":
        path.write_bytes(jsonl(GOOD, b'{"prompt": "x", "completion": "caf\xe9"}', GOOD))
    else:
        path.write_bytes(b"prompt,completion\nSay hi,Hello\nSay hi,caf\xe9\nSay hi,Hi there\n")
    with pytest.warns(DataWarning, match=r"skipped 1 of 3 SFT records.*not UTF-8"):
        code, _ = run(capsys, *sft(tmp_path, f"data.path={path}", "data.on_error=skip"))
    assert code == 0


def test_every_reader_of_a_user_file_says_which_file(tmp_path, capsys):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"model:\n  name: caf\xe9\n")
    code, err = run(capsys, "sft", "--config", str(latin1))
    assert code == 2 and "latin1.yaml:line 2: not UTF-8" in err
    code, err = run(capsys, "run", str(tmp_path))  # a pipeline "file" that is a folder
    assert code == 2 and "cannot read pipeline (it is a folder)" in err
    code, err = run(capsys, "cai", "--config", str(CONFIGS / "cai-tiny.yaml"), f"constitution={latin1}",
                    f"run.output_dir={tmp_path}")
    assert code == 2 and "latin1.yaml:line 2: not UTF-8" in err


@pytest.mark.parametrize("content, expected", [
    (jsonl({"prompt": "a", "completions": ["x", "y"]}, b'{"prompt": "caf\xe9", "completions": ["x", "y"]}'),
     "items.jsonl:line 2: not UTF-8"),
    (None, "items.jsonl: cannot read project file (it is a folder)"),
])
def test_create_project_file_errors_are_located(tmp_path, capsys, content, expected):
    from alignkit.feedback.cli import main as label

    path = tmp_path / "items.jsonl"
    path.mkdir() if content is None else path.write_bytes(content)
    assert label(["create-project", "--db", f"sqlite:///{tmp_path / 'db.sqlite'}", "--file", str(path),
                  "--kind", "ranking", "--name", "p"]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("make_url, expected", [
    (lambda d: "not a url at all", "not a database URL"),
    (lambda d: "nosuchdialect://x/y", "cannot use this database"),
    (lambda d: f"sqlite:///{d}", "is a folder"),
    (lambda d: f"sqlite:///{(d / 'text.db').write_text('hello ' * 200) and d / 'text.db'}", "file is not a database"),
    (lambda d: "postgresql+psycopg://someone:secret@127.0.0.1:9/db", "cannot open the database"),
])
def test_db_urls_that_cannot_work_are_one_line_errors(tmp_path, capsys, make_url, expected):
    from alignkit.feedback.cli import main as label

    assert label(["status", "--db", make_url(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1
    assert "secret" not in err  # a password in the URL is not printed


# --------------------------------------------------------------------------- 2. limits in every stage that samples


def _prompts(tmp_path, n_words: int) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Tell me about cats."}) + "\n"
                    + json.dumps({"prompt": "word " * n_words}) + "\n")
    return path


@pytest.mark.parametrize("stage, config, key, new_tokens", [
    ("label-ai", "label-ai-tiny.yaml", "data", 800),
    ("best-of-n", "best-of-n-tiny.yaml", "data", 800),
    ("eval", "eval-tiny.yaml", "prompts", 800),
    ("cai", "cai-tiny.yaml", "data", 100),  # the conversation grows by (1 + 2 x rounds) answers and requests
    ("ppo", "ppo-tiny.yaml", "data.prompts", 800),
])
def test_every_sampling_stage_checks_prompt_length_up_front(tmp_path, capsys, stage, config, key, new_tokens):
    prompts = _prompts(tmp_path, 300)
    common = ["--config", str(CONFIGS / config), f"run.output_dir={tmp_path / 'runs'}", f"{key}.path={prompts}",
              f"{key}.kind=null", f"{key}.limit=null"]
    started = time.time()
    code, err = run(capsys, stage, *common, f"{key}.max_prompt_length=64")
    assert code == 2 and "prompts.jsonl:line 2: field 'prompt': prompt is" in err
    assert f"{key}.max_prompt_length=64" in err
    # ...and against the model's context (tiny models read 1024 positions), within the prompt limit
    code, err = run(capsys, stage, *common, f"{key}.max_prompt_length=2000", f"generation.max_new_tokens={new_tokens}")
    assert code == 2 and "prompts.jsonl:line 2" in err and "context of 1024 tokens" in err
    assert time.time() - started < 60  # found before any sampling


def test_a_prompt_too_long_for_the_context_is_skipped_and_counted_with_on_error_skip(tmp_path, capsys):
    prompts = _prompts(tmp_path, 300)
    with pytest.warns(DataWarning, match="skipped 1 of 2 prompts"):
        code, _ = run(capsys, "label-ai", "--config", str(CONFIGS / "label-ai-tiny.yaml"),
                      f"run.output_dir={tmp_path}", f"data.path={prompts}", "data.kind=null", "data.on_error=skip",
                      "data.max_prompt_length=64")
    assert code == 0
    assert json.loads((tmp_path / "tiny" / "label-ai" / "final" / "summary.json").read_text())["prompts"] == 1


@pytest.fixture(scope="module")
def tiny_app():
    from alignkit.config import ModelConfig
    from alignkit.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer("tiny:llama")
    return load_causal_lm(ModelConfig(name="tiny:llama"), trainable=False, tokenizer=tok), tok


def _client(tiny_app, **kw):
    from fastapi.testclient import TestClient

    from alignkit.recipes.serve import create_app

    model, tok = tiny_app
    return TestClient(create_app(model, tok, "tiny", **kw))


HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("body, status, param", [
    ({"messages": [{"role": "user", "content": "word " * 1200}]}, 400, "messages"),  # over the 1024 positions
    ({"messages": HI, "max_tokens": 1023}, 400, "max_tokens"),  # prompt + max_tokens over the context
    ({"messages": HI, "max_completion_tokens": 5000}, 400, "max_completion_tokens"),
    ({"messages": HI, "seed": 1e26}, 400, "seed"),
    ({"messages": HI, "seed": -1}, 400, "seed"),
    ({"messages": HI, "n": 10**20}, 400, "n"),
    ({"messages": HI, "temperature": float("inf")}, 400, None),
])
def test_serve_refuses_out_of_range_requests_naming_the_field(tiny_app, body, status, param):
    client = _client(tiny_app, max_tokens_limit=5000)
    resp = client.post("/v1/chat/completions", content=json.dumps(body, allow_nan=True),
                       headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    if param:
        assert resp.json()["error"]["param"] == param


def test_serve_caps_the_request_body(tiny_app):
    client = _client(tiny_app, max_request_bytes=2000)
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    assert client.post("/v1/chat/completions", json=big).status_code == 413

    def chunks():  # no Content-Length: counted as it streams
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}]}'

    assert client.post("/v1/chat/completions", content=chunks(),
                       headers={"content-type": "application/json"}).status_code == 413
    assert client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2}).status_code == 200


def test_serve_bounds_a_generation_and_answers_busy_with_503(tiny_app, monkeypatch):
    client = _client(tiny_app, request_timeout=0.5, queue_timeout=0.2)
    started = time.time()
    resp = client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1000, "n": 16})
    assert resp.status_code == 200 and time.time() - started < 10
    assert "length" in [c["finish_reason"] for c in resp.json()["choices"]]  # cut at the time limit

    from alignkit import rollout

    real, gate = rollout.generate, threading.Event()

    def slow(*a, **kw):
        gate.wait(10)
        return real(*a, **kw)

    monkeypatch.setattr(rollout, "generate", slow)
    client = _client(tiny_app, request_timeout=30, queue_timeout=0.2)
    first = threading.Thread(target=lambda: client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2}))
    first.start()
    time.sleep(0.3)
    busy = client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2})
    gate.set()
    first.join()
    assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1
    assert client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2}).status_code == 200


def test_serve_stops_a_long_generation_promptly_on_sigterm(tmp_path):
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ALIGNKIT_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "serve", "tiny:llama-4x256", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "err.txt", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.2)
        answer = {}

        def long_request():  # 16 x 1,000 tokens: over 20 s on 2 cores
            answer["resp"] = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                                        json={"messages": HI, "max_tokens": 1000, "n": 16})

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(1.5)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        thread.join(timeout=30)
        assert time.time() - sent < 8
        # the answer so far, not a dropped connection
        assert answer["resp"].status_code == 200, (answer["resp"].text, (tmp_path / "err.txt").read_text()[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()


def test_feedback_app_ids_out_of_range_are_4xx(tmp_path):
    from fastapi.testclient import TestClient

    from alignkit.feedback.config import LabelConfig
    from alignkit.feedback.items import parse_project_lines
    from alignkit.feedback.server import create_app
    from alignkit.feedback.storage import Store

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    lines = [json.dumps({"id": "a", "prompt": "p", "completions": ["x", "y"]})]
    store.create_project("p", parse_project_lines(lines, "ranking", "t.jsonl"), 1)
    token = store.invite("p", "ann")
    client = TestClient(create_app(LabelConfig(admin_token="admin"), store=store))
    auth = {"authorization": f"Bearer {token}"}
    for body in ({"item_id": 1e20, "ranks": [1, 2]}, {"item_id": 10**30, "ranks": [1, 2]},
                 {"item_id": 1, "ranks": [1, 10**30]}, {"item_id": -1, "ranks": [1, 2]}):
        resp = client.post("/api/labels", json=body, headers=auth)
        assert 400 <= resp.status_code < 500, (body, resp.status_code)
    for path in ("/api/tasks/100000000000000000000", "/api/tasks/-5", "/task/99999999999999999999999"):
        assert 400 <= client.get(path, headers=auth).status_code < 500, path


# --------------------------------------------------------------------------- 3. non-finite numbers


@pytest.mark.parametrize("override", ["train.learning_rate=.inf", "train.learning_rate=.nan", "train.learning_rate=inf",
                                      "train.max_grad_norm=-.inf", "train.weight_decay=nan"])
def test_config_numbers_must_be_finite(tmp_path, capsys, override):
    code, err = run(capsys, *sft(tmp_path, override))
    assert code == 2 and "must be a finite number" in err and override.split("=")[0] in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("margin", ['"inf"', "Infinity", "NaN", "-Infinity", "true", '"big"'])
def test_data_numbers_must_be_finite(tmp_path, capsys, margin):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "good answer", "rejected": "bad answer", "margin": 1}\n'
                    f'{{"prompt": "p", "chosen": "good", "rejected": "bad", "margin": {margin}}}\n')
    code, err = run(capsys, "rm", "--config", str(CONFIGS / "rm-tiny.yaml"), f"data.path={path}",
                    f"run.output_dir={tmp_path}", "use_margin=true", "data.eval_fraction=0")
    assert code == 2 and "prefs.jsonl:line 2: field 'margin': must be a" in err


# --------------------------------------------------------------------------- 4. errors that escaped


@pytest.mark.parametrize("override", ["model.name=[a", "model.name={x", "run.name=a: b: c", "train.batch_size=[1, 2"])
def test_override_values_that_are_not_yaml_are_config_errors(tmp_path, capsys, override):
    code, err = run(capsys, *sft(tmp_path, override))
    assert code == 2 and "is not valid YAML" in err and override.split("=")[0] in err


def test_pipeline_override_values_that_are_not_yaml_are_config_errors(tmp_path, capsys):
    code, err = run(capsys, "run", str(CONFIGS / "run-tiny.yaml"), "stages.label.k=[3")
    assert code == 2 and "is not valid YAML" in err


def words(prompts, responses):
    return ["many" if len(r) > 3 else "few" for r in responses]


def one_number(prompts, responses):
    return 0.5


def test_a_reward_or_scorer_returning_non_numbers_is_a_one_line_error(tmp_path, capsys):
    for spec in (f"python:{__name__}:words", f"python:{__name__}:one_number"):
        code, err = run(capsys, "eval", "--config", str(CONFIGS / "eval-tiny.yaml"), f"run.output_dir={tmp_path}",
                        f"toxicity.scorer={spec}", "prompts.limit=2")
        assert code == 2 and "reward" in err and spec in err
        code, err = run(capsys, "ppo", "--config", str(CONFIGS / "ppo-tiny.yaml"), f"run.output_dir={tmp_path}",
                        f"reward.spec={spec}", "ppo.steps=1", "ppo.rollout_batch_size=4", "ppo.minibatch_size=4")
        assert code == 2 and spec in err


@pytest.mark.parametrize("damage", ["empty optimizer", "cut weights", "missing rng", "bad meta"])
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path, capsys, damage):
    args = sft(tmp_path, "train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=3")
    assert cli.main(args) == 0
    run_dir = tmp_path / "runs" / "tiny" / "sft"
    straight = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    latest = run_dir / "checkpoints" / "step-000004"
    if damage == "empty optimizer":
        (latest / "optimizer.bin").write_bytes(b"")
    elif damage == "cut weights":
        data = (latest / "model.safetensors").read_bytes()
        (latest / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif damage == "missing rng":
        (latest / "random_states_0.pkl").write_bytes(b"\x80")
    else:
        (latest / "meta.json").write_text("{not json")
    (run_dir / "DONE").unlink()
    capsys.readouterr()
    assert cli.main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "could not load step-000004" in out and "resuming from step-000003" in out
    resumed = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert resumed == pytest.approx(straight, abs=1e-6)  # step 4 trained again, as before


def test_no_checkpoint_that_loads_is_one_line_error_and_leftover_temporary_folders_go(tmp_path, capsys):
    args = sft(tmp_path, "train.max_steps=2", "train.save_every=1")
    assert cli.main(args) == 0
    run_dir = tmp_path / "runs" / "tiny" / "sft"
    for ckpt in (run_dir / "checkpoints").glob("step-*"):
        (ckpt / "optimizer.bin").write_bytes(b"")
    (run_dir / "DONE").unlink()
    leftover = run_dir / "checkpoints" / ".tmp-step-000003"
    leftover.mkdir()
    code, err = run(capsys, *args, "--resume")
    assert code == 2 and "cannot read checkpoint (step-000002:" in err and "step-000001:" in err
    assert not leftover.exists()  # a kill mid-save leaves one; the next start removes it


# --------------------------------------------------------------------------- 5. quiet outcomes said out loud


def test_rankings_that_give_no_pairs_are_counted_in_a_warning(tmp_path):
    from alignkit.data.formats import load_preferences

    path = tmp_path / "rankings.jsonl"
    rows = [{"prompt": "p", "completions": ["a", "b", "c"], "rankings": [{"labeler": "x", "ranks": ranks}]}
            for ranks in ([1, 2, 3], [1, 1, 1], None, [1, 2, 2])]
    rows[2]["rankings"] = [{"labeler": "x", "cant_rank": True}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(DataWarning, match=r"2 of 4 preference records gave no pairs .*line 2"):
        pairs = load_preferences(str(path))
    assert len(pairs) == 3 + 2


def test_label_ai_skips_and_counts_bad_records_of_a_completions_file(tmp_path, capsys):
    path = tmp_path / "completions.jsonl"
    path.write_bytes(jsonl({"prompt": "p1", "completions": ["a short one", "a much longer answer here"]},
                           {"prompt": "p2", "completions": "not a list"},
                           b'{"prompt": "p3", "completions": ["caf\xe9", "x"]}',
                           {"prompt": "p4", "completions": ["one answer", "another answer, longer"]}))
    common = ["label-ai", "--config", str(CONFIGS / "label-ai-tiny.yaml"), f"run.output_dir={tmp_path}",
              f"data.path={path}"]
    code, err = run(capsys, *common)
    assert code == 2 and "completions.jsonl:line 2: field 'completions'" in err
    with pytest.warns(DataWarning, match=r"skipped 2 of 4 records with completions"):
        assert cli.main(common + ["data.on_error=skip"]) == 0
    assert json.loads((tmp_path / "tiny" / "label-ai" / "final" / "summary.json").read_text())["ranked"] == 2


def test_sft_reports_how_many_examples_it_trained_on_after_skipping(tmp_path, capsys):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(jsonl(GOOD, {"prompt": "Say hi", "completion": "word " * 400}, GOOD))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        code, _ = run(capsys, *sft(tmp_path, f"data.path={path}", "data.on_error=skip"))
    assert code == 0
    out = capsys.readouterr().out
    done = json.loads((tmp_path / "runs" / "tiny" / "sft" / "DONE").read_text())
    assert done["examples"] == 2 and done["skipped_examples"] == 1


def test_sft_console_line_counts_after_skipping(tmp_path, capsys):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(jsonl(GOOD, {"prompt": "Say hi", "completion": "word " * 400}, GOOD))
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        assert cli.main(sft(tmp_path, f"data.path={path}", "data.on_error=skip")) == 0
    out = capsys.readouterr().out
    assert "alignkit sft: 2 examples (1 over data.max_length skipped)" in out


def test_an_unreadable_judge_says_so_on_the_console(tmp_path, capsys):
    # A tiny random model as the pairwise judge: its answers are noise, never (A) or (B).
    code = cli.main(["eval", "--config", str(CONFIGS / "eval-tiny.yaml"), f"run.output_dir={tmp_path}",
                     "prompts.limit=3", "samples_per_prompt=1", "pairwise=[{model_a: tuned, model_b: start}]",
                     "judge=judge:pairwise", "judge_options={model: {name: 'tiny:llama'}, cache: false}"])
    assert code == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("tuned vs start ("))
    following = out.splitlines()[out.splitlines().index(line) + 1]
    assert "warning: every comparison had an answer the judge's parser could not read" in following


# --------------------------------------------------------------------------- 6. the labeling app


def _one_labeler(tmp_path, n_items: int):
    """A ranking project of ``n_items`` items of three completions, and its one labeler."""
    from alignkit.feedback.items import parse_project_lines
    from alignkit.feedback.storage import Store

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    lines = [json.dumps({"id": f"i{i}", "prompt": "p", "completions": ["a", "b", "c"]}) for i in range(n_items)]
    store.create_project("p", parse_project_lines(lines, "ranking", "t.jsonl"), 1)
    return store, store.labeler_for_token(store.invite("p", "ann"))


def test_a_late_retry_never_undoes_a_newer_label_in_any_interleaving(tmp_path):
    store, who = _one_labeler(tmp_path, 40)
    rng = random.Random(0)
    for trial in range(40):
        item = store.next_tasks(who)[0].item_id
        labels = [[1, 2, 3], [3, 2, 1], [1, 1, 2], [2, 1, 1]]
        # submissions in the client's order, some repeating the label before them (answered "unchanged")
        subs = [(f"t{trial}s{k}", rng.choice(labels)) for k in range(rng.randint(2, 6))]
        events, sent = [], []
        for sub in subs:  # each one's first delivery in order; retries of any sent one at any later time
            events.append(sub)
            sent.append(sub)
            events += [rng.choice(sent) for _ in range(rng.randint(0, 3))]
        for sid, ranks in events:
            store.submit(who, item, ranks=ranks, submission_id=sid)
        newest = subs[-1][1]
        assert store.task(who, item).my_label["ranks"] == _dense(newest), (trial, events)


def test_with_the_clients_order_no_submission_undoes_a_newer_one_in_any_arrival_order(tmp_path):
    # First deliveries held up too: submissions arrive in any order, each maybe several times;
    # with the client's order on each, the label ends as the newest submission's.
    store, who = _one_labeler(tmp_path, 41)
    rng = random.Random(1)
    labels = [[1, 2, 3], [3, 2, 1], [1, 1, 2], [2, 1, 1]]
    for trial in range(40):
        item = store.next_tasks(who)[0].item_id
        subs = [(f"t{trial}s{k}", rng.choice(labels), 1000 * trial + k) for k in range(rng.randint(2, 6))]
        events = subs + [rng.choice(subs) for _ in range(rng.randint(0, 6))]
        rng.shuffle(events)
        for sid, ranks, order in events:
            store.submit(who, item, ranks=ranks, submission_id=sid, order=order)
        assert store.task(who, item).my_label["ranks"] == _dense(subs[-1][1]), (trial, events)
    # the example that lost a label before: s0, then s2, then s1's first delivery
    item = store.next_tasks(who)[0].item_id
    for sid, ranks, order in (("s0", [1, 2, 3], 1), ("s2", [2, 1, 3], 3), ("s1", [3, 2, 1], 2)):
        store.submit(who, item, ranks=ranks, submission_id=sid, order=order)
    assert store.task(who, item).my_label["ranks"] == [2, 1, 3]


def test_a_database_from_before_the_order_column_gains_it_and_keeps_its_labels(tmp_path):
    import sqlite3

    from alignkit.feedback.items import parse_project_lines
    from alignkit.feedback.storage import Store

    path = tmp_path / "db.sqlite"
    store = Store(f"sqlite:///{path}")
    lines = [json.dumps({"id": "i0", "prompt": "p", "completions": ["a", "b"]})]
    store.create_project("p", parse_project_lines(lines, "ranking", "t.jsonl"), 1)
    token = store.invite("p", "ann")
    who = store.labeler_for_token(token)
    item = store.next_tasks(who)[0].item_id
    store.submit(who, item, ranks=[2, 1])
    store.close()
    with sqlite3.connect(path) as db:  # as an earlier version left it
        db.execute("ALTER TABLE fb_labels DROP COLUMN client_order")
    store = Store(f"sqlite:///{path}")
    who = store.labeler_for_token(token)
    assert store.task(who, item).my_label["ranks"] == [2, 1]
    assert store.submit(who, item, ranks=[1, 2], order=5)[1] == "updated"
    assert store.submit(who, item, ranks=[2, 1], order=4)[1] == "unchanged"
    assert store.task(who, item).my_label["ranks"] == [1, 2]


def _dense(ranks):
    order = sorted(set(ranks))
    return [order.index(r) + 1 for r in ranks]


@pytest.mark.parametrize("link", ["javascript&#58;alert(1)", "javascript&colon;alert(1)",
                                  "&#x6A;avascript&#x3A;alert(1)", "java&#9;script:alert(1)",
                                  "data&#58;text/html,x", "vbscript:msgbox(1)"])
def test_guideline_links_are_checked_after_decoding(link):
    from alignkit.feedback.pages import render_markdown

    html = str(render_markdown(f"[click]({link}) and ![img]({link})"))
    assert 'href="#"' in html and 'src="#"' in html and "script" not in html.lower().replace("&lt;", "")


def test_guideline_links_that_are_safe_stay():
    from alignkit.feedback.pages import render_markdown

    html = str(render_markdown("[a](https://x.org/a) [b](/guide#top) [c](mailto:a@b.c) [d](notes.md)"))
    for url in ("https://x.org/a", "/guide#top", "mailto:a@b.c", "notes.md"):
        assert f'href="{url}"' in html
