"""Export: consensus rules by hand, the three file formats, and the CLI end to end."""

from __future__ import annotations

import json

import pytest

from alignkit.errors import DataError
from alignkit.feedback.cli import main
from alignkit.feedback.export import consensus_pairs, export_project, item_outcome, winloss_summary
from alignkit.feedback.items import parse_project_lines
from alignkit.feedback.storage import ItemRecord, LabelRecord, Store


def _ranked(*rankings):
    labels = [LabelRecord(f"u{i}", r, r is None, None) for i, r in enumerate(rankings)]
    return ItemRecord("x", "Q", ["a", "b", "c"], {}, labels)


def test_consensus_mean_rank_pairs_by_hand():
    # u0: a > b > c (ranks 1,2,3); u1: b > a = c (ranks 2,1,2); u2 flagged can't rank.
    # Mean ranks over u0, u1: a = (1+2)/2 = 1.5, b = (2+1)/2 = 1.5, c = (3+2)/2 = 2.5
    # a-b equal -> no pair; a over c by 1.0; b over c by 1.0.
    pairs, dropped = consensus_pairs(_ranked([1, 2, 3], [2, 1, 2], None))
    assert dropped is None
    assert pairs == [
        {"prompt": "Q", "chosen": "a", "rejected": "c", "margin": 1.0},
        {"prompt": "Q", "chosen": "b", "rejected": "c", "margin": 1.0},
    ]


def test_items_flagged_by_at_least_half_are_dropped():
    assert consensus_pairs(_ranked([1, 2, 3], None, None)) == ([], "cant_rank")
    assert consensus_pairs(_ranked([1, 2, 3], None)) == ([], "cant_rank")  # half is enough
    pairs, dropped = consensus_pairs(_ranked([1, 2, 3], [1, 2, 3], None))
    assert dropped is None and len(pairs) == 3


def test_pairwise_majority_and_vote_ties():
    def item(*winners):
        return ItemRecord("x", "Q", ["a", "b"], {}, [LabelRecord(f"u{i}", None, False, w) for i, w in enumerate(winners)])

    assert item_outcome(item("model_a", "model_a", "model_b")) == "model_a"
    assert item_outcome(item("model_a", "model_b")) == "tie"  # a tie on the vote
    assert item_outcome(item("both_bad", "both_bad", "tie")) == "both_bad"
    records = [item("model_a"), item("model_b", "model_b"), item("model_a", "model_b"), item("both_bad")]
    assert winloss_summary(records, "sft", "rlhf") == {
        "model_a": "sft", "model_b": "rlhf", "wins": 1, "ties": 1, "losses": 1, "both_bad": 1,
    }


def test_export_files_of_a_ranking_project(tmp_path, sqlite_url, fb):
    store = Store(sqlite_url)
    lines = fb.ranking_lines(3, k=3)
    store.create_project("r", parse_project_lines(lines, "ranking", "in.jsonl"), overlap=3)
    u, v, w = (store.labeler_for_token(store.invite("r", n)) for n in ("u", "v", "w"))
    store.submit(u, 1, ranks=[1, 2, 3])
    store.submit(v, 1, ranks=[1, 3, 2])
    store.submit(w, 1, cant_rank=True)
    store.submit(u, 2, cant_rank=True)
    store.submit(v, 2, cant_rank=True)  # item 2: 2 of 2 flagged -> dropped
    summary = export_project(store, "r", tmp_path / "out")
    store.close()

    rankings = [json.loads(x) for x in (tmp_path / "out" / "rankings.jsonl").read_text().splitlines()]
    assert len(rankings) == 2  # item 3 has no label
    assert rankings[0]["id"] == "r0"
    assert rankings[0]["prompt"] == "Prompt number 0"
    assert rankings[0]["completions"] == ["completion 0 of prompt 0", "completion 1 of prompt 0", "completion 2 of prompt 0"]
    assert rankings[0]["rankings"] == [
        {"labeler": "u", "ranks": [1, 2, 3], "cant_rank": False},
        {"labeler": "v", "ranks": [1, 3, 2], "cant_rank": False},
        {"labeler": "w", "ranks": None, "cant_rank": True},
    ]
    prefs = [json.loads(x) for x in (tmp_path / "out" / "preferences.jsonl").read_text().splitlines()]
    # Means: c0 = 1, c1 = 2.5, c2 = 2.5 -> c0 > c1 (1.5), c0 > c2 (1.5); c1 = c2 gives no pair.
    assert [(p["chosen"][:12], p["rejected"][:12], p["margin"]) for p in prefs] == [
        ("completion 0", "completion 1", 1.5),
        ("completion 0", "completion 2", 1.5),
    ]
    assert set(prefs[0]) == {"prompt", "chosen", "rejected", "margin"}
    assert summary["dropped_cant_rank"] == 1 and summary["preference_pairs"] == 2
    assert json.loads((tmp_path / "out" / "export_summary.json").read_text())["items_labeled"] == 2


def test_cli_pairwise_round_trip(tmp_path, fb, capsys):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    src = tmp_path / "eval.jsonl"
    src.write_text("\n".join(fb.pairwise_lines(4)) + "\n")
    assert main(["label", "create-project", "--db", db, "--file", str(src), "--kind", "pairwise", "--name", "h", "--overlap", "1"]) == 0
    assert main(["invite", "--db", db, "--project", "h", "--labeler", "ann", "--base-url", "http://127.0.0.1:9000"]) == 0
    link = capsys.readouterr().out.strip().splitlines()[-1]
    assert link.startswith("http://127.0.0.1:9000/l/")

    store = Store(db)
    ann = store.labeler_for_token(link.rsplit("/", 1)[1])
    for t in store.next_tasks(ann, 4):
        # Always prefer the RLHF answer, wherever it is shown.
        store.submit(ann, t.item_id, choice="A" if t.completions[0].startswith("rlhf") else "B")
    store.close()

    assert main(["export", "--db", db, "--project", "h", "--out", str(tmp_path / "ex")]) == 0
    assert main(["status", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "h (pairwise): 4 items x 1 labelers, 4 labels (100.0%)" in out
    lines = [json.loads(x) for x in (tmp_path / "ex" / "winloss.jsonl").read_text().splitlines()]
    assert lines[0] == {"id": "p0", "prompt": "Question 0", "model_a": "sft-model", "model_b": "rlhf-model",
                        "winner": "model_b", "labeler": "ann"}
    table = json.loads((tmp_path / "ex" / "winloss_summary.json").read_text())
    assert table == {"model_a": "sft-model", "model_b": "rlhf-model", "wins": 0, "ties": 0, "losses": 4, "both_bad": 0}


def test_bad_input_files_give_one_line_errors(tmp_path, capsys):
    def err(text: str, kind: str = "ranking") -> str:
        with pytest.raises(DataError) as e:
            parse_project_lines(text.splitlines(), kind, "gen.jsonl")
        return str(e.value)

    assert err('{"prompt": "q", "completions": ["a", "b"]}\n{"prompt": "q", "completions": "ab"}') == (
        "gen.jsonl:line 2: field 'completions': missing or not a list of strings"
    )
    assert err('{"prompt": "q", "completions": ["a", 3]}') == "gen.jsonl:line 1: field 'completions[1]': must be a string, got int"
    assert err('{"prompt": [{"role": "robot", "content": "x"}], "completions": ["a", "b"]}').startswith(
        "gen.jsonl:line 1: field 'prompt[0]':"
    )
    assert err("{nope").startswith("gen.jsonl:line 1: invalid JSON")
    assert err('{"prompt": "q", "completions": ["a", "b"], "id": 1}\n{"prompt": "q", "completions": ["a", "b"], "id": "1"}') == (
        "gen.jsonl:line 2: field 'id': duplicate id '1' (first on line 1)"
    )
    two_pairs = (
        '{"prompt": "q", "response_a": "x", "response_b": "y", "model_a": "m1", "model_b": "m2"}\n'
        '{"prompt": "q", "response_a": "x", "response_b": "y", "model_a": "m1", "model_b": "m3"}'
    )
    assert err(two_pairs, "pairwise").startswith("gen.jsonl:line 2: field 'model_a': a pairwise project compares two models")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q"}\n')
    assert main(["create-project", "--db", f"sqlite:///{tmp_path / 'x.db'}", "--file", str(bad), "--kind", "ranking", "--name", "x"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}:line 1: field 'completions': missing or not a list of strings"


def test_pairwise_lines_naming_the_models_the_other_way_round_are_turned_around():
    lines = [
        '{"prompt": "q1", "response_a": "from m1", "response_b": "from m2", "model_a": "m1", "model_b": "m2"}',
        '{"prompt": "q2", "response_a": "from m2", "response_b": "from m1", "model_a": "m2", "model_b": "m1"}',
    ]
    pf = parse_project_lines(lines, "pairwise", "e.jsonl")
    assert (pf.model_a, pf.model_b) == ("m1", "m2")
    assert [it.completions for it in pf.items] == [["from m1", "from m2"], ["from m1", "from m2"]]


def test_rankings_export_reads_back_with_alignkits_ranking_reader(tmp_path, sqlite_url, fb):
    # rankings.jsonl is what `alignkit rm` trains on: its reader must take it, and its
    # mean_rank rule must give exactly the pairs of preferences.jsonl.
    formats = pytest.importorskip("alignkit.data.formats")
    store = Store(sqlite_url)
    store.create_project("r", parse_project_lines(fb.ranking_lines(4, k=3), "ranking", "in.jsonl"), overlap=3)
    who = [store.labeler_for_token(store.invite("r", n)) for n in ("u", "v", "w")]
    labels = {1: ([1, 2, 3], [2, 2, 1], None), 2: ([1, 1, 3], None, None), 3: ([3, 1, 2], [3, 1, 2], [1, 3, 2])}
    for item, per_labeler in labels.items():
        for labeler, ranks in zip(who, per_labeler):
            store.submit(labeler, item, ranks=ranks, cant_rank=ranks is None)
    export_project(store, "r", tmp_path / "out")
    store.close()

    items = formats.load_rankings(str(tmp_path / "out" / "rankings.jsonl"))
    assert len(items) == 3
    # (Their reader holds a text prompt as one user message; compare the pairs.)
    theirs = [(p.chosen, p.rejected, p.margin) for it in items for p in formats.ranking_to_pairs(it, "mean_rank")]
    ours = [json.loads(x) for x in (tmp_path / "out" / "preferences.jsonl").read_text().splitlines()]
    assert theirs == [(p["chosen"], p["rejected"], pytest.approx(p["margin"])) for p in ours]
    # Item 1 means (1.5, 2, 2): 2 pairs; item 2: two of three flagged, dropped;
    # item 3 means (7/3, 5/3, 2): 3 pairs.
    assert len(ours) == 2 + 0 + 3


def test_alignkit_label_through_the_main_cli(tmp_path, fb, capsys):
    from alignkit.cli import main as alignkit_main

    src = tmp_path / "gen.jsonl"
    src.write_text("\n".join(fb.ranking_lines(2)) + "\n")
    db = f"sqlite:///{tmp_path / 'main.db'}"
    assert alignkit_main(["label", "create-project", "--db", db, "--file", str(src), "--kind", "ranking", "--name", "r"]) == 0
    assert alignkit_main(["label", "status", "--db", db]) == 0
    assert "r (ranking): 2 items x 3 labelers, 0 labels" in capsys.readouterr().out
