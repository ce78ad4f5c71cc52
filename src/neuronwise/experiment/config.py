"""Typed experiment configuration: dataclasses loaded from YAML, validated, with ``--set`` overrides.

A config file mirrors :class:`Config`. Every key is checked: an unknown key, a wrong type or a value
outside its choices raises :class:`ConfigError` with one line naming the file, the dotted key, what was
expected and what was found.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the source and the key."""


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = None
    verify: bool = True  # check file checksums (md5 of decompressed content) before use
    val_fraction: float = 0.1
    split_seed: int = 0
    batch_size: int = 100
    eval_batch_size: int = 1000
    augment: Literal["cifar"] | None = None
    limit_train: int | None = None
    limit_test: int | None = None


@dataclass
class ModelConfig:
    name: str = "mlp"
    kwargs: dict = field(default_factory=dict)
    init_from: str | None = None  # a checkpoint whose "model" weights start the run


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False


@dataclass
class ScheduleConfig:
    """Learning-rate schedule. ``plateau`` is the official LOBSTER/SeReNe ReduceLROnPlateau."""

    name: Literal["none", "plateau", "multistep", "step", "cosine"] = "none"
    factor: float = 0.1
    patience: int = 10
    threshold: float = 0.0
    cooldown: int = 50
    milestones: list = field(default_factory=list)
    step_size: int = 30


@dataclass
class LobsterConfig:
    lam: float = 1e-4
    scale_by_lr: bool = False
    rescaled: bool = False


@dataclass
class SeReNeConfig:
    lam: float = 1e-4
    variant: Literal["lower-bound", "full", "local"] = "lower-bound"


@dataclass
class NEqConfig:
    eps: float = 1e-3
    mu: float = 0.5
    velocity: Literal["paper", "official"] = "paper"
    val_size: float = 0.001
    selection: Literal["threshold", "random", "topk"] = "threshold"
    trained_fraction: float | None = None
    warmup: int = 1
    mode: Literal["optim", "grad", "restore"] = "optim"
    skip_frozen_grads: bool = False


@dataclass
class PruningConfig:
    """Pruning schedule: ``plateau`` is LOBSTER/SeReNe's PruneOnPlateau (§1 of METHODS.md)."""

    schedule: Literal["none", "plateau", "oneshot", "iterative", "gradual"] = "none"
    patience: int = 20
    tolerance: float = 0.05
    plateau_tolerance: float = 0.01
    granularity: Literal["params", "neurons"] = "params"
    safe_threshold: bool = False
    sparsity: float = 0.9
    fraction: float = 0.2
    start_epoch: int = 0
    end_epoch: int = 10
    every: int = 1


@dataclass
class TrainConfig:
    epochs: int = 10
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    checkpoint_every: int = 1


@dataclass
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    method: Literal["none", "lobster", "serene", "neq"] = "none"
    lobster: LobsterConfig = field(default_factory=LobsterConfig)
    serene: SeReNeConfig = field(default_factory=SeReNeConfig)
    neq: NEqConfig = field(default_factory=NEqConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_NON_NEGATIVE = {
    "data.val_fraction", "optim.lr", "optim.momentum", "optim.weight_decay", "lobster.lam",
    "serene.lam", "neq.eps", "neq.mu", "pruning.tolerance", "pruning.plateau_tolerance",
    "pruning.patience", "train.epochs", "neq.warmup", "pruning.start_epoch", "schedule.patience",
    "schedule.cooldown",
}
_POSITIVE = {"data.batch_size", "data.eval_batch_size", "train.checkpoint_every", "pruning.every",
             "schedule.step_size"}
_FRACTIONS = {"data.val_fraction", "neq.val_size", "pruning.sparsity", "pruning.fraction",
              "neq.trained_fraction"}


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(kind: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None:
            return None
        return _coerce(options[0], value, key)
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {_describe(value)}")
        return value
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, key)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
        return value
    if kind is float:
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept any number-like text.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
        return value
    if kind in (list, dict):
        if not isinstance(value, kind):
            raise ConfigError(f"{key}: expected a {kind.__name__}, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported config field type {kind!r} at {key}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown key '{dotted}'{hint}")
        values[key] = _coerce(hints[key], value, dotted)
    return cls(**values)


def _check_ranges(config: Config) -> None:
    flat = _flatten(config.to_dict())
    for key, value in flat.items():
        if value is None:
            continue
        if key in _NON_NEGATIVE and value < 0:
            raise ConfigError(f"{key}: expected a value >= 0, got {value!r}")
        if key in _POSITIVE and value <= 0:
            raise ConfigError(f"{key}: expected a value > 0, got {value!r}")
        if key in _FRACTIONS and not 0 <= value <= 1:
            raise ConfigError(f"{key}: expected a fraction in [0, 1], got {value!r}")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key != "kwargs":
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def from_dict(data: dict, source: str = "config") -> Config:
    """Build and validate a :class:`Config`; errors name ``source`` and the dotted key."""
    try:
        config = _build(Config, data or {}, "")
        _check_ranges(config)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value`` (value read as YAML, so ``1e-3``, ``true``, ``[1, 2]`` work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with each ``a.b=value`` applied (validated later by from_dict)."""
    data = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a syntax error or a non-mapping becomes a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}:{where}: YAML syntax error: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load ``path``, apply ``overrides`` (``a.b=value``) and validate."""
    data = apply_overrides(read_yaml(path), overrides or [])
    return from_dict(data, source=str(path))


def dump(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
