"""Fixtures for the feedback app: stores on SQLite and PostgreSQL, project files,
and a real server process (uvicorn on a free loopback port).

Test modules reach the helpers through the ``fb`` fixture rather than by
importing this file: tests/ has no __init__.py, so "conftest" is ambiguous.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from alignkit.feedback.items import parse_project_lines
from alignkit.feedback.storage import Store

ADMIN_TOKEN = "test-admin-token"
PG_URL_ENV = "ALIGNKIT_TEST_PG_URL"
REPO_ROOT = Path(__file__).resolve().parents[2]
OUTPUT_DIR = REPO_ROOT / "test-output" / "feedback"


def ranking_lines(n: int, k: int = 4, prompt=None) -> list[str]:
    return [
        json.dumps({
            "id": f"r{i}",
            "prompt": prompt or f"Prompt number {i}",
            "completions": [f"completion {j} of prompt {i}" for j in range(k)],
            "scores": list(range(k)),
        })
        for i in range(n)
    ]


def pairwise_lines(n: int) -> list[str]:
    return [
        json.dumps({"id": f"p{i}", "prompt": f"Question {i}", "response_a": f"sft answer {i}",
                    "response_b": f"rlhf answer {i}", "model_a": "sft-model", "model_b": "rlhf-model"})
        for i in range(n)
    ]


def ranking_project(n: int, k: int = 4, prompt=None):
    return parse_project_lines(ranking_lines(n, k, prompt), "ranking", source="test.jsonl")


def pairwise_project(n: int):
    return parse_project_lines(pairwise_lines(n), "pairwise", source="test.jsonl")


@pytest.fixture
def fb():
    return SimpleNamespace(
        ADMIN_TOKEN=ADMIN_TOKEN,
        ranking_lines=ranking_lines,
        pairwise_lines=pairwise_lines,
        ranking_project=ranking_project,
        pairwise_project=pairwise_project,
    )


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'feedback.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    """A fresh Store on SQLite, and again on PostgreSQL when ALIGNKIT_TEST_PG_URL is set."""
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'feedback.db'}")
        yield s
        s.close()
        return
    url = os.environ.get(PG_URL_ENV)
    if not url:
        pytest.skip(f"{PG_URL_ENV} is not set (source .ci/services.sh starts a PostgreSQL server)")
    yield from _pg_store(url)


def _pg_store(url: str):
    import sqlalchemy as sa

    # Each test gets its own schema, so runs never see each other's rows.
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    s = Store(url, connect_args={"options": f"-csearch_path={schema}"})
    try:
        yield s
    finally:
        s.close()
        with admin.connect() as c:
            c.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``alignkit label serve`` in a subprocess, which a test may SIGKILL and restart."""

    def __init__(self, db_url: str, log_path: Path):
        self.db_url = db_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        env = {**os.environ, "ALIGNKIT_ADMIN_TOKEN": ADMIN_TOKEN, "PYTHONUNBUFFERED": "1"}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "alignkit.feedback.cli", "serve", "--db", self.db_url, "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not start in {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, no flushing; what was committed must survive."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def live_server(tmp_path):
    """Factory: live_server(db_url) -> a started LiveServer, stopped after the test."""
    servers: list[LiveServer] = []

    def start(db_url: str) -> LiveServer:
        server = LiveServer(db_url, tmp_path / f"server{len(servers)}.log")
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def output_dir(request) -> Path:
    """test-output/feedback/<test name>/ (gitignored): screenshots and the like."""
    path = OUTPUT_DIR / request.node.name.replace("/", "_")
    path.mkdir(parents=True, exist_ok=True)
    return path
