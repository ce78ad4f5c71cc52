"""Which config a ``neuronwise run``/``quickstart`` trains with, and what ``--set`` is blamed for.

A new run: the CONFIG file with the ``--set`` overrides applied. A mistake in the file names the
file; a mistake that only the overrides make names ``--set`` and the override.

A resumed run (``--resume``) continues as recorded in its directory (``RUN/config.yaml``); the
CONFIG argument is optional. Only values that ``--set`` names explicitly change it, each one
logged, and only the keys of :data:`~.rundir.MAY_CHANGE_ON_RESUME` may change (its length, how
this machine computes, where the data lies); any other change is refused. A CONFIG given with
``--resume`` must describe the same run; where it differs from the record in a key that may change
(say the YAML's 500 epochs against a run started with ``--set train.epochs=5``), the record wins
and a log line says so. A directory that holds no run yet is started from CONFIG (the trainer
says so), so a requeue script may always pass ``--resume``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import config as config_module
from .config import Config, ConfigError
from .rundir import MAY_CHANGE_ON_RESUME, RunDir, RunDirError, config_differences


def load_config(path: Path, overrides: list[str]) -> Config:
    """``path`` with ``overrides``; an error that the overrides make is blamed on ``--set``."""
    data = config_module.read_yaml(path)
    config_module.from_dict(data, source=str(path))  # the file on its own
    return _with_overrides(data, overrides)


def _with_overrides(data: dict, overrides: list[str]) -> Config:
    try:
        return config_module.from_dict(config_module.apply_overrides(data, overrides),
                                       source="--set")
    except ConfigError as error:
        text = str(error).removeprefix("--set: ")
        named = [o for o in overrides if o.partition("=")[0].strip() in text]
        if not named or text.startswith("--set"):
            raise
        raise ConfigError(f"--set {' '.join(named)}: {text}") from None


def resume_config(run: RunDir, path: Path | None, overrides: list[str],
                  log: Callable[[str], None], compare: bool = True) -> Config:
    """The config that ``--resume`` continues ``run`` with (see the module docstring).

    ``path`` starts a run that is not there yet; ``compare=False`` (``quickstart``, whose config
    is implicit) does not compare it with a recorded run.
    """
    if not run.config_path.is_file():
        if path is None:
            raise RunDirError(f"{run.path}: nothing to resume (no config.yaml) and no CONFIG "
                              "given to start the run")
        return load_config(path, overrides)
    try:
        recorded = run.read_config()
    except ConfigError as error:
        raise RunDirError(str(error)) from None
    wanted = _with_overrides(recorded.to_dict(), overrides)
    before, after = _flat(recorded.to_dict()), _flat(wanted.to_dict())
    changed = sorted(key for key in set(before) | set(after) if before.get(key) != after.get(key))
    refused = [key for key in changed if key not in MAY_CHANGE_ON_RESUME]
    if refused:
        key = refused[0]
        raise ConfigError(
            f"--set {key}={after[key]!r}: a resumed run keeps its recorded {key} "
            f"({before.get(key)!r}); only {', '.join(MAY_CHANGE_ON_RESUME)} may change "
            "(choose another --run-dir for a new run)")
    for key in changed:
        log(f"resumed with {key}: {before[key]!r} -> {after[key]!r} (given on the command line)")
    if path is not None and compare:
        given = load_config(path, overrides)
        differing = config_differences(recorded, given)
        if differing:
            raise RunDirError(
                f"{path} describes another run than {run.path} (differs in "
                f"{', '.join(differing)}); resume without CONFIG to continue the recorded run, "
                "or choose another --run-dir")
        file_values = _flat(given.to_dict())
        for key in MAY_CHANGE_ON_RESUME:
            if file_values[key] != after[key]:  # never a --set key: both sides have it
                log(f"{path} sets {key}={file_values[key]!r}; the resumed run keeps its recorded "
                    f"{after[key]!r} (--set {key}={file_values[key]!r} changes it)")
    return wanted


def _flat(tree: dict, prefix: str = "") -> dict:
    """``{"train": {"epochs": 5}}`` → ``{"train.epochs": 5}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
