"""What alignkit's two HTTP servers (the feedback app, ``alignkit serve``) share about untrusted requests.

- :class:`LimitBody`: a request body over its limit is a 413, whether it says its
  length up front or streams it (plain ASGI: the body is never read past the limit);
- :data:`Int64`, :data:`Seed`: numbers a request may carry, declared with their
  range, so that an id of 1e20 or a seed of 1e26 is a 4xx naming the field, not a
  500 from the database or the random-number generator;
- :class:`TextBody`: a JSON body is UTF-8 text all through, so that a string no
  database, tokenizer or JSON response can hold (a lone surrogate, ``"\\ud800"``)
  is a 400 naming its field before any route sees it, not a 500 wherever it lands;
  :func:`unencodable` finds such a string in any parsed value (the CLIs use it on
  their arguments).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

INT64_MAX = 2**63 - 1
# Database ids (SQLite and PostgreSQL integers are 64-bit signed).
Int64 = Annotated[int, Field(ge=0, le=INT64_MAX)]
# torch.manual_seed takes at most 64 bits; alignkit's samplers any non-negative integer.
Seed = Annotated[int, Field(ge=0, le=2**64 - 1)]


class LimitBody:
    """ASGI middleware: 413 for a body over ``limit_for(path)`` bytes.

    A declared Content-Length over the limit is refused before the route runs;
    a streamed body is counted as it arrives, and the read that passes the limit
    raises a 413 HTTPException inside the route's body parsing.
    """

    def __init__(self, app, limit_for: Callable[[str], int]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await self._refuse(send, limit)
                return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    from fastapi import HTTPException

                    raise HTTPException(413, f"request body larger than {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send, limit: int) -> None:
        body = b'{"detail": "request body larger than %d bytes"}' % limit
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def unencodable(value: Any) -> str | None:
    """Where in ``value`` (JSON-like: dicts, lists, strings) a string cannot be encoded as UTF-8, or None.

    The place is dotted, as the apps name fields (``messages.0.content``); a bad key is named
    by where it sits (``meta (a key)``). The place never holds the bad text itself.

    >>> unencodable({"messages": [{"content": "ok"}, {"content": "\\ud800"}]})
    'messages.1.content'
    >>> unencodable({"ok": ["fine", 1, None]}) is None
    True
    """
    from alignkit.data.io import find_unusable

    found = find_unusable(value, max_depth=None)
    if found is None:
        return None
    path, is_key, _ = found
    where = ".".join(map(str, path[:-1] if is_key else path)) or "body"
    return where + " (a key)" if is_key else where


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad_text(param: str | None, message: str):
    """The 400 a route's body parsing raises (an HTTPException: FastAPI passes it to the app's handlers)."""
    from fastapi import HTTPException

    exc = HTTPException(400, message)
    exc.param = param  # the field, for apps that report it apart (alignkit serve's "param")
    return exc


def check_json_text(body: bytes) -> None:
    """Raise a 400 naming the field if a JSON body is not UTF-8 or holds a string that UTF-8 cannot encode.

    The body is decoded as ``json.loads`` decodes bytes (so surrogates written as raw bytes are
    found too); a body that is not JSON at all is left to the route's own parsing to report.
    """
    encoding = json.detect_encoding(body)
    try:
        text = body.decode(encoding, "surrogatepass")
    except UnicodeDecodeError as e:
        raise _bad_text(None, f"the request body is not {encoding.upper()} text (byte {e.start})") from None
    if "\\u" not in text and _encodes(text):
        return  # the common case: no escapes and no raw surrogates, so nothing to look for
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return
    where = unencodable(value)
    if where is not None:
        raise _bad_text(where, f"{where}: not valid text (it holds a lone surrogate such as \\ud800, "
                               f"which UTF-8 cannot encode)")


class TextBody:
    """ASGI middleware: a JSON request body is checked with :func:`check_json_text` as the route reads it.

    The check runs on the last chunk, inside the route's body parsing and before validation
    or the endpoint, so the 400 goes through the app's own HTTPException handler. Other
    bodies (forms, uploads) pass untouched.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not _is_json(scope["headers"]):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def checked_receive():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    check_json_text(b"".join(chunks))
                    chunks.clear()
            return message

        await self.app(scope, checked_receive, send)


def _is_json(headers) -> bool:
    """Whether the request says JSON, as FastAPI decides (application/json or application/*+json)."""
    for name, value in headers:
        if name == b"content-type":
            kind = value.split(b";", 1)[0].strip().lower()
            return kind == b"application/json" or (kind.startswith(b"application/") and kind.endswith(b"+json"))
    return False
