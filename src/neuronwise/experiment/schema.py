"""The config engine: typed dataclasses built from YAML mappings, every key checked.

A field says what it accepts: its type (``bool``, ``int``, ``float``, ``str``, ``list``, ``dict``,
``Literal[...]``, ``X | None`` or a nested dataclass) and, through :func:`setting`, its help text
and its bounds. An unknown key, a wrong type or a value out of bounds raises :class:`ConfigError`
with one line naming the dotted key, what was expected and what was found. The experiment config
(``config.py``), the study config and the method sections of the registry all use this engine, and
``docgen`` documents the fields from the same metadata.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal, Union

# Bounds a numeric field may declare: name (as the docs show it) → (check, what errors expect).
BOUNDS = {
    ">= 0": (lambda v: v >= 0, "a value >= 0"),
    "> 0": (lambda v: v > 0, "a value > 0"),
    "in [0, 1]": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
}


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the source and the key."""


def meta(help: str = "", bounds: str | None = None,
         choices: Callable[[], list] | None = None) -> dict:
    """Field metadata: help text, bounds (one of :data:`BOUNDS`) and ``choices`` (a function
    listing the allowed values, read when a value is checked: e.g. the registered method names).
    ``None`` values always pass."""
    if bounds is not None and bounds not in BOUNDS:
        raise ValueError(f"Invalid bounds: {bounds!r} (expected one of {list(BOUNDS)})")
    return {"help": help, "bounds": bounds, "choices": choices}


def setting(default: Any, help: str = "", *, bounds: str | None = None,
            choices: Callable[[], list] | None = None) -> Any:
    """A dataclass field with a default and its :func:`meta` data (mutable defaults:
    ``field(default_factory=..., metadata=meta(...))``)."""
    return dataclasses.field(default=default, metadata=meta(help, bounds, choices))


def is_key(field: dataclasses.Field) -> bool:
    """Whether ``field`` is a key of the YAML mapping (``metadata={"yaml": False}``: it is not)."""
    return field.metadata.get("yaml", True)


def help_text(field: dataclasses.Field) -> str:
    return field.metadata.get("help", "")


def bounds_text(field: dataclasses.Field) -> str:
    return field.metadata.get("bounds") or ""


def describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def coerce(kind: Any, value: Any, key: str) -> Any:
    """``value`` as type ``kind``, or a ConfigError naming ``key``."""
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None:
            return None
        return coerce(options[0], value, key)
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {describe(value)}")
        return value
    if dataclasses.is_dataclass(kind):
        return build(kind, value, key)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {describe(value)}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {describe(value)}")
        return value
    if kind is float:
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept any number-like text.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {describe(value)}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {describe(value)}")
        return value
    if kind in (list, dict):
        if not isinstance(value, kind):
            raise ConfigError(f"{key}: expected a {kind.__name__}, got {describe(value)}")
        return value
    raise TypeError(f"unsupported config field type {kind!r} at {key}")


def unknown_key(dotted: str, key: Any, names: Iterable[str]) -> ConfigError:
    names = list(names)
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(names)})"
    return ConfigError(f"unknown key '{dotted}'{hint}")


def build(cls: type, data: Any, prefix: str = "", skip: Iterable[str] = ()) -> Any:
    """An instance of dataclass ``cls`` from the mapping ``data`` (missing keys take defaults),
    bounds checked; keys in ``skip`` are left to the caller (they count as known)."""
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if is_key(f)}
    skip = list(skip)
    values = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key in skip:
            continue
        if key not in fields:
            raise unknown_key(dotted, key, [*fields, *skip])
        values[key] = coerce(hints[key], value, dotted)
    instance = cls(**values)
    check_bounds(instance, prefix)
    return instance


def check_bounds(instance: Any, prefix: str = "") -> None:
    """Each field's declared bounds and choices (nested dataclasses are checked when built)."""
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if value is None:
            continue
        dotted = f"{prefix}.{field.name}" if prefix else field.name
        choices = field.metadata.get("choices")
        if choices is not None and value not in choices():
            raise ConfigError(f"{dotted}: expected one of {list(choices())}, got {describe(value)}")
        bounds = field.metadata.get("bounds")
        if bounds is not None and not BOUNDS[bounds][0](value):
            raise ConfigError(f"{dotted}: expected {BOUNDS[bounds][1]}, got {value!r}")


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (``kwargs`` mappings stay values)."""
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key != "kwargs":
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat
