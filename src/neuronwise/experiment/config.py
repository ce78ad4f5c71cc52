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
    name: str = "digits"  # dataset: mnist, fashion-mnist, cifar10, cifar100, digits, imagefolder
    root: str | None = None  # data folder (default: --data-root, $NEURONWISE_DATA, the cache)
    verify: bool = True  # check file checksums (md5 of decompressed content) before use
    val_fraction: float = 0.1  # share of the training set held out for validation
    split_seed: int = 0  # seed of the train/validation split
    batch_size: int = 100  # global training batch (divided among DDP ranks)
    eval_batch_size: int = 1000  # batch of validation/test evaluation
    augment: Literal["cifar"] | None = None  # "cifar": random crop 32 pad 4 + horizontal flip
    limit_train: int | None = None  # use only the first N training samples (smoke tests)
    limit_test: int | None = None  # use only the first N test samples (smoke tests)


@dataclass
class ModelConfig:
    name: str = "mlp"  # registry name: lenet300, lenet5, resnet20/32/56, vgg16, alexnet, mlp
    kwargs: dict = field(default_factory=dict)  # extra builder options, e.g. {variant: 2L}
    init_from: str | None = None  # a checkpoint whose "model" weights start the run


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"  # optimizer
    lr: float = 0.1  # learning rate
    momentum: float = 0.0  # SGD momentum
    weight_decay: float = 0.0  # L2 (SGD, Adam) or decoupled (AdamW) weight decay
    nesterov: bool = False  # SGD Nesterov momentum


@dataclass
class ScheduleConfig:
    """Learning-rate schedule. ``plateau`` is the official LOBSTER/SeReNe ReduceLROnPlateau."""

    name: Literal["none", "plateau", "multistep", "step", "cosine"] = "none"  # LR schedule
    factor: float = 0.1  # multiplicative LR decay (plateau, multistep, step)
    patience: int = 10  # plateau: epochs without improvement before decaying
    threshold: float = 0.0  # plateau: relative improvement that counts
    cooldown: int = 50  # plateau: epochs to wait after a decay
    milestones: list = field(default_factory=list)  # multistep: epochs at which to decay
    step_size: int = 30  # step: decay every this many epochs


@dataclass
class LobsterConfig:
    lam: float = 1e-4  # λ, strength of the sensitivity-driven decay (not multiplied by the LR)
    scale_by_lr: bool = False  # multiply λ by the learning rate (paper form)
    rescaled: bool = False  # sensitivity |g|/max|g| without relu (SeReNe repository variant)


@dataclass
class SeReNeConfig:
    lam: float = 1e-4  # λ, strength of the neuron-level decay
    variant: Literal["lower-bound", "full", "local"] = "lower-bound"  # neuron sensitivity form


@dataclass
class NEqConfig:
    eps: float = 1e-3  # ε: a neuron with |velocity| below it is frozen next epoch
    mu: float = 0.5  # μ: momentum of the velocity
    velocity: Literal["paper", "official"] = "paper"  # velocity recurrence (METHODS.md §5)
    val_size: float = 0.001  # share of the training set used as the fixed probe set Ξ
    selection: Literal["threshold", "random", "topk"] = "threshold"  # ε rule or a baseline
    trained_fraction: float | None = None  # random/topk baselines: share of neurons trained
    warmup: int = 1  # epochs that train every neuron before freezing starts
    mode: Literal["optim", "grad", "restore"] = "optim"  # how frozen neurons are kept still
    skip_frozen_grads: bool = False  # really skip frozen layers' / rows' weight gradients


@dataclass
class PruningConfig:
    """Pruning schedule: ``plateau`` is LOBSTER/SeReNe's PruneOnPlateau (§1 of METHODS.md)."""

    schedule: Literal["none", "plateau", "oneshot", "iterative", "gradual"] = "none"  # schedule
    patience: int = 20  # plateau: PWE, bad epochs (loss ≥ best·(1+plateau_tolerance)) to prune
    tolerance: float = 0.05  # plateau: TWT, allowed relative val-loss increase of a pruning
    plateau_tolerance: float = 0.01  # plateau: relative margin under which a loss is not "bad"
    granularity: Literal["params", "neurons"] = "params"  # mask per entry or per whole neuron
    safe_threshold: bool = False  # plateau: use the largest threshold verified within TWT
    sparsity: float = 0.9  # oneshot/iterative/gradual: target fraction of zeros
    fraction: float = 0.2  # iterative: share of surviving parameters removed per round
    start_epoch: int = 0  # oneshot: prune after this epoch (0: before training); gradual: start
    end_epoch: int = 10  # gradual: epoch at which the target sparsity is reached
    every: int = 1  # iterative/gradual: epochs between pruning rounds


@dataclass
class TrainConfig:
    epochs: int = 10  # training epochs (may change on --resume; config.yaml then records the new value)
    seed: int = 0  # seed of initialization, data order and augmentation
    device: str = "cpu"  # cpu, cuda, cuda:N or auto
    threads: int | None = None  # torch.set_num_threads (default: torch's choice; may change on --resume)
    checkpoint_every: int = 1  # epochs between last.pt checkpoints (may change on --resume)
    channels_last: bool = False  # NHWC conv weights: faster CPU convs/pooling (may change on --resume)


@dataclass
class Config:
    name: str = "run"  # run name, used for the default run directory runs/NAME-TIMESTAMP
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    method: Literal["none", "lobster", "serene", "neq"] = "none"  # regularizer / freezing method
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
             "train.threads", "schedule.step_size"}
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
    if config.pruning.schedule == "plateau" and config.data.val_fraction == 0:
        raise ConfigError("pruning.schedule: 'plateau' decides on the validation loss, but "
                          "data.val_fraction is 0 (expected a validation split > 0)")
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
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {error.start})") from None
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
