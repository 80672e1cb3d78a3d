"""Chain stages from one YAML file, and repeat a block of them in rounds.

    alignkit run pipeline.yaml                 # runs what is not done yet
    alignkit run pipeline.yaml --from rm       # reruns rm and everything after it
    alignkit run pipeline.yaml stages.ppo.ppo.steps=20   # dotted overrides per stage

A pipeline file::

    name: demo                 # everything lands in runs/demo/STAGE/
    output_dir: runs
    stages:
      - name: label            # how later stages refer to this one
        stage: label-ai        # any alignkit stage with a config
        config:                # an inline config (or a path to a YAML file)
          model: {name: builtin:smollm2-135m-instruct}
      - name: rm
        stage: rm
        config:
          data: {path: "${label.final}/pairs.jsonl"}

``${NAME}`` is stage NAME's run folder and ``${NAME.final}`` its output folder.
Every stage's config (keys, references) is checked before the first stage runs.
A stage that finished with the same resolved config is skipped; a changed
config reruns that stage and every stage after it; a stage that was interrupted
resumes from its last checkpoint.

**Rounds** (the loop of RLHF: new policy -> new samples -> new labels -> better reward
model -> next policy). ``rounds`` repeats a block of stages ``count`` times, each round
in ``runs/NAME/round-K/STAGE/``; ``after`` stages run once the rounds are done::

    rounds:
      count: 2
      policy: ppo                                # its final/ is the next round's ${policy}
      start: builtin:smollm2-135m-instruct       # ${policy} in round 1
      labels: {2: runs/feedback/r2/preferences.jsonl}   # optional: human labels for round 2
      stages:
        - {name: label, stage: label-ai, config: {model: {name: "${policy}"}}}
        - {name: rm, stage: rm, config: {data: {path: "${label.all}"}}}
        - {name: ppo, stage: ppo, config: {model: {name: "${policy}"}, reward: {spec: "rm:${rm}"}}}
    after:
      - {name: eval, stage: eval, config: {models: [{name: r1, path: "${ppo@1}", round: 1},
                                                     {name: r2, path: "${ppo@2}", round: 2}]}}

Inside a round, ``${NAME}`` is this round's stage, ``${NAME@K}`` round K's (anywhere),
``${policy}`` the model this round starts from, and ``${NAME.all}`` the ``pairs.jsonl`` of
stage NAME of every round so far in one file (``${NAME.final}/pairs.jsonl``: this round's
only). ``labels`` gives a round's pairs from a file instead of running the block's first
stage: the feedback app's export (``alignkit label export``), so human labels can stand in
for the AI labels in any round. Skip, rerun and resume rules are those of plain stages:
the rounds are stages in a row.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.config import build, opt, override_value
from alignkit.data.io import read_yaml
from alignkit.errors import AlignkitError, ConfigError
from alignkit.runs import config_hash

MARKER = "pipeline.done"  # written after a stage returns; holds its config hash
_REF = re.compile(r"\$\{([A-Za-z0-9_-]+)(?:@(\d+))?(\.final|\.all)?\}")
_ANY_REF = re.compile(r"\$\{[^}]*\}")  # whatever looks like a reference, to catch the ones _REF cannot read
_NAME = re.compile(r"[A-Za-z0-9_-]+")  # what ${NAME} can name
_NOT_STAGES = ("run", "demo", "label", "chat", "generate", "serve")


@dataclass
class StageSpec:
    name: str = ""  # required: checked by load_pipeline, which names the entry
    stage: str = ""  # required
    config: Any = field(default_factory=dict)  # mapping, or a path to a YAML file


@dataclass
class RoundsSpec:
    count: int = opt(1, ge=1, help="how many times the block runs")
    policy: str = opt("", help="the stage of the block whose final/ is the next round's ${policy}")
    start: str = opt("", help="${policy} in round 1: a model name or folder")
    labels: dict = opt(default_factory=dict, help="{round: preference file}: that round's pairs come from the "
                                                  "file (human labels) instead of the block's first stage")
    stages: list[StageSpec] = field(default_factory=list)


@dataclass
class Pipeline:
    name: str = "pipeline"
    output_dir: str = "runs"
    stages: list[StageSpec] = field(default_factory=list)
    rounds: RoundsSpec | None = None
    after: list[StageSpec] = field(default_factory=list)


@dataclass(frozen=True)
class Step:
    """One stage to run: a plain stage (``round`` None) or a stage of round ``round``."""

    spec: StageSpec
    round: int | None = None

    @property
    def key(self) -> str:
        return self.spec.name if self.round is None else f"{self.spec.name}@{self.round}"


def load_pipeline(path: str | Path, overrides: list[str] | tuple = ()) -> Pipeline:
    """Read and check a pipeline file; stage configs are checked when each stage starts."""
    raw = read_yaml(path, "pipeline") or {}
    pipe = build(Pipeline, raw, str(path))
    from alignkit.cli import STAGES

    seen: set[str] = set()
    blocks = [("stages", pipe.stages), ("after", pipe.after)]
    if pipe.rounds is not None:
        blocks.insert(1, ("rounds.stages", pipe.rounds.stages))
    if not any(specs for _, specs in blocks):
        raise ConfigError(f"{path}: no stages: give 'stages' (a list of {{name, stage, config}}) or 'rounds'")
    for where, specs in blocks:
        for i, spec in enumerate(specs):
            for key in ("name", "stage"):
                if not isinstance(getattr(spec, key), str) or not getattr(spec, key).strip():
                    raise ConfigError(f"{path}: '{where}[{i}].{key}' is missing or empty")
            if not _NAME.fullmatch(spec.name):
                raise ConfigError(f"{path}: '{where}[{i}].name': '{spec.name}' cannot be named by ${{...}}; "
                                  f"use letters, digits, '_' and '-'")
            if spec.stage not in STAGES or spec.stage in _NOT_STAGES:
                raise ConfigError(f"{path}: '{where}[{i}].stage': '{spec.stage}' is not a pipeline stage")
            if spec.name in seen or spec.name == "policy":
                raise ConfigError(f"{path}: '{where}[{i}].name': '{spec.name}' is used twice")
            seen.add(spec.name)
            if isinstance(spec.config, str):
                spec.config = str((Path(path).parent / spec.config).resolve())
            elif not isinstance(spec.config, dict):
                raise ConfigError(f"{path}: '{where}[{i}].config' must be a mapping or a file path")
    if pipe.rounds is not None:
        _check_rounds(pipe.rounds, str(path))
    every = {s.name: s for _, specs in blocks for s in specs}
    for item in overrides:  # stages.NAME.key.sub=value (NAME may be in rounds or after)
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 3 or parts[0] != "stages":
            raise ConfigError(f"command line: pipeline override '{item}' must look like stages.NAME.key=value")
        spec = every.get(parts[1])
        if spec is None:
            raise ConfigError(f"command line: no stage named '{parts[1]}' in {path}")
        if isinstance(spec.config, str):
            spec.config = read_yaml(spec.config, f"stage '{spec.name}' config") or {}
        node = spec.config
        for part in parts[2:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = override_value(key, value)
    return pipe


def _check_rounds(r: RoundsSpec, path: str) -> None:
    names = [s.name for s in r.stages]
    if not names:
        raise ConfigError(f"{path}: 'rounds.stages' is empty")
    if r.policy not in names:
        raise ConfigError(f"{path}: 'rounds.policy' must name a stage of the rounds ({', '.join(names)}), "
                          f"got {r.policy!r}")
    if not r.start:
        raise ConfigError(f"{path}: 'rounds.start' is empty: give the model round 1 starts from")
    for k, file in r.labels.items():
        if not isinstance(k, int) or not 1 <= k <= r.count:
            raise ConfigError(f"{path}: 'rounds.labels': {k!r} is not a round (1..{r.count})")
        if not Path(str(file)).is_file():
            raise ConfigError(f"{path}: 'rounds.labels.{k}': {file} is not a file")


def plan(pipe: Pipeline) -> list[Step]:
    """The stages in the order they run: the plain ones, every round's block, the ``after`` ones."""
    steps = [Step(s) for s in pipe.stages]
    if pipe.rounds is not None:
        steps += [Step(s, k) for k in range(1, pipe.rounds.count + 1) for s in pipe.rounds.stages]
    return steps + [Step(s) for s in pipe.after]


def _run_name(pipe: Pipeline, step: Step) -> str:
    """The run name a step's stage writes under: the pipeline's, in a round's folder, and in the
    stage's own name when its block has two stages of the same kind (two ``rl`` runs, say)."""
    name = pipe.name if step.round is None else f"{pipe.name}/round-{step.round}"
    block = pipe.rounds.stages if step.round is not None else pipe.stages + pipe.after
    if sum(s.stage == step.spec.stage for s in block) > 1:
        name = f"{name}/{step.spec.name}"
    return name


def folder_of(pipe: Pipeline, step: Step) -> Path:
    return Path(pipe.output_dir) / _run_name(pipe, step) / step.spec.stage


def _resolve_refs(value: Any, lookup, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _resolve_refs(v, lookup, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_refs(v, lookup, where) for v in value]
    if isinstance(value, str):
        for m in _ANY_REF.finditer(value):
            if not _REF.fullmatch(m.group(0)):  # ${a.fnal}: left as it is, it would be read as a path
                raise ConfigError(f"{where}: '{m.group(0)}' is not a reference; use ${{NAME}}, ${{NAME.final}}, "
                                  f"${{NAME.all}}, ${{NAME@K}} or ${{policy}}")
        return _REF.sub(lambda m: lookup(m.group(1), m.group(2), m.group(3), where), value)
    return value


def stage_config(pipe: Pipeline, spec: StageSpec, folders: dict[str, Path], source: str, step: Step | None = None,
                 merge=None):
    """The stage's module and its config, with references resolved against the stages before it.

    ``folders`` maps the keys of earlier steps (``NAME`` for plain stages, ``NAME@K`` for
    round K's) to their run folders.
    """
    from alignkit.cli import STAGES

    step = step or Step(spec)
    rounds = pipe.rounds

    def lookup(name: str, round_no: str | None, suffix: str | None, where: str) -> str:
        if name == "policy" and round_no is None and suffix is None:
            if step.round is None:
                raise ConfigError(f"{where}: '${{policy}}' is only defined inside rounds")
            if step.round == 1:
                return rounds.start
            return str(folders[f"{rounds.policy}@{step.round - 1}"] / "final")
        key = name if round_no is None and step.round is None else f"{name}@{round_no or step.round}"
        if key not in folders and round_no is None:
            key = name  # a plain stage named from inside a round
        if key not in folders:
            raise ConfigError(f"{where}: '${{{name}{'@' + round_no if round_no else ''}}}' names no earlier stage")
        if suffix == ".all":
            if merge is None or "@" not in key:
                raise ConfigError(f"{where}: '${{{name}.all}}' names a stage of the rounds")
            upto = int(key.rpartition("@")[2])
            return str(merge(name, [folders[f"{name}@{k}"] for k in range(1, upto + 1)], upto))
        return str(folders[key] / "final" if suffix == ".final" else folders[key])

    module = importlib.import_module(STAGES[spec.stage][0])
    raw = spec.config
    if isinstance(raw, str):
        raw = read_yaml(raw, f"stage '{spec.name}' config") or {}
    label = spec.name if step.round is None else f"{spec.name}' (round {step.round})"
    raw = _resolve_refs(raw, lookup, f"{source}: stage '{label}'".replace("'' (", "' ("))
    raw.setdefault("run", {})
    raw["run"] = {**raw["run"], "name": _run_name(pipe, step), "output_dir": pipe.output_dir}
    cfg = build(module.Config, raw, f"{source}: stage '{spec.name}'")
    return module, cfg


def run_pipeline(path: str | Path, overrides: list[str] | tuple = (), start_from: str | None = None,
                 console=None, rename: dict | None = None) -> dict[str, Path]:
    """Run the stages not done yet; returns each stage's run folder by key (``NAME``, ``NAME@K``).

    ``rename`` may replace the pipeline's ``name`` and ``output_dir``.
    """
    from rich.console import Console

    from alignkit.training import Engine

    console = console or Console()
    # Under accelerate launch / torchrun every process runs every stage; the main one keeps the books.
    engine = Engine()
    say = console.print if engine.is_main else (lambda *a, **k: None)
    pipe = load_pipeline(path, overrides)
    for key, value in (rename or {}).items():
        setattr(pipe, key, value)
    steps = plan(pipe)
    if start_from and start_from not in {s.key for s in steps} | {s.spec.name for s in steps}:
        raise AlignkitError(f"--from {start_from}: no such stage in {path}")
    check_stages(pipe, steps, str(path))
    folders: dict[str, Path] = {}

    def merge(name: str, round_folders: list[Path], upto: int) -> Path:
        """Stage NAME's pairs of rounds 1..upto in one file (the reward model learns from all of them)."""
        out = _merged_pairs(pipe, name, upto)
        if engine.is_main and all((f / "final" / "pairs.jsonl").exists() for f in round_folders):
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            with tmp.open("wb") as f:
                for folder in round_folders:
                    f.write((folder / "final" / "pairs.jsonl").read_bytes())
            tmp.replace(out)
        return out

    stale = False  # once a stage reruns, every later stage reruns too
    started = time.time()
    for i, step in enumerate(steps, 1):
        spec, folder = step.spec, folder_of(pipe, step)
        human = pipe.rounds.labels.get(step.round) if pipe.rounds and step.round else None
        human = human if human and spec is pipe.rounds.stages[0] else None
        engine.wait()  # the pairs a reference merges are written before anyone reads the config
        module, cfg = stage_config(pipe, spec, folders, str(path), step, merge)
        digest = config_hash(cfg) if human is None else _file_digest(Path(str(human)))
        marker = folder / MARKER
        folders[step.key] = folder
        if start_from in (step.key, spec.name):
            stale = True
        done = marker.exists() and marker.read_text().strip() == digest
        header = f"[bold]stage {i}/{len(steps)}[/] {step.key} ({spec.stage})"
        if done and not stale:
            say(f"{header}: done with the same config, skipped")
            continue
        same_config = (folder / "config.hash").exists() and (folder / "config.hash").read_text() == digest
        resume = folder.exists() and same_config and not stale and not marker.exists()  # interrupted: continue
        engine.wait()  # every process has read the folder before the main one changes it
        if engine.is_main:
            if folder.exists() and not resume:
                shutil.rmtree(folder)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.hash").write_text(digest)
        engine.wait()
        stale = True
        t0 = time.time()
        if human is not None:
            say(f"{header}: labels from {human} (instead of running {spec.stage})")
            if engine.is_main:
                _take_labels(Path(str(human)), folder)
        else:
            say(f"{header}: {'resuming' if resume else 'running'} (pipeline time so far "
                f"{time.time() - started:.0f} s)")
            module.main(cfg, resume=resume)
        if engine.is_main:
            marker.write_text(digest)
        engine.wait()
        say(f"{header}: finished in {time.time() - t0:.0f} s")
    return folders


def _merged_pairs(pipe: Pipeline, name: str, upto: int) -> Path:
    return Path(pipe.output_dir) / pipe.name / f"round-{upto}" / f"{name}-all-rounds" / "pairs.jsonl"


def check_stages(pipe: Pipeline, steps: list[Step], source: str) -> None:
    """Every stage's config, references resolved, checked before the first stage runs: a typo in the
    last stage's keys, or a reference to a stage that comes later (or never), fails in a second
    rather than after the stages before it have run. Folders are known in advance (:func:`folder_of`)."""
    folders: dict[str, Path] = {}
    for step in steps:
        module, cfg = stage_config(pipe, step.spec, folders, source, step,
                                   merge=lambda name, _folders, upto: _merged_pairs(pipe, name, upto))
        if hasattr(module, "check_config"):
            try:
                module.check_config(cfg)
            except ConfigError as e:
                raise ConfigError(f"{source}: stage '{step.key}': {e}") from None
        folders[step.key] = folder_of(pipe, step)


def _file_digest(path: Path) -> str:
    return "file:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _take_labels(path: Path, folder: Path) -> None:
    """A round's pairs from a preference file (checked record by record, as rm and dpo will read it)."""
    import json

    from alignkit.data.formats import load_preferences

    pairs = load_preferences(str(path))
    (folder / "final").mkdir(parents=True, exist_ok=True)
    with (folder / "final" / "pairs.jsonl").open("w", encoding="utf-8") as f:
        for p in pairs:
            row = {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                   "provenance": {"source": str(path), "record": p.loc, "labels": "given"}}
            if p.margin is not None:
                row["margin"] = p.margin
            f.write(json.dumps(row) + "\n")
    (folder / "DONE").write_text(json.dumps({"pairs": len(pairs), "source": str(path)}))


def cli(argv: list[str], stage: str = "run") -> int:
    p = argparse.ArgumentParser(prog="alignkit run", description="run a pipeline of stages from one YAML file")
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument("--from", dest="start_from", default=None, help="rerun from this stage name on")
    p.add_argument("overrides", nargs="*", metavar="stages.NAME.key=value")
    args = p.parse_args(argv)
    run_pipeline(args.pipeline, args.overrides, args.start_from)
    return 0

