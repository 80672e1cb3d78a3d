"""Typed configs: dataclasses loaded from YAML, with dotted command-line overrides.

Every stage has a dataclass config made of the shared pieces below. A config is
built by :func:`load_config` from an optional YAML file and ``key.sub=value``
overrides. Unknown keys, wrong types and out-of-range values raise
:class:`~alignkit.errors.ConfigError` naming the key and where it came from
(the file, or "command line").

Ranges and choices are declared once, on the field::

    lr: float = opt(1e-5, gt=0)
    on_error: str = opt("raise", choices=("raise", "skip"))
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from alignkit.errors import ConfigError, ConfigWarning

T = TypeVar("T")


def opt(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
        ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, choices: tuple | None = None, help: str = "") -> Any:
    """A dataclass field with a declared range / choice set, checked on load."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "help": help}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- shared pieces


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = opt(16, ge=1)
    alpha: float = opt(32.0, gt=0)
    dropout: float = opt(0.0, ge=0, lt=1, help="forced to 0 in RL stages")
    target_modules: list[str] | str = "all-linear"


@dataclass
class ModelConfig:
    """Where a model comes from: a hub id, a local folder, ``builtin:...`` or ``tiny:...``."""

    name: str = "builtin:smollm2-135m-instruct"
    dtype: str = opt("float32", choices=("float32", "bfloat16", "float16", "auto"))
    lora: LoraConfig = field(default_factory=LoraConfig)
    cache_dir: str | None = opt(None, help="where builtin models are converted to; "
                                           "default $ALIGNKIT_CACHE or ~/.cache/alignkit")
    trust_remote_code: bool = False
    seed: int = opt(0, help="seed for tiny random models")
    attn_implementation: str | None = opt(None, help="transformers' attention kernel: sdpa, eager, "
                                                     "flash_attention_2 (when installed); null lets "
                                                     "transformers choose (sdpa where available)")


@dataclass
class DataConfig:
    """A dataset: a file (.jsonl .json .csv .parquet), a hub name, or ``builtin:prompts``."""

    path: str = ""
    split: str = "train"
    format: str = opt("auto", choices=("auto", "sft", "preference", "hh", "ranking", "prompts", "kto"))
    on_error: str = opt("raise", choices=("raise", "skip"))
    max_length: int = opt(512, ge=8, help="longest prompt+response in tokens; longer is an error")
    max_prompt_length: int = opt(256, ge=4)
    limit: int | None = opt(None, ge=1, help="use only the first N records")
    eval_path: str = ""
    eval_fraction: float = opt(0.0, ge=0, lt=1, help="hold out this share when eval_path is empty")
    kind: str | None = opt(None, help="only the records of this kind (their 'kind' field; builtin:prompts: "
                                      "helpful or red_team); label-ai writes each pair's prompt kind")


@dataclass
class RunConfig:
    name: str = "default"
    output_dir: str = "runs"
    seed: int = opt(0, ge=0, le=2**63 - 1)


@dataclass
class TrainConfig:
    learning_rate: float = opt(1e-5, gt=0)
    batch_size: int = opt(8, ge=1)
    grad_accum: int = opt(1, ge=1)
    epochs: float = opt(1.0, gt=0)
    max_steps: int | None = opt(None, ge=1, help="optimizer steps; overrides epochs")
    warmup_steps: int = opt(0, ge=0)
    weight_decay: float = opt(0.0, ge=0)
    max_grad_norm: float = opt(1.0, gt=0)
    log_every: int = opt(1, ge=1)
    eval_every: int = opt(0, ge=0, help="0: only at the end")
    save_every: int = opt(0, ge=0, help="checkpoint every N steps; 0: only at the end")
    keep_checkpoints: int = opt(2, ge=1)
    mixed_precision: str | None = opt(None, choices=("no", "bf16", "fp16"),
                                      help="autocast forwards with fp32 master weights; fp16 adds loss scaling; "
                                           "null: the launch's (accelerate launch --mixed_precision), else no")
    gradient_checkpointing: bool = opt(False, help="recompute activations in the backward pass: less memory, "
                                                   "about a third more compute")


@dataclass
class GenerationConfig:
    max_new_tokens: int = opt(64, ge=1)
    temperature: float = opt(1.0, gt=0)
    top_p: float = opt(1.0, gt=0, le=1)
    top_k: int = opt(0, ge=0)
    do_sample: bool = True
    batch_size: int = opt(16, ge=1)
    cache: str = opt("dynamic", choices=("dynamic", "static"),
                     help="the KV cache while sampling: static preallocates it, and on a GPU transformers then "
                          "compiles the decoding step (several times faster per token after a first, slow, batch; on a CPU no faster)")
    dtype: str = opt("auto", choices=("auto", "bfloat16", "float16"),
                     help="the precision the sampler runs in: auto is the model's own; bfloat16 samples from a "
                          "half-precision copy of the weights (synced before each rollout), about twice as fast, "
                          "and the rollout logs how far its log-probs are from the trainer's (sampler/*)")


# --------------------------------------------------------------------------- loading


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple = ()) -> T:
    """Build ``cls`` from a YAML file and ``key.sub=value`` overrides."""
    raw: dict = {}
    source = "defaults"
    if path:
        from alignkit.data.io import read_yaml

        source = str(path)
        raw = read_yaml(path, "config") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
    cfg = build(cls, raw, source)
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: T, overrides: list[str] | tuple) -> T:
    data = to_dict(cfg)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"command line: override '{item}' must look like key.sub=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                if part not in node:
                    raise ConfigError(f"command line: unknown config key '{key}'")
                raise ConfigError(f"command line: '{part}' in '{key}' is not a section")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"command line: unknown config key '{key}'")
        node[parts[-1]] = override_value(key, value)
    return build(type(cfg), data, "command line")


def override_value(key: str, value: str) -> Any:
    """The value of a ``key=value`` override, read as YAML (``3``, ``1e-5``, ``[a, b]``, ``null``, text)."""
    if value == "":
        return ""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise ConfigError(f"command line: '{key}={value}': the value is not valid YAML ({problem}); "
                          f"quote text that starts with [ {{ or contains ': '") from None


def build(cls: type[T], raw: dict, source: str, prefix: str = "") -> T:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = [k for k in fields if k.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        kwargs[name] = _convert(hints[name], raw[name], source, prefix + name, f.metadata)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: {prefix.rstrip('.') or cls.__name__}: {e}") from None


def _convert(tp: Any, value: Any, source: str, key: str, meta: typing.Mapping) -> Any:
    choices = meta.get("choices")
    if isinstance(value, bool) and choices and ("yes" if value else "no") in choices:
        value = "yes" if value else "no"  # YAML 1.1 reads a bare no / off as false
    value = _coerce(tp, value, source, key)
    if value is None:
        return None
    for bound, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                            ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        b = meta.get(bound)
        if b is not None and not ok(value, b):
            raise ConfigError(f"{source}: '{key}' must be {word} {b}, got {value!r}")
    if choices and value not in choices:
        raise ConfigError(f"{source}: '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, source, key + ".")
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads "1e-5" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # .inf passes any gt/ge bound and NaN fails none
                raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ConfigError(f"{source}: '{key}' must be {tp.__name__}, got {value!r}")


def reject_unused(cfg: Any, unused: dict[str, str]) -> None:
    """Refuse a setting the stage would not read: ``unused`` maps a dotted key to why it is not
    used (and what to set instead); a key whose value differs from the default of ``type(cfg)``
    is a ConfigError naming it. Left at its default, such a key is harmless and passes."""
    defaults = type(cfg)()
    for key, why in unused.items():
        value, default = cfg, defaults
        for part in key.split("."):
            value, default = getattr(value, part), getattr(default, part)
        if value != default:
            raise ConfigError(f"{key}={value} is not used {why}")


def check_warmup(train: TrainConfig, optimizer_steps: int, what: str = "") -> None:
    """A ConfigWarning when the linear warm-up does not end within the run: the learning rate then
    never reaches ``train.learning_rate`` (the run trains at a fraction of it). A warning, not an
    error: a short trial run of a full config (``train.max_steps=1``) is a reasonable thing to do."""
    if train.warmup_steps > optimizer_steps:
        warnings.warn(ConfigWarning(
            f"train.warmup_steps={train.warmup_steps} is more than the run's {optimizer_steps} optimizer steps"
            f"{f' ({what})' if what else ''}: the learning rate never reaches train.learning_rate="
            f"{train.learning_rate:g}"), stacklevel=2)


def check_held_out(data: DataConfig, train: TrainConfig) -> None:
    """A ConfigWarning when ``train.eval_every`` has no held-out set to evaluate (sft, rm, dpo): the
    interval then does nothing, which is said rather than passed over."""
    if train.eval_every and not data.eval_path and not data.eval_fraction:
        warnings.warn(ConfigWarning(
            f"train.eval_every={train.eval_every} has no held-out set to evaluate (data.eval_fraction=0 and no "
            f"data.eval_path): no evaluation runs"), stacklevel=2)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
