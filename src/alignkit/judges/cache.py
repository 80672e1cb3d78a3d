"""An on-disk cache of judge answers, so that a rerun costs no model call.

One SQLite file (``verdicts.sqlite``) per cache folder. The key is the sha256 of
(judge id, template text, inputs, call parameters): change the judge model, a
word of the template, the inputs or the sampling and it is a different key.
What is stored is the judge's *raw* answer (its text, or its option
log-probabilities), not the parsed score, so a better parser re-reads old
answers without asking the model again. SQLite because several processes
(label-ai and a PPO run, say) may share one cache; it serialises their writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from pathlib import Path

from alignkit.errors import AlignkitError

FILE = "verdicts.sqlite"


def cache_key(**parts) -> str:
    """sha256 of the parts, serialised canonically (sorted keys, no whitespace)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class VerdictCache:
    def __init__(self, folder: str | Path):
        self.path = Path(folder) / FILE
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                           "created REAL NOT NULL)")
        except (OSError, sqlite3.Error) as e:
            raise AlignkitError(f"{self.path}: cannot open the judge cache ({e})") from None

    @contextlib.contextmanager
    def _connect(self):
        db = sqlite3.connect(self.path, timeout=60)
        try:
            with db:  # commits on success, rolls back on error
                yield db
        finally:
            db.close()

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        """The stored answers of ``keys``; a row that does not read back (cut-short JSON, no answer)
        is a miss: the question is asked again and its row replaced."""
        out: dict[str, dict] = {}
        unique = list(dict.fromkeys(keys))
        with self._guard("read"), self._connect() as db:
            for start in range(0, len(unique), 500):  # SQLite's host-parameter limit
                chunk = unique[start:start + 500]
                rows = db.execute(f"SELECT key, value FROM verdicts WHERE key IN ({','.join('?' * len(chunk))})",
                                  chunk).fetchall()
                out.update((k, v) for k, v in ((k, _answer(v)) for k, v in rows) if v is not None)
        return out

    def put_many(self, items: dict[str, dict]) -> None:
        if not items:
            return
        now = time.time()
        with self._guard("write"), self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO verdicts (key, value, created) VALUES (?, ?, ?)",
                           [(k, json.dumps(v), now) for k, v in items.items()])

    @contextlib.contextmanager
    def _guard(self, what: str):
        """A damaged file (a page cut short, another table of that name) found while reading or writing
        is a one-line error naming it: the cache may hold answers that cost money, so it is not
        thrown away here."""
        try:
            yield
        except sqlite3.Error as e:
            raise AlignkitError(f"{self.path}: cannot {what} the judge cache ({e}); move the file away to "
                                f"start a new cache, or set the judge's cache: false") from None

    def __len__(self) -> int:
        with self._guard("read"), self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]


def _answer(value: str) -> dict | None:
    """A stored row's ``{"answer": ...}``, or None when the row does not read back as one."""
    try:
        data = json.loads(value)
    except (TypeError, ValueError):
        return None
    return data if isinstance(data, dict) and "answer" in data else None
