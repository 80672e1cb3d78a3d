"""Load and faults, as labelers would cause them, through the HTTP API of a real server.

50 labelers label 200 items each at the same time (10,000 labels). Every label
the server acknowledged must be in the database exactly once, with the ranks
that were sent, also when the server is SIGKILLed half-way and restarted.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select

from alignkit.feedback.storage import Label, Labeler, Store

N_LABELERS = 50
LABELS_EACH = 200
K = 4
# 1,000 items seen by 10 labelers each: exactly the 10,000 labels sent, so the
# last labeler can only finish if no item was handed out beyond its overlap.
N_ITEMS = 1000
OVERLAP = 10
RETRY_FOR_S = 60.0


def _setup(db_url: str, fb) -> dict[str, str]:
    store = Store(db_url)
    store.create_project("load", fb.ranking_project(N_ITEMS, K), overlap=OVERLAP)
    tokens = {f"labeler{i:02d}": store.invite("load", f"labeler{i:02d}") for i in range(N_LABELERS)}
    store.close()
    return tokens


class Labelers:
    """The 50 clients; each retries a request until the server acknowledges it."""

    def __init__(self, url: str, tokens: dict[str, str]):
        self.url = url
        self.tokens = tokens
        self.acked: dict[tuple[str, int], list[int]] = {}
        self.lock = threading.Lock()
        self.retries = 0

    def _until_acked(self, send) -> httpx.Response:
        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            try:
                return send()
            except httpx.TransportError:
                # Refused, reset or cut short: the server is down or restarting.
                with self.lock:
                    self.retries += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def run_one(self, name: str) -> int:
        rng = random.Random(name)
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.tokens[name]}"}, timeout=30) as client:
            resp = self._until_acked(lambda: client.get("/api/tasks", params={"limit": LABELS_EACH}))
            assert resp.status_code == 200, resp.text
            tasks = resp.json()["tasks"]
            assert len(tasks) == LABELS_EACH
            for task in tasks:
                ranks = rng.sample(range(1, K + 1), K)
                body = {"item_id": task["item_id"], "ranks": ranks, "submission_id": uuid.uuid4().hex}
                resp = self._until_acked(lambda: client.post("/api/labels", json=body))
                assert resp.status_code == 200, resp.text
                assert resp.json()["status"] in ("created", "unchanged")  # "unchanged": a retry of a committed one
                with self.lock:
                    self.acked[(name, task["item_id"])] = ranks
        return len(tasks)

    def run_all(self) -> None:
        with ThreadPoolExecutor(N_LABELERS) as pool:
            done = list(pool.map(self.run_one, self.tokens))
        assert sum(done) == N_LABELERS * LABELS_EACH

    def n_acked(self) -> int:
        with self.lock:
            return len(self.acked)


def _assert_stored_exactly_once(db_url: str, acked: dict[tuple[str, int], list[int]]) -> None:
    store = Store(db_url)
    with store.read() as s:
        rows = s.execute(select(Labeler.name, Label.item_id, Label.ranks).join(Labeler, Labeler.id == Label.labeler_id)).all()
        per_item = s.execute(select(Label.item_id, func.count()).group_by(Label.item_id)).all()
    store.close()
    stored: dict[tuple[str, int], list[int]] = {}
    for name, item_id, ranks in rows:
        assert (name, item_id) not in stored, f"duplicate label {name} on item {item_id}"
        stored[(name, item_id)] = ranks
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} acknowledged labels lost, e.g. {sorted(missing)[:3]}"
    assert {key: stored[key] for key in acked} == acked  # the ranks that were sent
    assert len(stored) == len(acked) == N_LABELERS * LABELS_EACH
    assert max(n for _, n in per_item) <= OVERLAP


@pytest.mark.slow
def test_50_labelers_200_labels_each_every_label_stored_once(tmp_path, fb, live_server):
    db_url = f"sqlite:///{tmp_path / 'load.db'}"
    tokens = _setup(db_url, fb)
    server = live_server(db_url)

    labelers = Labelers(server.url, tokens)
    t0 = time.monotonic()
    labelers.run_all()
    elapsed = time.monotonic() - t0
    print(f"{N_LABELERS * LABELS_EACH} labels in {elapsed:.1f} s ({N_LABELERS * LABELS_EACH / elapsed:.0f}/s)")

    server.stop()
    _assert_stored_exactly_once(db_url, labelers.acked)


@pytest.mark.slow
def test_sigkill_mid_load_loses_no_acknowledged_label(tmp_path, fb, live_server):
    db_url = f"sqlite:///{tmp_path / 'fault.db'}"
    tokens = _setup(db_url, fb)
    server = live_server(db_url)
    labelers = Labelers(server.url, tokens)

    acked_at_kill: dict = {}

    def kill_and_restart():
        while labelers.n_acked() < N_LABELERS * LABELS_EACH // 3:
            time.sleep(0.01)
        server.kill()
        with labelers.lock:
            acked_at_kill.update(labelers.acked)
        server.start()

    killer = threading.Thread(target=kill_and_restart)
    killer.start()
    labelers.run_all()
    killer.join()

    assert 0 < len(acked_at_kill) < N_LABELERS * LABELS_EACH, "the kill did not land in the middle of the load"
    assert labelers.retries > 0, "no request noticed the kill"
    server.stop()
    # Everything acknowledged before the kill is there, and so is everything after.
    assert all(labelers.acked[k] == v for k, v in acked_at_kill.items())
    _assert_stored_exactly_once(db_url, labelers.acked)
