"""Every YAML under configs/ loads into its stage's typed config."""

import importlib
from pathlib import Path

import pytest

from alignkit.cli import STAGES
from alignkit.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def stage_of(path: Path) -> str:
    # the longest stage name that prefixes the file name: best-of-n-tiny.yaml -> best-of-n
    matches = [s for s in STAGES if path.stem == s or path.stem.startswith(s + "-")]
    assert matches, f"{path.name}: name does not start with a stage"
    return max(matches, key=len)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads(path):
    module = importlib.import_module(STAGES[stage_of(path)][0])
    if hasattr(module, "load_pipeline"):
        module.load_pipeline(path)
    else:
        load_config(module.Config, path)


def test_configs_exist_for_the_built_stages():
    assert len(CONFIGS) >= 1
