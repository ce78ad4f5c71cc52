"""The registry of methods and pruning schedules that ``neuronwise run`` can train with.

Each method registers once, where its callback is defined (as timm registers a model)::

    register("lobster", LobsterCallback, config=LobsterConfig)

``config`` is the dataclass of the method's YAML section (named like the method: ``lobster:``);
a config selects it with ``method: lobster``. A pruning schedule registers with
``kind="pruning"``; it is selected by ``pruning.schedule`` and reads the ``pruning:`` section.
Other packages register through the entry-point group ``neuronwise.methods``: each entry point
names a module (or a callable) whose import registers its methods, loaded the first time the
registry is read.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal

from .base import MethodCallback, Metric

ENTRY_POINT_GROUP = "neuronwise.methods"
NONE = "none"  # the name that selects no method / no pruning schedule
# Top-level keys of a run config: a method's section cannot take their place.
RESERVED = ("name", "data", "model", "optim", "schedule", "method", "pruning", "train", "sections")


@dataclass(frozen=True)
class Registration:
    name: str
    callback: type[MethodCallback]
    config: type | None = None  # dataclass of the method's section; None: no section
    kind: Literal["method", "pruning"] = "method"
    needs_validation: bool = False  # decides on the validation loss (needs data.val_fraction > 0)

    def build(self, section: Any, regularizer: MethodCallback | None = None) -> MethodCallback:
        callback = self.callback.from_config(section, regularizer=regularizer)
        callback.name = self.name if self.kind == "method" else "pruning"
        return callback


_REGISTRY: dict[str, Registration] = {}
_entry_points_loaded = False


def register(name: str, callback: type[MethodCallback], *, config: type | None = None,
             kind: Literal["method", "pruning"] = "method", needs_validation: bool = False) -> None:
    """Make ``name`` selectable (``method: NAME``, or ``pruning.schedule: NAME`` for
    ``kind="pruning"``). Registering a name twice is an error unless it is the same callback."""
    if kind not in ("method", "pruning"):
        raise ValueError(f"Invalid kind: {kind!r} (expected 'method' or 'pruning')")
    if not isinstance(callback, type) or not issubclass(callback, MethodCallback):
        raise TypeError(f"Invalid callback for {name!r}: {callback!r} (expected a MethodCallback "
                        "subclass)")
    if config is not None and not dataclasses.is_dataclass(config):
        raise TypeError(f"Invalid config for {name!r}: {config!r} (expected a dataclass)")
    if kind == "pruning" and config is not None:
        raise ValueError(f"Invalid config for pruning schedule {name!r}: schedules read the "
                         "'pruning' section (expected config=None)")
    if name == NONE or not name.replace("-", "_").isidentifier():
        raise ValueError(f"Invalid method name: {name!r} (expected an identifier, not 'none')")
    if kind == "method" and name in RESERVED:
        raise ValueError(f"Invalid method name: {name!r} (a top-level config key; reserved: "
                         f"{', '.join(RESERVED)})")
    entry = Registration(name, callback, config, kind, needs_validation)
    old = _REGISTRY.get(name)
    if old is not None and (old.callback, old.config, old.kind) != (callback, config, kind):
        raise ValueError(f"method {name!r} is already registered (by {old.callback.__module__})")
    _REGISTRY[name] = entry


def unregister(name: str) -> None:
    """Remove ``name`` (for tests that register a method of their own)."""
    _REGISTRY.pop(name, None)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry_point.load()  # importing a module registers its methods
        if not isinstance(loaded, types.ModuleType) and callable(loaded):
            loaded()


def registrations(kind: Literal["method", "pruning"] | None = None) -> list[Registration]:
    """Every registration (of ``kind``), in registration order."""
    _load_entry_points()
    return [r for r in _REGISTRY.values() if kind is None or r.kind == kind]


def names(kind: Literal["method", "pruning"]) -> list[str]:
    """The names a config may select for ``kind``, ``"none"`` first."""
    return [NONE] + [r.name for r in registrations(kind)]


def get(name: str, kind: Literal["method", "pruning"] = "method") -> Registration | None:
    """The registration of ``name`` (``None`` for ``"none"``); ``KeyError`` when unknown."""
    if name == NONE:
        return None
    for entry in registrations(kind):
        if entry.name == name:
            return entry
    raise KeyError(name)


def sections() -> dict[str, type]:
    """Config section name → dataclass, for every method that has a section."""
    return {r.name: r.config for r in registrations("method") if r.config is not None}


def declared_metrics() -> list[tuple[Registration, Metric]]:
    """Every metric declared by a registered callback, in registration order, each key once."""
    seen, out = set(), []
    for entry in registrations():
        for metric in entry.callback.metrics:
            if metric.key not in seen:
                seen.add(metric.key)
                out.append((entry, metric))
    return out


def build_callbacks(config: Any) -> list[MethodCallback]:
    """The callbacks of a run config (``config.Config``), in the order the loop calls them: the
    method, then the pruning schedule (which shares the method's mask)."""
    callbacks: list[MethodCallback] = []
    entry = get(config.method, "method")
    if entry is not None:
        callbacks.append(entry.build(config.section(config.method)))
    schedule = get(config.pruning.schedule, "pruning")
    if schedule is not None:
        callbacks.append(schedule.build(config.pruning,
                                        regularizer=callbacks[0] if callbacks else None))
    return callbacks
