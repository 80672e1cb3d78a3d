"""Configs: YAML + dotted overrides into typed dataclasses; every mistake names the key and its source."""

from dataclasses import dataclass, field

import pytest
import yaml

from alignkit.config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_config, opt
from alignkit.errors import ConfigError
from alignkit.runs import RunDir


@dataclass
class StageConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    beta: float = opt(0.1, gt=0)
    reward: str | dict = "profanity"


def write(tmp_path, data):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


def test_yaml_and_overrides(tmp_path):
    f = write(tmp_path, {"model": {"name": "tiny:llama", "lora": {"enabled": True, "r": 4}},
                         "train": {"learning_rate": "1e-4"}, "reward": {"weighted": []}})
    cfg = load_config(StageConfig, f, ["train.batch_size=3", "model.lora.r=8", "beta=0.5", "data.limit=null"])
    assert cfg.model.name == "tiny:llama" and cfg.model.lora.enabled and cfg.model.lora.r == 8
    assert cfg.train.learning_rate == 1e-4 and cfg.train.batch_size == 3 and cfg.beta == 0.5
    assert cfg.reward == {"weighted": []}
    assert cfg.data.limit is None
    assert cfg.train.epochs == 1.0  # untouched default


@pytest.mark.parametrize("data,fragments", [
    ({"modle": {}}, ["c.yaml", "unknown config key 'modle'"]),
    ({"model": {"lora": {"rank": 4}}}, ["c.yaml", "unknown config key 'model.lora.rank'"]),
    ({"train": {"batch_size": "eight"}}, ["c.yaml", "'train.batch_size' must be int"]),
    ({"train": {"batch_size": 0}}, ["c.yaml", "'train.batch_size' must be >= 1, got 0"]),
    ({"beta": -1}, ["c.yaml", "'beta' must be > 0"]),
    ({"data": {"on_error": "ignore"}}, ["c.yaml", "'data.on_error' must be one of raise, skip"]),
    ({"model": "tiny"}, ["c.yaml", "'model' must be a mapping"]),
])
def test_file_errors_name_key_and_file(tmp_path, data, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(StageConfig, write(tmp_path, data))
    for frag in fragments:
        assert frag in str(e.value)


@pytest.mark.parametrize("override,fragment", [
    ("train.nope=1", "unknown config key 'train.nope'"),
    ("beta", "must look like key.sub=value"),
    ("train.learning_rate=fast", "'train.learning_rate' must be float"),
    ("beta.x=1", "'beta' in 'beta.x' is not a section"),
])
def test_override_errors(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(StageConfig, None, [override])
    assert "command line" in str(e.value) and fragment in str(e.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(StageConfig, bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(StageConfig, tmp_path / "missing.yaml")


def test_resolved_config_round_trips_through_the_run_folder(tmp_path):
    cfg = load_config(StageConfig, None, ["train.batch_size=5", f"run.output_dir={tmp_path}"])
    run = RunDir(cfg.run.output_dir, "r1", "sft")
    run.write_config(cfg)
    assert (tmp_path / "r1" / "sft" / "config.yaml").exists()
    again = load_config(StageConfig, run.path / "config.yaml")
    assert again == cfg
