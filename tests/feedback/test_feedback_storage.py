"""Storage rules, run on SQLite and on a real PostgreSQL server (ALIGNKIT_TEST_PG_URL)."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from alignkit.feedback.storage import Assignment, Conflict, Invalid, Label, NotFound, normalise_ranks


def _labelers(store, project, n):
    return [store.labeler_for_token(store.invite(project, f"labeler{i}")) for i in range(n)]


def test_overlap_caps_how_many_labelers_get_an_item(store, fb):
    store.create_project("p", fb.ranking_project(3), overlap=2)
    a, b, c = _labelers(store, "p", 3)
    # Breadth first: a and b each get all 3 items; c finds every item at its overlap.
    assert [t.item_id for t in store.next_tasks(a, 10)] == [1, 2, 3]
    assert len(store.next_tasks(b, 10)) == 3
    assert store.next_tasks(c, 10) == []
    # Asking again returns the same open tasks, nothing new.
    assert [t.item_id for t in store.next_tasks(a, 10)] == [1, 2, 3]
    with pytest.raises(Conflict):
        store.submit(c, 1, ranks=[1, 2, 3, 4])


def test_fewest_labels_first(store, fb):
    store.create_project("p", fb.ranking_project(4), overlap=3)
    a, b = _labelers(store, "p", 2)
    assert [t.item_id for t in store.next_tasks(a, 2)] == [1, 2]
    assert [t.item_id for t in store.next_tasks(b, 2)] == [3, 4]  # untouched items before second labels


def test_submit_is_idempotent_and_a_change_updates_the_same_row(store, fb):
    store.create_project("p", fb.ranking_project(2, k=3), overlap=1)
    (a,) = _labelers(store, "p", 1)
    item = store.next_tasks(a)[0].item_id
    label_id, status = store.submit(a, item, ranks=[2, 1, 3], submission_id="s1")
    assert status == "created"
    assert store.submit(a, item, ranks=[2, 1, 3], submission_id="s1") == (label_id, "unchanged")
    assert store.submit(a, item, ranks=[1, 1, 3], submission_id="s2") == (label_id, "updated")
    assert store.submit(a, item, ranks=[1, 1, 2], submission_id="s3") == (label_id, "unchanged")  # same label
    # A late retry of s1 (sent before s2, arriving after it) must not undo s2.
    assert store.submit(a, item, ranks=[2, 1, 3], submission_id="s1") == (label_id, "unchanged")
    with store.read() as s:
        assert s.scalar(select(func.count()).select_from(Label)) == 1
        assert s.scalar(select(Label.ranks)) == [1, 1, 2]  # stored dense
        assert s.scalar(select(Label.revision)) == 2
    assert store.task(a, item).my_label == {"ranks": [1, 1, 2], "cant_rank": False}


def test_unique_per_item_and_labeler_under_concurrent_retries(store, fb):
    # Eight threads send the same label at once, as a client retrying a timed-out
    # request might: exactly one row, exactly one "created".
    store.create_project("p", fb.ranking_project(1), overlap=1)
    (a,) = _labelers(store, "p", 1)
    item = store.next_tasks(a)[0].item_id
    statuses: list[str] = []
    barrier = threading.Barrier(8)

    def send():
        barrier.wait()
        statuses.append(store.submit(a, item, ranks=[4, 3, 2, 1], submission_id="same")[1])

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Counter(statuses) == {"created": 1, "unchanged": 7}
    with store.read() as s:
        assert s.scalar(select(func.count()).select_from(Label)) == 1


def test_labelers_only_reach_their_own_project(store, fb):
    store.create_project("p", fb.ranking_project(2), overlap=2)
    store.create_project("q", fb.ranking_project(2), overlap=2)
    (a,) = _labelers(store, "p", 1)
    (other,) = _labelers(store, "q", 1)
    q_item = store.next_tasks(other)[0].item_id
    with pytest.raises(NotFound):
        store.submit(a, q_item, ranks=[1, 2, 3, 4])
    with pytest.raises(NotFound):
        store.task(a, q_item)
    assert store.my_labels(a) == []


def test_validation(store, fb):
    store.create_project("p", fb.ranking_project(1, k=3), overlap=1)
    (a,) = _labelers(store, "p", 1)
    item = store.next_tasks(a)[0].item_id
    for bad in ([1, 2], [0, 1, 2], [1, 2, 4], ["1", 2, 3], [True, 2, 3]):
        with pytest.raises(Invalid):
            store.submit(a, item, ranks=bad)
    with pytest.raises(Invalid):
        store.submit(a, item, ranks=[1, 2, 3], cant_rank=True)
    with pytest.raises(Invalid):
        store.submit(a, item, choice="A")
    assert store.submit(a, item, cant_rank=True)[1] == "created"
    assert store.task(a, item).my_label == {"ranks": None, "cant_rank": True}
    with pytest.raises(Invalid):
        store.create_project("bad name/with slash", fb.ranking_project(1), overlap=1)
    with pytest.raises(Conflict):
        store.create_project("p", fb.ranking_project(1), overlap=1)


def test_pairwise_sides_are_shuffled_and_mapped_back(store, fb):
    store.create_project("h", fb.pairwise_project(40), overlap=1)
    (a,) = _labelers(store, "h", 1)
    tasks = store.next_tasks(a, 40)
    # Shown order differs between items (40 fair coin flips all alike: p = 2^-39).
    shown_first = {t.completions[0].split()[0] for t in tasks}
    assert shown_first == {"sft", "rlhf"}
    for t in tasks:
        store.submit(a, t.item_id, choice="A")  # always pick what is shown on the left
    _, records = store.project_records("h")
    for t, r in zip(tasks, records):
        expected = "model_a" if t.completions[0].startswith("sft") else "model_b"
        assert r.labels[0].winner == expected
        assert store.task(a, t.item_id).my_label == {"choice": "A"}


def test_expired_assignment_frees_its_slot(store, fb):
    store.create_project("p", fb.ranking_project(1), overlap=1)
    a, b = _labelers(store, "p", 2)
    item = store.next_tasks(a)[0].item_id
    assert store.next_tasks(b) == []
    with store.write() as s:  # a walked away two hours ago
        s.execute(update(Assignment).values(expires_at=Assignment.assigned_at - timedelta(seconds=1)))
    assert [t.item_id for t in store.next_tasks(b)] == [item]
    with pytest.raises(Conflict):  # a comes back, but the slot is b's now
        store.submit(a, item, ranks=[1, 2, 3, 4])
    assert store.submit(b, item, ranks=[1, 2, 3, 4])[1] == "created"


def test_invite_again_revokes_the_old_token(store, fb):
    store.create_project("p", fb.ranking_project(1), overlap=1)
    old = store.invite("p", "alice")
    new = store.invite("p", "alice")
    assert store.labeler_for_token(old) is None
    assert store.labeler_for_token(new).name == "alice"
    assert store.project_summary("p").n_labelers == 1


def test_summary_and_records(store, fb):
    store.create_project("p", fb.ranking_project(2), overlap=2)
    a, b = _labelers(store, "p", 2)
    for who in (a, b):
        for t in store.next_tasks(who, 2):
            store.submit(who, t.item_id, ranks=[1, 2, 3, 4])
    summary = store.project_summary("p")
    assert (summary.n_items, summary.n_labels, summary.n_items_complete) == (2, 4, 2)
    assert summary.labelers == {"labeler0": 2, "labeler1": 2}
    _, records = store.project_records("p")
    assert [r.ext_id for r in records] == ["r0", "r1"]
    assert records[0].meta == {"scores": [0, 1, 2, 3]}  # unknown input keys travel in meta
    assert [lab.labeler for lab in records[0].labels] == ["labeler0", "labeler1"]


def test_normalise_ranks_dense_form():
    # Ties share a rank and the next rank follows: alignkit's ranking format.
    assert normalise_ranks([1, 1, 3], 3) == [1, 1, 2]
    assert normalise_ranks([3, 1, 2], 3) == [3, 1, 2]
    assert normalise_ranks([2, 2, 2], 3) == [1, 1, 1]
    assert normalise_ranks([4, 1, 4, 2], 4) == [3, 1, 3, 2]
