"""Chain stages from one YAML file.

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
A stage that finished with the same resolved config is skipped; a changed
config reruns that stage and every stage after it; a stage that was interrupted
resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignkit.config import build, override_value
from alignkit.data.io import read_yaml
from alignkit.errors import AlignkitError, ConfigError
from alignkit.runs import config_hash

MARKER = "pipeline.done"  # written after a stage returns; holds its config hash
_REF = re.compile(r"\$\{([A-Za-z0-9_-]+)(\.final)?\}")


@dataclass
class StageSpec:
    name: str
    stage: str
    config: Any = field(default_factory=dict)  # mapping, or a path to a YAML file


@dataclass
class Pipeline:
    name: str = "pipeline"
    output_dir: str = "runs"
    stages: list[StageSpec] = field(default_factory=list)


def load_pipeline(path: str | Path, overrides: list[str] | tuple = ()) -> Pipeline:
    """Read and check a pipeline file; stage configs are checked when each stage starts."""
    raw = read_yaml(path, "pipeline") or {}
    pipe = build(Pipeline, raw, str(path))
    from alignkit.cli import STAGES

    seen = set()
    for i, spec in enumerate(pipe.stages):
        if spec.stage not in STAGES or spec.stage in ("run", "demo", "label", "chat", "generate", "serve"):
            raise ConfigError(f"{path}: 'stages[{i}].stage': '{spec.stage}' is not a pipeline stage")
        if spec.name in seen:
            raise ConfigError(f"{path}: 'stages[{i}].name': '{spec.name}' is used twice")
        seen.add(spec.name)
        if isinstance(spec.config, str):
            spec.config = str((Path(path).parent / spec.config).resolve())
        elif not isinstance(spec.config, dict):
            raise ConfigError(f"{path}: 'stages[{i}].config' must be a mapping or a file path")
    for item in overrides:  # stages.NAME.key.sub=value
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 3 or parts[0] != "stages":
            raise ConfigError(f"command line: pipeline override '{item}' must look like stages.NAME.key=value")
        spec = next((s for s in pipe.stages if s.name == parts[1]), None)
        if spec is None:
            raise ConfigError(f"command line: no stage named '{parts[1]}' in {path}")
        if isinstance(spec.config, str):
            spec.config = read_yaml(spec.config, f"stage '{spec.name}' config") or {}
        node = spec.config
        for part in parts[2:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = override_value(key, value)
    return pipe


def _resolve_refs(value: Any, folders: dict[str, Path], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _resolve_refs(v, folders, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_refs(v, folders, where) for v in value]
    if isinstance(value, str):
        def sub(m):
            if m.group(1) not in folders:
                raise ConfigError(f"{where}: '${{{m.group(1)}}}' names no earlier stage")
            folder = folders[m.group(1)]
            return str(folder / "final" if m.group(2) else folder)
        return _REF.sub(sub, value)
    return value


def stage_config(pipe: Pipeline, spec: StageSpec, folders: dict[str, Path], source: str):
    from alignkit.cli import STAGES

    module = importlib.import_module(STAGES[spec.stage][0])
    raw = spec.config
    if isinstance(raw, str):
        raw = read_yaml(raw, f"stage '{spec.name}' config") or {}
    raw = _resolve_refs(raw, folders, f"{source}: stage '{spec.name}'")
    raw.setdefault("run", {})
    raw["run"] = {**raw["run"], "name": pipe.name, "output_dir": pipe.output_dir}
    cfg = build(module.Config, raw, f"{source}: stage '{spec.name}'")
    return module, cfg


def run_pipeline(path: str | Path, overrides: list[str] | tuple = (), start_from: str | None = None,
                 console=None, rename: dict | None = None) -> dict[str, Path]:
    """Run the stages not done yet; returns each stage's run folder by name.

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
    if start_from and start_from not in {s.name for s in pipe.stages}:
        raise AlignkitError(f"--from {start_from}: no such stage in {path}")
    folders: dict[str, Path] = {}
    for spec in pipe.stages:
        folders[spec.name] = Path(pipe.output_dir) / pipe.name / spec.stage
    stale = False  # once a stage reruns, every later stage reruns too
    started = time.time()
    for i, spec in enumerate(pipe.stages, 1):
        earlier = {s.name: folders[s.name] for s in pipe.stages[:i - 1]}
        module, cfg = stage_config(pipe, spec, earlier, str(path))
        folder = folders[spec.name]
        digest = config_hash(cfg)
        marker = folder / MARKER
        if start_from == spec.name:
            stale = True
        done = marker.exists() and marker.read_text().strip() == digest
        header = f"[bold]stage {i}/{len(pipe.stages)}[/] {spec.name} ({spec.stage})"
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
        say(f"{header}: {'resuming' if resume else 'running'} (pipeline time so far {time.time() - started:.0f} s)")
        t0 = time.time()
        module.main(cfg, resume=resume)
        if engine.is_main:
            marker.write_text(digest)
        engine.wait()
        say(f"{header}: finished in {time.time() - t0:.0f} s")
    return folders


def cli(argv: list[str], stage: str = "run") -> int:
    p = argparse.ArgumentParser(prog="alignkit run", description="run a pipeline of stages from one YAML file")
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument("--from", dest="start_from", default=None, help="rerun from this stage name on")
    p.add_argument("overrides", nargs="*", metavar="stages.NAME.key=value")
    args = p.parse_args(argv)
    run_pipeline(args.pipeline, args.overrides, args.start_from)
    return 0

