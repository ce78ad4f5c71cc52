"""Crash safety of runs: kill -9 and resume, non-finite weights, full disk, foreign and damaged
checkpoints. Lock, fallback, unsafe checkpoints and NaN loss are in test_rundir.py / test_cli.py."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import neuronwise.io
from neuronwise.experiment import trainer
from neuronwise.experiment.cli import main
from neuronwise.experiment.rundir import RunDir, load_checkpoint

# One thread: several times faster on a loaded machine; conftest restores the count after each test.
QUICK = ["--set", "data.batch_size=64", "--set", "train.threads=1"]

# Runs the CLI in forked children of one interpreter that has imported neuronwise, so a run costs
# no fresh torch import (seconds on a shared machine); each child is a real process, SIGKILLed
# by the test. Protocol per line of stdin ([argv, log path]): prints the child's pid, then its exit
# code (-9 when killed). The zygote itself runs no torch operation, so no thread pool is forked.
ZYGOTE = r"""
import json, os, sys
import torch._dynamo  # imported lazily by every run: pay for it once
from neuronwise.experiment import cli, methods, trainer
for line in sys.stdin:
    argv, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        code = cli.main(argv)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Zygote:
    def __init__(self, folder: Path):
        self.folder = folder
        self.errors = open(folder / "zygote.err", "w")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.errors, text=True)

    def _read(self) -> int:
        line = self.process.stdout.readline()
        if not line:
            pytest.fail(f"zygote died: {(self.folder / 'zygote.err').read_text()[-2000:]}")
        return int(line)

    def start(self, argv: list[str], log: Path) -> int:
        self.process.stdin.write(json.dumps([argv, str(log)]) + "\n")
        self.process.stdin.flush()
        return self._read()

    def wait(self) -> int:
        return self._read()

    def run(self, argv: list[str], log: Path) -> int:
        self.start(argv, log)
        return self.wait()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.errors.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    spawner = Zygote(tmp_path_factory.mktemp("zygote"))
    yield spawner
    spawner.close()


def strip_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in records]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_identical(a, b, where: str = "") -> None:
    """Bit-for-bit equality of nested checkpoint content (tensors by value and dtype)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def final_state(run: Path) -> dict:
    state = torch.load(run / "last.pt", weights_only=True)
    state["history"] = strip_times(state["history"])
    return state


def metrics_lines(run: Path) -> int:
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def lock_owner(run: Path) -> str:
    try:
        return (run / ".lock.owner").read_text().partition("@")[0]
    except FileNotFoundError:
        return ""


def unlocked(run: Path) -> bool:
    """No process holds the run's lock (and none is named as its owner)."""
    other = RunDir(run)
    other.acquire()
    other.release()
    return not (run / ".lock.owner").exists()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(condition, pid: int, what: str) -> None:
    """Poll until ``condition()``, or until the child is gone (it finished early)."""
    deadline = time.monotonic() + 300  # a hang guard only; nothing here measures speed
    while not condition() and alive(pid):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


VARIANTS = {
    # LOBSTER + PruneOnPlateau with patience 1: pruning decisions at several epochs.
    "lobster": (["--set", "train.epochs=8", "--set", "pruning.patience=1"], 3,
                lambda records: sum(bool(r.get("pruned")) for r in records) >= 1),
    # NEq: the frozen set changes from epoch 2 on.
    "neq": (["--set", "train.epochs=6", "--set", "method=neq", "--set", "neq.val_size=0.05"], 2,
            lambda records: any(r["frozen_percent"] > 0 for r in records)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kill_9_at_random_moments_then_resume_is_bit_identical(zygote, tmp_path, variant):
    settings, kills, decided = VARIANTS[variant]
    flags = QUICK + settings
    epochs = int(next(s for s in settings if s.startswith("train.epochs=")).split("=")[1])
    whole, broken, log = tmp_path / "whole", tmp_path / "broken", tmp_path / "log.txt"
    assert zygote.run(["quickstart", "--run-dir", str(whole), *flags], log) == 0, log.read_text()
    baseline = read_metrics(whole)
    assert decided(baseline), "the settings must exercise the method's decisions"
    epoch_time = sorted(r["epoch_time_s"] for r in baseline)[len(baseline) // 2]

    rng = random.Random(f"kill-{variant}")
    landed = []  # (checkpointed epoch at start, epoch whose end starts the delay, delay)
    for _ in range(kills):
        done = metrics_lines(broken)
        if done + 1 > epochs - 2:
            break
        # Anywhere in epoch target + 1 (training, evaluation, pruning, checkpoint writing), and
        # never in the last epoch, so the kill lands before the run could finish.
        target = rng.randint(done + 1, min(done + 2, epochs - 2))
        delay = rng.random() * epoch_time
        # Always --resume, as a requeue script does: the first start finds nothing to resume.
        pid = zygote.start(["quickstart", "--run-dir", str(broken), *flags, "--resume"], log)
        wait_for(lambda epoch=target: metrics_lines(broken) >= epoch, pid, f"epoch {target}")
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):  # it may have finished already
            os.kill(pid, signal.SIGKILL)
        code = zygote.wait()
        assert code in (-signal.SIGKILL, 0), log.read_text()[-3000:]
        if code == 0:  # finished before the kill landed
            break
        # The killed writer's owner record stays behind (its OS lock died with it).
        assert lock_owner(broken) == str(pid)
        landed.append((done, target, round(delay, 3)))
    assert landed, "no kill landed"
    code = zygote.run(["quickstart", "--run-dir", str(broken), *flags, "--resume"], log)
    assert code == 0, log.read_text()[-3000:]

    assert_identical(final_state(whole), final_state(broken), f"last.pt after kills {landed}")
    assert strip_times(read_metrics(whole)) == strip_times(read_metrics(broken)), landed
    best_whole = torch.load(whole / "best.pt", weights_only=True)
    best_broken = torch.load(broken / "best.pt", weights_only=True)
    assert_identical(best_whole["model"], best_broken["model"], "best.pt")
    assert best_whole["epoch"] == best_broken["epoch"]
    assert unlocked(broken)
    assert not list(broken.glob(".*.tmp")), "temporary files of killed writers must be removed"


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch quickstart run: the reference for the resumed runs below."""
    run = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()  # set up before the per-test restore
    assert run_cli("quickstart", "--run-dir", run, *QUICK, "--set", "train.epochs=3") == 0
    torch.set_num_threads(threads)
    return run


def two_epochs(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    assert run_cli("quickstart", "--run-dir", run, *QUICK, "--set", "train.epochs=2") == 0
    return run


def resume_to_three(run: Path) -> int:
    return run_cli("quickstart", "--run-dir", run, "--resume", *QUICK, "--set", "train.epochs=3")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("neuronwise: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_non_finite_weights_stop_the_run_and_keep_the_checkpoints(tmp_path, capsys, monkeypatch):
    run = two_epochs(tmp_path)
    before = snapshot(run)
    original = trainer.Trainer.train_epoch

    def poisoned(self, epoch):
        result = original(self, epoch)
        with torch.no_grad():
            dict(self.model.named_parameters())["features.2.weight"][3, 5] = float("inf")
        return result

    monkeypatch.setattr(trainer.Trainer, "train_epoch", poisoned)
    capsys.readouterr()
    assert resume_to_three(run) == 1
    err = capsys.readouterr().err
    assert "epoch 3: model weights are not finite (features.2.weight)" in err
    assert snapshot(run) == before
    assert unlocked(run)


def fail_writes_of(monkeypatch, name: str) -> None:
    """Simulate a full disk for atomic writes whose file name contains ``name``: half the bytes
    land in the temporary file, then the write raises ENOSPC."""
    real_mkstemp, real_fdopen, doomed = tempfile.mkstemp, os.fdopen, set()

    def mkstemp(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        if name in Path(path).name:
            doomed.add(fd)
        return fd, path

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        return FullDisk(handle) if fd in doomed else handle

    monkeypatch.setattr(neuronwise.io.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(neuronwise.io.os, "fdopen", fdopen)


def test_full_disk_while_saving_keeps_both_checkpoints(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.save_last({"model": {"w": torch.ones(3)}, "epoch": 1})
    run.save_last({"model": {"w": torch.full((3,), 2.0)}, "epoch": 2})
    before = snapshot(tmp_path)
    fail_writes_of(monkeypatch, "last.pt")
    with pytest.raises(OSError, match="last.pt: not written .No space left on device.; the previous"):
        run.save_last({"model": {"w": torch.full((3,), 3.0)}, "epoch": 3})
    assert snapshot(tmp_path) == before
    assert load_checkpoint(run.last_path)["epoch"] == 2
    assert load_checkpoint(run.previous_path)["epoch"] == 1


def test_full_disk_in_a_run_is_one_line_and_the_run_resumes_exactly(
        tmp_path, capsys, monkeypatch, three_epochs):
    run = two_epochs(tmp_path)
    checkpoints = {n: (run / n).read_bytes() for n in ("last.pt", "previous.pt", "metrics.jsonl")}
    with monkeypatch.context() as patch:
        fail_writes_of(patch, "last.pt")
        capsys.readouterr()
        assert resume_to_three(run) == 2
        err = one_line_error(capsys)
    assert "last.pt: not written (No space left on device)" in err
    assert {n: (run / n).read_bytes() for n in checkpoints} == checkpoints
    assert not list(run.glob(".*.tmp")) and unlocked(run)
    assert resume_to_three(run) == 0  # space is back
    assert_identical(final_state(three_epochs), final_state(run))


def test_flipped_bit_in_checkpoint_falls_back_and_resumes_exactly(tmp_path, capsys, three_epochs):
    run = two_epochs(tmp_path)
    data = bytearray((run / "last.pt").read_bytes())
    weights = torch.load(run / "last.pt", weights_only=True)["model"]["features.0.weight"]
    # The weights' bytes appear verbatim in the archive (stored, uncompressed); flip one bit.
    position = bytes(data).find(weights.numpy().tobytes()) + 101
    data[position] ^= 0x04
    (run / "last.pt").write_bytes(bytes(data))
    capsys.readouterr()
    assert resume_to_three(run) == 0
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("neuronwise: warning: ") and "\n" not in warning, warning
    assert "last.pt: unreadable checkpoint" in warning and "CRC" in warning
    assert warning.endswith("trying the previous checkpoint")
    assert_identical(final_state(three_epochs), final_state(run))


def test_checkpoint_of_another_model_names_keys_and_shapes(tmp_path, capsys):
    run = tmp_path / "run"
    other = tmp_path / "other"
    assert run_cli("quickstart", "--run-dir", run, *QUICK, "--set", "train.epochs=1") == 0
    assert run_cli("quickstart", "--run-dir", other, *QUICK, "--set", "train.epochs=1",
                   "--set", "model.kwargs={hidden: [32]}") == 0
    shutil.copyfile(other / "last.pt", run / "last.pt")
    capsys.readouterr()
    assert run_cli("quickstart", "--run-dir", run, "--resume", *QUICK,
                   "--set", "train.epochs=2") == 2
    err = one_line_error(capsys)
    assert "checkpoint does not fit the model" in err
    assert "missing ['features.2.bias', 'features.2.weight']" in err
    assert "features.0.weight: (32, 64) vs (128, 64)" in err


def test_checkpoint_of_another_config_or_kind_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    other = tmp_path / "other"
    assert run_cli("quickstart", "--run-dir", run, *QUICK, "--set", "train.epochs=1") == 0
    assert run_cli("quickstart", "--run-dir", other, *QUICK, "--set", "train.epochs=1",
                   "--set", "optim.lr=0.05", "--set", "lobster.lam=0.01") == 0
    resume = ["quickstart", "--run-dir", run, "--resume", *QUICK, "--set", "train.epochs=2"]
    shutil.copyfile(other / "last.pt", run / "last.pt")
    capsys.readouterr()
    assert run_cli(*resume) == 2
    assert "written by another config (differs in lobster.lam, optim.lr)" in one_line_error(capsys)
    # best.pt holds weights only: not a state to resume from.
    shutil.copyfile(run / "best.pt", run / "last.pt")
    assert run_cli(*resume) == 2
    err = one_line_error(capsys)
    assert "not a training checkpoint (missing or malformed: optimizer, scheduler, callbacks" in err


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path, three_epochs):
    run = tmp_path / "run"
    assert run_cli("quickstart", "--run-dir", run, *QUICK, "--set", "train.epochs=3") == 0
    for name in ("last.pt", "previous.pt", "best.pt", "metrics.jsonl"):
        (run / name).unlink(missing_ok=True)
    (run / ".lock.owner").write_text(f"999999999@{socket.gethostname()}")  # above any pid_max
    (run / ".last.pt.abc.tmp").write_bytes(b"half a checkpoint")
    assert resume_to_three(run) == 0
    assert_identical(final_state(three_epochs), final_state(run))
    assert not list(run.glob(".*.tmp"))


def test_crashed_write_between_checkpoint_and_metrics_is_repaired_on_resume(tmp_path):
    run = tmp_path / "run"
    assert run_cli("quickstart", "--run-dir", run, *QUICK, "--set", "train.epochs=2") == 0
    complete = (run / "metrics.jsonl").read_text()
    # As after a kill between last.pt of the final epoch and its metrics line.
    (run / "metrics.jsonl").write_text(complete.splitlines(keepends=True)[0])
    assert run_cli("quickstart", "--run-dir", run, "--resume", *QUICK,
                   "--set", "train.epochs=2") == 0
    assert (run / "metrics.jsonl").read_text() == complete

