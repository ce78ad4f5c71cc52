"""Typed experiment configuration: dataclasses loaded from YAML, validated, with ``--set`` overrides.

A config file mirrors :class:`Config`, plus one section per registered method (``methods/``).
Every key is checked by the engine of ``schema.py``: an unknown key, a wrong type or a value outside
its choices or bounds raises :class:`ConfigError` with one line naming the file, the dotted key,
what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from . import methods
from .methods import PruningConfig
from .schema import ConfigError, build, is_key, meta, setting

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "PruningConfig",
           "ScheduleConfig", "TrainConfig", "apply_overrides", "dump", "from_dict", "load",
           "parse_override", "read_yaml"]


@dataclass
class DataConfig:
    name: str = setting("digits", "dataset: mnist, fashion-mnist, cifar10, cifar100, digits, "
                        "imagefolder")
    root: str | None = setting(None, "data folder (default: --data-root, $NEURONWISE_DATA, the "
                               "cache)")
    verify: bool = setting(True, "check file checksums (md5 of decompressed content) before use")
    val_fraction: float = setting(0.1, "share of the training set held out for validation",
                                  bounds="in [0, 1]")
    split_seed: int = setting(0, "seed of the train/validation split")
    batch_size: int = setting(100, "global training batch (divided among DDP ranks)", bounds="> 0")
    eval_batch_size: int = setting(1000, "batch of validation/test evaluation", bounds="> 0")
    augment: Literal["cifar"] | None = setting(None, "\"cifar\": random crop 32 pad 4 + "
                                               "horizontal flip")
    limit_train: int | None = setting(None, "use only the first N training samples (smoke tests)")
    limit_test: int | None = setting(None, "use only the first N test samples (smoke tests)")


@dataclass
class ModelConfig:
    name: str = setting("mlp", "registry name: lenet300, lenet5, resnet20/32/56, vgg16, alexnet, "
                        "mlp")
    kwargs: dict = field(default_factory=dict,
                         metadata=meta("extra builder options, e.g. {variant: 2L}"))
    init_from: str | None = setting(None, "a checkpoint whose \"model\" weights start the run")


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = setting("sgd", "optimizer")
    lr: float = setting(0.1, "learning rate", bounds=">= 0")
    momentum: float = setting(0.0, "SGD momentum", bounds=">= 0")
    weight_decay: float = setting(0.0, "L2 (SGD, Adam) or decoupled (AdamW) weight decay",
                                  bounds=">= 0")
    nesterov: bool = setting(False, "SGD Nesterov momentum")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule. ``plateau`` is the official LOBSTER/SeReNe ReduceLROnPlateau."""

    name: Literal["none", "plateau", "multistep", "step", "cosine"] = setting("none",
                                                                              "LR schedule")
    factor: float = setting(0.1, "multiplicative LR decay (plateau, multistep, step)")
    patience: int = setting(10, "plateau: epochs without improvement before decaying",
                            bounds=">= 0")
    threshold: float = setting(0.0, "plateau: relative improvement that counts")
    cooldown: int = setting(50, "plateau: epochs to wait after a decay", bounds=">= 0")
    milestones: list = field(default_factory=list,
                             metadata=meta("multistep: epochs at which to decay"))
    step_size: int = setting(30, "step: decay every this many epochs", bounds="> 0")


@dataclass
class TrainConfig:
    epochs: int = setting(10, "training epochs (may change on --resume; config.yaml then records "
                          "the new value)", bounds=">= 0")
    seed: int = setting(0, "seed of initialization, data order and augmentation")
    device: str = setting("cpu", "cpu, cuda, cuda:N or auto")
    threads: int | None = setting(None, "torch.set_num_threads (default: torch's choice; may "
                                  "change on --resume)", bounds="> 0")
    checkpoint_every: int = setting(1, "epochs between last.pt checkpoints (may change on "
                                    "--resume)", bounds="> 0")
    channels_last: bool = setting(False, "NHWC conv weights: faster CPU convs/pooling (may change "
                                  "on --resume)")
    compile: bool = setting(False, "train with torch.compile(model), compiled after the method "
                            "hooked it; evaluation stays eager, checkpoints are the same (may "
                            "change on --resume)")


# Sections of the registered methods follow this key in a config file (before ``pruning``).
_SECTIONS_AFTER = "method"


@dataclass
class Config:
    """A run. Besides these keys, each registered method has a section named like it (``lobster:``,
    ``serene:``, ``neq:``, ...), read as ``config.lobster`` or ``config.section("lobster")``."""

    name: str = setting("run", "run name; the default run directory is `runs/NAME-TIMESTAMP`")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    method: str = setting("none", "the method trained; its section below holds its settings",
                          choices=lambda: methods.names("method"))
    pruning: PruningConfig = field(default_factory=PruningConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Section name → that method's config dataclass; every registered method has one.
    sections: dict = field(default_factory=lambda: {
        name: cls() for name, cls in methods.sections().items()}, metadata={"yaml": False})

    def section(self, name: str) -> Any:
        """The config section of method ``name`` (``None`` when it has none)."""
        return self.sections.get(name)

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not fields: the method sections.
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict:
        """The YAML mapping: top-level keys in file order, method sections after ``method``."""
        tree = {}
        for f in dataclasses.fields(self):
            if not is_key(f):
                continue
            value = getattr(self, f.name)
            tree[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            if f.name == _SECTIONS_AFTER:
                tree.update({k: dataclasses.asdict(v) for k, v in self.sections.items()})
        return tree


def _check_validation(config: Config) -> None:
    for kind, name in (("method", config.method), ("pruning", config.pruning.schedule)):
        entry = methods.get(name, kind)
        if entry is not None and entry.needs_validation and config.data.val_fraction == 0:
            key = "method" if kind == "method" else "pruning.schedule"
            raise ConfigError(f"{key}: {name!r} decides on the validation loss, but "
                              "data.val_fraction is 0 (expected a validation split > 0)")


def from_dict(data: dict, source: str = "config") -> Config:
    """Build and validate a :class:`Config`; errors name ``source`` and the dotted key."""
    try:
        data = data or {}
        kinds = methods.sections()
        config = build(Config, data, "", skip=kinds)
        config.sections = {name: build(cls, data.get(name, {}), name)
                           for name, cls in kinds.items()}
        _check_validation(config)
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
