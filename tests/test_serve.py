"""alignkit serve (OpenAI-compatible chat completions) and the judges' endpoint backend against it,
on loopback with a real local (tiny) model."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from alignkit.config import GenerationConfig, ModelConfig
from alignkit.errors import AlignkitError
from alignkit.judges import EndpointBackend, JudgeConfig, build_judge
from alignkit.models import load_causal_lm, load_tokenizer
from alignkit.recipes.serve import create_app, make_server
from alignkit.rollout import generate

HELLO = [{"role": "user", "content": "Write one polite sentence to a neighbour."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """`alignkit serve tiny:llama --port P` (the CLI's own argument parsing) in a thread."""
    port = _free_port()
    srv = make_server(["tiny:llama", "--host", "127.0.0.1", "--port", str(port), "--name", "tiny"])
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    srv.should_exit = True
    thread.join(timeout=10)


def test_models_endpoint(server):
    data = httpx.get(f"{server}/models").json()
    assert [m["id"] for m in data["data"]] == ["tiny"] and data["object"] == "list"


def test_endpoint_backend_round_trip_matches_local_generation(server):
    # The same weights (tiny:llama is seeded) sampled with the same seed must give the same
    # text through HTTP as in-process: the server adds nothing and loses nothing. (Sampling,
    # because greedy decoding of a random model stops at once with an empty answer.)
    gen = GenerationConfig(max_new_tokens=12, temperature=1.0)
    backend = EndpointBackend(server, "tiny", api_key_env="ALIGNKIT_TEST_NO_SUCH_KEY")
    second = HELLO + [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again, shorter."}]
    remote = backend.complete([HELLO, second], gen, seed=7)
    tok = load_tokenizer("tiny:llama")
    model = load_causal_lm(ModelConfig(name="tiny:llama"), trainable=False, tokenizer=tok)
    local = [generate(model, tok, [conv], gen, seed=7)[0].text for conv in (HELLO, second)]
    assert remote == local and backend.calls == 2
    assert all(remote)


def test_chat_completions_protocol(server):
    r = httpx.post(f"{server}/chat/completions", json={"model": "tiny", "messages": HELLO, "n": 3, "max_tokens": 5,
                                                       "temperature": 1.0, "seed": 1, "user": "ignored"})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion" and body["model"] == "tiny"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["role"] == "assistant" and c["finish_reason"] in ("stop", "length")
               for c in body["choices"])
    usage = body["usage"]
    assert 3 <= usage["completion_tokens"] <= 3 * 5 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # the same seed gives the same samples
    again = httpx.post(f"{server}/chat/completions", json={"messages": HELLO, "n": 3, "max_tokens": 5, "seed": 1})
    assert [c["message"] for c in again.json()["choices"]] == [c["message"] for c in body["choices"]]
    # stream: one chunk per choice, then [DONE]
    r = httpx.post(f"{server}/chat/completions", json={"messages": HELLO, "max_tokens": 4, "stream": True})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[0])["object"] == "chat.completion.chunk"


def test_bad_requests_get_openai_style_errors(server):
    r = httpx.post(f"{server}/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{server}/chat/completions", json={"messages": HELLO, "max_tokens": 100000})
    assert r.status_code == 400 and "limit" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/chat/completions", json={"messages": [{"role": "tool", "content": "x"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    # the backend turns an HTTP error into a one-line AlignkitError
    backend = EndpointBackend(server, "tiny")
    with pytest.raises(AlignkitError, match="HTTP 400"):
        backend.complete([HELLO], GenerationConfig(max_new_tokens=100000))


def test_scalar_judge_over_the_endpoint_is_cached(server, tmp_path):
    cfg = JudgeConfig(template="toxicity", backend="openai", base_url=server, model=ModelConfig(name="tiny"),
                      generation=GenerationConfig(max_new_tokens=6, do_sample=False), cache_dir=str(tmp_path))
    judge = build_judge(cfg)
    scores = judge.score([HELLO] * 2, ["You are kind.", "You are rude."])
    assert judge.stats.calls == 2 and all(-5 <= s <= 5 for s in scores)
    again = build_judge(cfg)
    assert again.score([HELLO] * 2, ["You are kind.", "You are rude."]).tolist() == scores.tolist()
    assert again.stats.calls == 0 and again.backend.calls == 0


def test_api_key_is_required_when_configured(monkeypatch):
    from fastapi.testclient import TestClient

    class Model:  # never reached: the key check comes first
        pass

    client = TestClient(create_app(Model(), None, "m", api_key="sekrit"))
    assert client.get("/v1/models").status_code == 401
    ok = client.get("/v1/models", headers={"Authorization": "Bearer sekrit"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "m"
    # the endpoint backend sends the key from the environment variable it is told about
    monkeypatch.setenv("MY_JUDGE_KEY", "sekrit")
    assert EndpointBackend("http://127.0.0.1:1/v1", "m", api_key_env="MY_JUDGE_KEY")._headers() == {
        "Authorization": "Bearer sekrit"}
    monkeypatch.delenv("MY_JUDGE_KEY")
    assert EndpointBackend("http://127.0.0.1:1/v1", "m", api_key_env="MY_JUDGE_KEY")._headers() == {}
