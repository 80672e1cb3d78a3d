"""The CLI: stages listed, user mistakes are one-line errors with exit 2, chat runs on a tiny model."""

import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.cli import STAGES, main

ROOT = Path(__file__).resolve().parents[1]


def alignkit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "alignkit", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


def test_help_lists_every_stage():
    out = alignkit("--help")
    assert out.returncode == 0
    for stage in ("sft", "rm", "ppo", "dpo", "best-of-n", "label-ai", "cai", "label", "eval", "run", "demo",
                  "chat", "generate"):
        assert stage in STAGES and f"  {stage} " in out.stdout


def test_config_error_is_one_line_without_traceback(tmp_path, monkeypatch, capsys):
    import types
    from dataclasses import dataclass, field

    from alignkit.config import ModelConfig

    @dataclass
    class Config:
        model: ModelConfig = field(default_factory=ModelConfig)

    ran = []
    fake = types.ModuleType("fake_recipe")
    fake.Config, fake.main = Config, lambda cfg, resume=False: ran.append(cfg)
    monkeypatch.setitem(sys.modules, "fake_recipe", fake)
    monkeypatch.setitem(STAGES, "sft", ("fake_recipe", "x"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  nmae: tiny:llama\n")
    assert main(["sft", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "model.nmae" in err and len(err.strip().splitlines()) == 1
    assert main(["sft", "model.name=tiny:llama"]) == 0
    assert ran[0].model.name == "tiny:llama"


def test_unbuilt_stage_exits_nonzero_with_one_line(monkeypatch, capsys):
    monkeypatch.setitem(STAGES, "sft", ("alignkit.recipes.not_a_module", "x"))
    assert main(["sft"]) == 2
    err = capsys.readouterr().err
    assert "not built yet" in err and len(err.strip().splitlines()) == 1


def test_chat_and_generate_on_a_tiny_model(tmp_path):
    out = alignkit("chat", "--model", "tiny:llama", "--max-new-tokens", "4", "--greedy", "hello")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "user: hello"
    assert out.stdout.splitlines()[1].startswith("assistant:")
    dest = tmp_path / "gen.jsonl"
    out = alignkit("generate", "--model", "tiny:llama", "--prompts", str(ROOT / "tests/data/prompts.jsonl"),
                   "--n", "3", "--max-new-tokens", "4", "--out", str(dest))
    assert out.returncode == 0, out.stderr
    import json

    rows = [json.loads(line) for line in dest.read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["completions"]) == 3 for r in rows)
    assert rows[0]["id"] == "p1" and rows[0]["prompt"][0]["content"] == "Write a haiku about autumn."


def test_generate_best_of_n_keeps_the_highest_score(tmp_path):
    dest = tmp_path / "best.jsonl"
    out = alignkit("generate", "--model", "tiny:llama", "--prompts", str(ROOT / "tests/data/prompts.jsonl"),
                   "--best-of", "4", "--reward", "rule:length:5", "--max-new-tokens", "6", "--out", str(dest))
    assert out.returncode == 0, out.stderr
    import json

    for row in map(json.loads, dest.read_text().splitlines()):
        assert row["score"] == max(row["scores"]) and len(row["scores"]) == 4
        assert row["response"] == row["completions"][row["scores"].index(row["score"])]


@pytest.mark.parametrize("args,fragment", [
    (["generate", "--model", "tiny:llama", "--prompts", "missing.jsonl", "--out", "x.jsonl"], "no such file"),
    (["generate", "--model", "tiny:llama", "--prompts", "tests/data/prompts.jsonl", "--best-of", "2",
      "--out", "x.jsonl"], "--best-of needs --reward"),
])
def test_cli_user_errors(args, fragment, tmp_path):
    out = alignkit(*args)
    assert out.returncode == 2 and fragment in out.stderr and "Traceback" not in out.stderr


def test_demo_starts_with_a_reply_from_the_builtin_model():
    out = alignkit("demo", "--chat-only")
    assert out.returncode == 0, out.stderr
    user, assistant = out.stdout.strip().splitlines()[:2]
    assert user.startswith("user: ") and len(assistant) > len("assistant: ") + 20


def test_a_launched_process_exits_without_interpreter_teardown(monkeypatch, capsys):
    """Under a launch the entry point waits for the other processes, flushes its output and
    ends with os._exit(code): the interpreter's teardown of gloo's threads can abort a
    finished process (SIGABRT). Outside a launch it is a plain sys.exit."""
    from alignkit import cli

    events = []
    monkeypatch.setattr(cli, "run", lambda argv: print("stage output") or 0)
    monkeypatch.setattr(cli, "_launched", lambda: True)
    monkeypatch.setattr("torch.distributed.barrier", lambda: events.append("barrier"))
    monkeypatch.setattr("torch.distributed.get_rank", lambda: 1)

    class Exited(Exception):
        pass

    def fake_exit(code):
        events.append(("os._exit", code))
        raise Exited

    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    with pytest.raises(Exited):
        cli.entry()
    assert events == ["barrier", ("os._exit", 0)]
    assert capsys.readouterr().out == "stage output\n"

    # an error: no barrier (the others may be stuck), exit code 2 all the same
    events.clear()
    monkeypatch.setattr(cli, "run", lambda argv: (_ for _ in ()).throw(cli.AlignkitError("bad")))
    with pytest.raises(Exited):
        cli.entry()
    assert events == [("os._exit", 2)]
    assert capsys.readouterr().err == "[process 1] alignkit: error: bad\n"

    monkeypatch.setattr(cli, "_launched", lambda: False)
    with pytest.raises(SystemExit) as done:
        cli.entry()
    assert done.value.code == 2
