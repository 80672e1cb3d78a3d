"""Settings of the human-feedback app (``alignkit label ...``)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from alignkit.errors import AlignkitError, ConfigError

DEFAULT_DB_URL = "sqlite:///runs/feedback/feedback.db"
DEFAULT_GUIDELINES = Path(__file__).with_name("guidelines.md")
ADMIN_TOKEN_ENV = "ALIGNKIT_ADMIN_TOKEN"


@dataclass
class LabelConfig:
    """Where the app stores labels and how it listens.

    ``db_url`` is a SQLAlchemy URL: ``sqlite:///path/to/file.db`` (the default;
    WAL mode) or ``postgresql+psycopg://user:password@host:5432/db``.
    ``admin_token`` left empty is read from ``ALIGNKIT_ADMIN_TOKEN`` or, failing
    that, generated at start-up and printed once.
    """

    db_url: str = DEFAULT_DB_URL
    host: str = "127.0.0.1"
    port: int = 8765
    admin_token: str | None = None
    guidelines: str | None = None  # Markdown file; None = the guidelines shipped with alignkit
    max_request_bytes: int = 1 << 20  # every request body except project uploads
    max_upload_bytes: int = 64 << 20  # POST /api/projects (a whole JSONL file)
    assignment_ttl_s: int = 2 * 3600  # an unanswered task goes back to the pool after this
    base_url: str | None = None  # for invite links; None = http://host:port
    # SQLite in WAL mode with NORMAL: a committed label survives the server being
    # killed at any moment (the OS has the write); FULL also survives power loss,
    # at one fsync per label, which caps a server at a few hundred labels/s.
    sqlite_synchronous: str = "NORMAL"

    def __post_init__(self) -> None:
        if not (0 <= self.port < 65536):
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.max_request_bytes < 1024 or self.max_upload_bytes < 1024:
            raise ConfigError("max_request_bytes and max_upload_bytes must be at least 1024")
        if self.sqlite_synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ConfigError(f"sqlite_synchronous must be OFF, NORMAL, FULL or EXTRA, got {self.sqlite_synchronous!r}")
        if self.assignment_ttl_s <= 0:
            raise ConfigError("assignment_ttl_s must be positive")

    def resolve_admin_token(self) -> tuple[str, bool]:
        """The admin token, and whether it was generated just now (so print it)."""
        if self.admin_token:
            return self.admin_token, False
        from_env = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
        if from_env:
            self.admin_token = from_env
            return from_env, False
        self.admin_token = secrets.token_urlsafe(24)
        return self.admin_token, True

    def guidelines_text(self) -> str:
        path = Path(self.guidelines) if self.guidelines else DEFAULT_GUIDELINES
        from alignkit.data.io import read_text

        try:
            return read_text(path, "guidelines")
        except AlignkitError as e:
            raise ConfigError(str(e)) from None

    def public_url(self) -> str:
        if self.base_url:
            return self.base_url.rstrip("/")
        return f"http://{self.host}:{self.port}"
