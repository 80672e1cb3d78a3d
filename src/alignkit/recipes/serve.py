"""An OpenAI-compatible chat-completions server for any model alignkit loads.

    alignkit serve runs/demo/ppo/final                       # http://127.0.0.1:8000/v1
    alignkit serve builtin:smollm2-135m-instruct --port 8001
    alignkit serve runs/demo/dpo/final --api-key-env MY_KEY   # clients must send that key

Then any OpenAI client talks to it::

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "x", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 64}'

Endpoints: ``POST /v1/chat/completions`` (messages, max_tokens or
max_completion_tokens, temperature (0 = greedy), top_p, n, seed, stop, stream)
and ``GET /v1/models``. Generation goes through :func:`alignkit.rollout.generate`,
one request at a time (the model is shared; on a CPU parallel requests only
fight over the cores). ``stream: true`` is answered as one chunk plus ``[DONE]``,
so streaming clients work. It also makes an alignkit judge's endpoint backend
usable against your own models (``judge.backend: openai``).

No single request can hold the server: the body is capped (``--max-request-bytes``,
413), the prompt plus ``max_tokens`` must fit the model's context (400 naming the
field), one generation stops after ``--request-timeout`` seconds (the answer so
far, ``finish_reason: "length"``), a request that finds the model busy for
``--queue-timeout`` seconds gets 503 with Retry-After, and SIGTERM / Ctrl-C stops
a running generation at its next token. Malformed input is a 400 naming the field
(``param``): content that is neither text nor a list of parts, a part without a
``type``, a text part without a string ``text``, and any string of the body that
UTF-8 cannot encode (a lone surrogate, ``"\\ud800"``). Values keep their JSON types
(``"n": true`` or ``"max_tokens": "5"`` is a 400, not 1 and 5); a ``model`` other
than the one served is a 404 ``model_not_found``; and what a text-only model sampled
as is cannot honour (``logprobs``, ``tools``, ``response_format`` other than text,
penalties, ``logit_bias``) is a 400 naming the field rather than silently ignored.
Other unknown fields (``user``, ``metadata``...) are ignored.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import threading
import time
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator, model_validator
from pydantic.json_schema import WithJsonSchema
from pydantic_core import InitErrorDetails, PydanticCustomError

from alignkit.config import GenerationConfig, ModelConfig
from alignkit.web import LimitBody, Seed, TextBody

MAX_N = 16
MAX_REQUEST_BYTES = 1 << 20


class ContentPart(BaseModel):
    """One part of a message's content: ``{"type": "text", "text": "..."}`` is read; other types
    (images, audio) are accepted and left out, as a text-only model cannot read them."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_part_has_text(cls, data: Any) -> Any:
        # A text part's "text" is required: the error is located at it (content.0.text).
        if isinstance(data, dict) and data.get("type") == "text" and data.get("text") is None:
            kind = "missing" if "text" not in data else "string_type"
            raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(type=kind, loc=("text",),
                                                                                      input=data.get("text"))])
        return data


def _text_or_parts(value: Any, parts) -> str | list[ContentPart]:
    # Not a plain union: its errors would name the union's members (content.str, content.list[...]),
    # where these name the field itself (content) or the part's own field (content.0.text).
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return parts(value)
    raise PydanticCustomError("content_type", "must be text or a list of content parts ({\"type\": \"text\", "
                                              "\"text\": \"...\"})")


Content = Annotated[list[ContentPart], WrapValidator(_text_or_parts),
                    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]})]


def _text_or_texts(value: Any, texts) -> str | list[str]:
    # As _text_or_parts: the error names "stop" or "stop.1", not the union's members ("stop.str").
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return texts(value)
    raise PydanticCustomError("stop_type", "must be a string or a list of strings")


Stop = Annotated[list[str], WrapValidator(_text_or_texts),
                 WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]})]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: Content = ""


# Fields of OpenAI's API this server cannot honour: asked for, they are refused (400 naming the
# field) rather than ignored, since the answer would silently lack what was asked for
# (log-probabilities, a tool call, JSON) or be sampled from another distribution (penalties, bias).
# Each maps to the test that the value asks for nothing.
_UNSUPPORTED = {
    "logprobs": lambda v: v in (None, False),
    "top_logprobs": lambda v: v in (None, 0),
    "tools": lambda v: v in (None, []),
    "functions": lambda v: v in (None, []),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: v in (None, {}),
}


class ChatRequest(BaseModel):
    # Unknown OpenAI fields that change nothing in the answer (user, metadata, store...) are ignored.
    # strict: JSON types as written; lax parsing would read true as n=1 and "yes" as stream=true.
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: Seed | None = None
    stop: Stop | None = None
    stream: bool = False

    @model_validator(mode="after")
    def _nothing_unsupported(self) -> ChatRequest:
        for name, asks_nothing in _UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name)
            if not asks_nothing(value):
                raise ValidationError.from_exception_data(self.__class__.__name__, [InitErrorDetails(
                    type=PydanticCustomError("unsupported", "this server does not support it (a text-only "
                                                            "model sampled as is); leave it out"),
                    loc=(name,), input=value)])
        return self


def _content(value: str | list[ContentPart]) -> str:
    """Message content as text: a string, or the text of OpenAI's ``{"type": "text", "text"}`` parts."""
    if isinstance(value, str):
        return value
    return "".join(p.text for p in value if p.type == "text")


def create_app(model, tokenizer, model_id: str, max_tokens_limit: int = 1024, default_max_tokens: int = 256,
               api_key: str | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
               request_timeout: float = 120.0, queue_timeout: float = 10.0, stop: threading.Event | None = None):
    """The FastAPI app serving ``model`` under the name ``model_id``.

    ``stop``, once set, ends a running generation at its next token (the server sets it on SIGTERM).
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from alignkit.data.collate import encode_prompt
    from alignkit.models import model_context
    from alignkit.rollout import generate

    app = FastAPI(title=f"alignkit serve: {model_id}")
    app.add_middleware(TextBody)  # inside LimitBody: what it reads is already capped
    app.add_middleware(LimitBody, limit_for=lambda path: max_request_bytes)
    lock = threading.Lock()
    busy_until = [0.0]  # when the running generation must end at the latest (for Retry-After)
    stop = stop or threading.Event()
    context = model_context(model)
    created = int(time.time())

    def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # its loc holds a character offset, not a field
            why = (first.get("ctx") or {}).get("error", "JSON decode error")
            at = first.get("loc", ("body", None))[-1]
            return error(400, f"the request body is not valid JSON ({why} at character {at})")
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if not where:
            return error(400, "the request body must be a JSON object (Content-Type: application/json) with "
                              "'messages'")
        return error(400, f"{where}: {first.get('msg', 'invalid request')}", param=where)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        # OpenAI's error shape for every refusal (413, a body that is not text, 404, 405),
        # with the field in "param" where there is one.
        return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error",
                                       "param": getattr(exc, "param", None), "code": None}},
                            exc.status_code, headers=exc.headers)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                             "authentication_error")
        return await call_next(request)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                             "owned_by": "alignkit"}]}

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_id}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        if req.model is not None and req.model != model_id:
            # OpenAI's answer to a model it does not have: another model's text under the asked-for
            # name would be a silent substitution (and a judge's cache would file it under that name).
            return error(404, f"model: this server serves {model_id!r}, not {req.model!r} (send that name, or "
                              f"leave 'model' out)", "model_not_found", param="model")
        messages = [{"role": m.role, "content": _content(m.content)} for m in req.messages]
        bad = [m["role"] for m in messages if m["role"] not in ("system", "user", "assistant")]
        if bad:
            return error(400, f"unsupported message role '{bad[0]}' (use system, user or assistant)",
                         param="messages")
        max_new = req.max_completion_tokens or req.max_tokens or default_max_tokens
        field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        if max_new > max_tokens_limit:
            return error(400, f"{field} {max_new} is over this server's limit {max_tokens_limit}", param=field)
        prompt_ids = encode_prompt(tokenizer, messages)
        if context is not None and len(prompt_ids) >= context:
            return error(400, f"the messages are {len(prompt_ids)} tokens; the model reads at most {context}",
                         param="messages")
        if context is not None and len(prompt_ids) + max_new > context:
            return error(400, f"{field} {max_new} after a prompt of {len(prompt_ids)} tokens is over the model's "
                              f"context of {context} tokens (at most {context - len(prompt_ids)})", param=field)
        temperature = 1.0 if req.temperature is None else req.temperature
        greedy = temperature == 0  # OpenAI's convention: temperature 0 means the most likely tokens
        gen = GenerationConfig(max_new_tokens=max_new, temperature=temperature if not greedy else 1.0,
                               top_p=req.top_p or 1.0, do_sample=not greedy, batch_size=MAX_N)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if not lock.acquire(timeout=queue_timeout):
            wait = max(1, int(busy_until[0] - time.time()) + 1)
            return JSONResponse({"error": {"message": f"the model is busy with another request; retry in {wait} s",
                                           "type": "server_busy", "param": None, "code": None}}, 503,
                                headers={"Retry-After": str(wait)})
        try:
            busy_until[0] = time.time() + request_timeout
            outs = generate(model, tokenizer, [messages], gen, n=req.n, seed=req.seed, prompt_ids=[prompt_ids],
                            max_time=request_timeout, stop=stop)
        finally:
            lock.release()
        choices, completion_tokens = [], 0
        for i, g in enumerate(outs):
            text, reason = g.text, "stop" if g.finished else "length"
            cut = [text.find(s) for s in stops if s and s in text]
            if cut:
                text, reason = text[:min(cut)], "stop"
            completion_tokens += len(g.response_ids)
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "finish_reason": reason, "logprobs": None})
        prompt_tokens = len(outs[0].prompt_ids) if outs else 0
        body = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": model_id, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}
        if not req.stream:
            return body
        return StreamingResponse(_as_stream(body), media_type="text/event-stream")

    return app


def _as_stream(body: dict):
    """A finished completion as server-sent events: one delta chunk per choice, then [DONE]."""
    for c in body["choices"]:
        chunk = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"],
                 "model": body["model"], "choices": [{"index": c["index"], "delta": c["message"],
                                                      "finish_reason": c["finish_reason"]}]}
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignkit serve", description="an OpenAI-compatible chat-completions server")
    p.add_argument("model", nargs="?", default="builtin:smollm2-135m-instruct",
                   help="hub id, model folder (e.g. runs/demo/ppo/final), builtin:... or tiny:...")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="the model id clients see (default: the model argument)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="refuse requests for more new tokens")
    p.add_argument("--default-max-tokens", type=int, default=256, help="when a request gives no max_tokens")
    p.add_argument("--api-key-env", default=None,
                   help="require 'Authorization: Bearer KEY' where KEY is this environment variable's value")
    p.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES, help="larger request bodies get 413")
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="seconds one generation may run; then the answer so far is returned")
    p.add_argument("--queue-timeout", type=float, default=10.0,
                   help="seconds a request waits for a busy model before a 503 with Retry-After")
    return p


def make_server(argv: list[str]):
    """Load the model and build the uvicorn server (``.run()`` serves until interrupted)."""
    import uvicorn

    from alignkit.errors import AlignkitError
    from alignkit.models import load_causal_lm, load_tokenizer

    args = _parser().parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise AlignkitError(f"--api-key-env {args.api_key_env}: that environment variable is empty")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not api_key:
        print(f"alignkit serve: warning: listening on {args.host} without --api-key-env; anyone who can reach "
              f"this port can use the model")
    from alignkit.training import Engine

    cfg = ModelConfig(name=args.model, dtype=args.dtype)
    tok = load_tokenizer(cfg.name, cfg.cache_dir)
    model = Engine().place(load_causal_lm(cfg, trainable=False, tokenizer=tok))
    stop = threading.Event()
    app = create_app(model, tok, args.name or args.model, args.max_tokens_limit, args.default_max_tokens, api_key,
                     args.max_request_bytes, args.request_timeout, args.queue_timeout, stop)
    # A short grace period: the running generation ends at its next token once `stop` is set.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)

    class Server(uvicorn.Server):
        """uvicorn's server that also tells a running generation to stop when asked to exit."""

        def handle_exit(self, sig, frame):
            stop.set()
            super().handle_exit(sig, frame)

    return Server(config)


def cli(argv: list[str], stage: str = "serve") -> int:
    server = make_server(argv)
    host, port = server.config.host, server.config.port
    print(f"alignkit serve: http://{host}:{port}/v1 (POST /v1/chat/completions, GET /v1/models); Ctrl-C stops")
    server.run()
    return 0
