"""A run directory: resolved config, metrics, checkpoints, and a lock against concurrent writers.

Layout::

    RUN/config.yaml      resolved config (what produced the run)
    RUN/metrics.jsonl    one JSON line per finished epoch, rewritten atomically each epoch
    RUN/last.pt          full training state after the last finished epoch
    RUN/previous.pt      the state before that (fallback when last.pt is unreadable)
    RUN/best.pt          model weights at the best validation accuracy
    RUN/.lock            OS lock of the writing process (released when it ends or dies)
    RUN/.lock.owner      the writing process (pid@host), named in a second writer's error

Checkpoints are written atomically (a crash or a full disk leaves the previous good file), checked
against their zip CRC-32s and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

import neuronwise
from neuronwise.io import atomic_torch_save, atomic_write_text

from .config import Config, ConfigError, dump, from_dict, read_yaml


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (exists, locked, other config, unreadable)."""


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock: FileLock | None = None
        self._created = False

    config_path = property(lambda self: self.path / "config.yaml")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    last_path = property(lambda self: self.path / "last.pt")
    previous_path = property(lambda self: self.path / "previous.pt")
    best_path = property(lambda self: self.path / "best.pt")
    lock_path = property(lambda self: self.path / ".lock")
    owner_path = property(lambda self: self.path / ".lock.owner")

    def holds_run(self) -> bool:
        return self.config_path.exists() or self.last_path.exists()

    def has_checkpoint(self) -> bool:
        return self.last_path.exists() or self.previous_path.exists()

    # -- lock -------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the writer lock: an OS lock (``flock`` through :mod:`filelock`) on ``RUN/.lock``.

        The operating system releases it when its process dies, however it dies, so a killed
        writer's lock never needs judging or breaking, and of two processes only one can hold it.
        ``RUN/.lock.owner`` names the holder (pid@host) for the message a second writer gets.
        """
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            try:
                owner = self.owner_path.read_text(encoding="utf-8").strip() or "unknown"
            except OSError:
                owner = "unknown"
            raise RunDirError(f"{self.path}: run directory is in use by process {owner}") from None
        self._lock = lock
        atomic_write_text(self.owner_path, f"{os.getpid()}@{socket.gethostname()}")
        self._remove_leftover_temporaries()

    def _remove_leftover_temporaries(self) -> None:
        """Temporary files that a killed writer left behind (not those of, say, a report being
        written now): the writer's files are ours now."""
        for name in ("config.yaml", "run_info.json", "metrics.jsonl", "last.pt",
                     "previous.pt", "best.pt"):
            for leftover in self.path.glob(f".*{name}*.tmp"):
                leftover.unlink(missing_ok=True)

    def release(self) -> None:
        """Release the lock; a directory that this process created and left empty is removed
        (a run that failed before writing anything, e.g. on a bad model name, leaves nothing)."""
        if self._lock is None:
            return
        self.owner_path.unlink(missing_ok=True)
        self._lock.release()
        self._lock = None
        if self._created and {p.name for p in self.path.iterdir()} <= {".lock"}:
            self.lock_path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # another process may have just written into it
                self.path.rmdir()

    # -- config -----------------------------------------------------------------------------
    def write_config(self, config: Config) -> None:
        with _writing(self.config_path):
            atomic_write_text(self.config_path, dump(config))

    def update_config(self, config: Config) -> list[str]:
        """Rewrite ``config.yaml`` with the :data:`MAY_CHANGE_ON_RESUME` settings of a resumed
        run, so the record says e.g. how many epochs the run has; returns the changes as
        ``"train.epochs: 300 -> 200"``."""
        stored, wanted = _flat(self.read_config()), _flat(config)
        changed = [f"{key}: {stored[key]!r} -> {wanted[key]!r}" for key in MAY_CHANGE_ON_RESUME
                   if stored[key] != wanted[key]]
        if changed:
            self.write_config(config)
        return changed

    def read_config(self) -> Config:
        return from_dict(read_yaml(self.config_path), source=str(self.config_path))

    def check_same_run(self, config: Config) -> None:
        """Resuming needs the same config but for :data:`MAY_CHANGE_ON_RESUME`."""
        try:
            stored = self.read_config()
        except ConfigError as error:
            raise RunDirError(str(error)) from None
        differing = config_differences(stored, config)
        if differing:
            raise RunDirError(
                f"{self.path}: run directory belongs to another config "
                f"(differs in {', '.join(differing)}); choose another --run-dir"
            )

    def check_checkpoint_config(self, stored: Any, config: Config) -> None:
        """A checkpoint resumes only the config that wrote it (up to :data:`MAY_CHANGE_ON_RESUME`)."""
        if not isinstance(stored, dict):
            raise RunDirError(f"{self.path}: checkpoint has no config (found {type(stored).__name__})")
        try:
            stored = from_dict(stored, source="checkpoint config")
        except ConfigError as error:
            raise RunDirError(f"{self.path}: {error}") from None
        differing = config_differences(stored, config)
        if differing:
            raise RunDirError(
                f"{self.path}: checkpoint was written by another config "
                f"(differs in {', '.join(differing)})"
            )

    def write_info(self, seed: int, resumed: bool = False) -> None:
        """Record what produced the run: command, commit, versions, seed. ``commands`` lists every
        command that trained the run, first to last: a resumed run appends its own."""
        command = {
            "command": " ".join([_program()] + sys.argv[1:]),
            "commit": _git_commit(),
            "neuronwise": neuronwise.__version__,
            "torch": torch.__version__,
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        path = self.path / "run_info.json"
        info = None
        if resumed:
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            info = {**command, "seed": seed, "python": platform.python_version(), "commands": []}
        earlier = info.get("commands")
        if not isinstance(earlier, list):  # written before commands were kept: its first one
            earlier = [{k: info[k] for k in command if k in info}]
        info["commands"] = [*earlier, command]
        with _writing(path):
            atomic_write_text(path, json.dumps(info, indent=2) + "\n")

    # -- metrics ----------------------------------------------------------------------------
    def write_metrics(self, history: list[dict]) -> None:
        with _writing(self.metrics_path):
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in history))

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            raise RunDirError(f"{self.metrics_path}: no metrics (has the run finished an epoch?)")
        records = []
        for number, line in enumerate(self.metrics_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise RunDirError(f"{self.metrics_path}:{number}: invalid JSON ({error.msg})") from None
        return records

    # -- checkpoints ------------------------------------------------------------------------
    def save_last(self, state: dict[str, Any]) -> None:
        """Write the new checkpoint beside last.pt, then rotate: last.pt → previous.pt, new → last.pt.

        Only renames follow the write, so a kill or a full disk at any moment leaves last.pt a
        complete checkpoint (the new one or the one before).
        """
        incoming = self.path / ".last.pt.incoming.tmp"
        with _writing(self.last_path):
            try:
                atomic_torch_save(state, incoming)
                if self.last_path.exists():
                    staged = self.path / ".previous.pt.tmp"
                    staged.unlink(missing_ok=True)
                    try:
                        os.link(self.last_path, staged)
                    except OSError:  # a file system without hard links
                        shutil.copyfile(self.last_path, staged)
                    os.replace(staged, self.previous_path)
                os.replace(incoming, self.last_path)
            except BaseException:
                incoming.unlink(missing_ok=True)
                raise

    def save_best(self, state: dict[str, Any]) -> None:
        with _writing(self.best_path):
            atomic_torch_save(state, self.best_path)

    def load_last(self) -> dict[str, Any]:
        """Load last.pt, falling back to previous.pt (with a warning) when last.pt is unreadable."""
        errors = []
        for path in (self.last_path, self.previous_path):
            if not path.exists():
                continue
            try:
                return load_checkpoint(path)
            except RunDirError as error:
                errors.append(str(error))
                warnings.warn(f"{error}; trying the previous checkpoint", stacklevel=2)
        if errors:
            raise RunDirError("; ".join(errors))
        raise RunDirError(f"{self.path}: no checkpoint to resume from (last.pt missing)")


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Name the file in a failed write (full disk, read-only folder); atomic writes keep the old."""
    try:
        yield
    except OSError as error:
        message = f"{path}: not written ({error.strerror or error}); the previous version is kept"
        raise (OSError(error.errno, message) if error.errno else OSError(message)) from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(weights_only=True)``; an unreadable file becomes a one-line RunDirError."""
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"{path}: checkpoint not found")
    _check_crc(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for corrupt/unsafe files
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RunDirError(f"{path}: unreadable checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise RunDirError(f"{path}: not a neuronwise checkpoint (no 'model' entry)")
    return state


# What last.pt/previous.pt hold, by type (best.pt holds the model only).
_TRAINING_STATE = {
    "epoch": int, "config": dict, "model": dict, "optimizer": dict, "scheduler": (dict, type(None)),
    "callbacks": dict, "history": list, "best": dict, "rng": dict,
}


def check_training_state(state: dict[str, Any], source: str | os.PathLike,
                         callbacks: Iterable[str] = ()) -> None:
    """A checkpoint to resume from has every entry of the training state, with the right type,
    one history record per finished epoch, and the state of each of ``callbacks``."""
    wrong = [key for key, kind in _TRAINING_STATE.items()
             if key not in state or not isinstance(state[key], kind)]
    if not wrong:
        if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
            wrong.append("model")
        if not all(isinstance(r, dict) for r in state["history"]):
            wrong.append("history")
        if state["epoch"] != len(state["history"]):
            wrong.append(f"epoch ({state['epoch']}, with {len(state['history'])} history records)")
        wrong += [f"callbacks.{name}" for name in callbacks if name not in state["callbacks"]]
    if wrong:
        raise RunDirError(f"{source}: not a training checkpoint (missing or malformed: "
                          f"{', '.join(wrong)})")


def _check_crc(path: Path) -> None:
    """torch.load ignores the zip's CRC-32s, so a flipped bit in tensor data would load silently.

    Files in torch's legacy (pre-zip) format carry no checksums and are left to torch.load.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.CRC == 0:  # written with torch's CRC-32 turned off: nothing to check
                    continue
                with archive.open(member) as handle:  # reading to the end checks the CRC-32
                    while handle.read(1 << 20):
                        pass
    except Exception as error:  # noqa: BLE001 - zipfile raises many types for a damaged archive
        raise RunDirError(f"{path}: unreadable checkpoint (corrupt zip archive: {error})") from None


# What may change when a run is resumed: its length, how (not what) this machine computes, and
# where files lie: the data (its checksums are verified wherever it is) and model.init_from (read
# only when a run starts; a moved study points it at its dense checkpoint's new place).
MAY_CHANGE_ON_RESUME = ("train.epochs", "train.threads", "train.checkpoint_every",
                        "train.channels_last", "train.compile", "data.root", "model.init_from")
# Their train. keys (a study compares its base.train section with these).
RESUME_MAY_CHANGE = tuple(k.split(".", 1)[1] for k in MAY_CHANGE_ON_RESUME if k.startswith("train."))


def _flat(config: Config) -> dict[str, Any]:
    data = config.to_dict()
    return {key: data[key.split(".")[0]][key.split(".")[1]] for key in MAY_CHANGE_ON_RESUME}


def config_differences(stored: Config, wanted: Config) -> list[str]:
    """Dotted keys where two configs differ, ignoring :data:`MAY_CHANGE_ON_RESUME`."""
    return [key for key in sorted(_differences(stored.to_dict(), wanted.to_dict()))
            if key not in MAY_CHANGE_ON_RESUME]


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        out = []
        for key in keys:
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _program() -> str:
    """How this process was started: ``neuronwise``, or ``python -m neuronwise``."""
    name = Path(sys.argv[0]).name
    return "python -m neuronwise" if name == "__main__.py" else name


def _git_commit() -> str | None:
    """HEAD of the neuronwise checkout (with "+dirty" for local changes), or None outside git."""
    source = Path(neuronwise.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=source, capture_output=True, text=True, timeout=10,
                               check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty.strip() else "")
