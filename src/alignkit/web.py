"""What alignkit's two HTTP servers (the feedback app, ``alignkit serve``) share about untrusted requests.

- :class:`LimitBody`: a request body over its limit is a 413, whether it says its
  length up front or streams it (plain ASGI: the body is never read past the limit);
- :data:`Int64`, :data:`Seed`: numbers a request may carry, declared with their
  range, so that an id of 1e20 or a seed of 1e26 is a 4xx naming the field, not a
  500 from the database or the random-number generator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

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
