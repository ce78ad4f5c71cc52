"""Run directories: writer lock, atomic checkpoints with fallback, safe loading, config identity."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

from neuronwise.experiment.config import from_dict
from neuronwise.experiment.rundir import RunDir, RunDirError, load_checkpoint


def test_second_writer_is_refused_and_stale_lock_replaced(tmp_path):
    first, second = RunDir(tmp_path), RunDir(tmp_path)
    first.acquire()
    with pytest.raises(RunDirError, match="in use by process"):
        second.acquire()
    first.release()
    # A lock left by a process that no longer exists (this host) is stale.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    import socket

    (tmp_path / ".lock").write_text(f"{dead}@{socket.gethostname()}")
    second.acquire()
    assert (tmp_path / ".lock").read_text().startswith(str(os.getpid()))
    second.release()
    assert not (tmp_path / ".lock").exists()


def test_corrupt_last_checkpoint_falls_back_to_previous(tmp_path):
    run = RunDir(tmp_path)
    run.save_last({"model": {"w": torch.ones(2)}, "epoch": 1})
    run.save_last({"model": {"w": torch.full((2,), 2.0)}, "epoch": 2})
    assert load_checkpoint(run.last_path)["epoch"] == 2
    data = run.last_path.read_bytes()
    run.last_path.write_bytes(data[: len(data) // 2])  # truncated, as after a disk failure
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = run.load_last()
    assert state["epoch"] == 1
    assert any("unreadable checkpoint" in str(w.message) for w in caught)


def test_unsafe_or_foreign_checkpoint_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(RunDirError, match="unreadable checkpoint"):
        load_checkpoint(path)
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(RunDirError, match="no 'model' entry"):
        load_checkpoint(tmp_path / "other.pt")


def test_same_run_allows_more_epochs_only(tmp_path):
    run = RunDir(tmp_path)
    run.write_config(from_dict({"train": {"epochs": 2}}))
    run.check_same_run(from_dict({"train": {"epochs": 10}}))
    with pytest.raises(RunDirError, match=r"differs in optim.lr, train.seed"):
        run.check_same_run(from_dict({"train": {"seed": 3}, "optim": {"lr": 0.5}}))



def test_a_stale_lock_taken_over_meanwhile_is_not_stolen(tmp_path, monkeypatch):
    # The interleaving that lets two writers in when a stale lock is unlinked after being judged:
    # while `late` judges the stale owner, `early` replaces the stale lock with its own.
    import socket

    from neuronwise.experiment import rundir

    (tmp_path / ".lock").write_text(f"999999999@{socket.gethostname()}")  # above any pid_max
    early, late = RunDir(tmp_path), RunDir(tmp_path)
    real_alive = rundir._process_alive
    calls = []

    def alive_while_early_acquires(pid):
        calls.append(pid)
        if len(calls) == 1:
            early.acquire()
        return real_alive(pid)

    monkeypatch.setattr(rundir, "_process_alive", alive_while_early_acquires)
    with pytest.raises(RunDirError, match="in use by process"):
        late.acquire()
    assert early._locked and not late._locked
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}@{socket.gethostname()}"
    assert not list(tmp_path.glob(".lock.*"))
    early.release()


def test_a_live_lock_is_left_in_place(tmp_path):
    first = RunDir(tmp_path)
    first.acquire()
    owner = (tmp_path / ".lock").read_text()
    with pytest.raises(RunDirError, match="in use by process"):
        RunDir(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text() == owner
    assert not list(tmp_path.glob(".lock.*"))
    first.release()


def test_update_config_rewrites_only_resumable_changes(tmp_path):
    run = RunDir(tmp_path)
    run.write_config(from_dict({"train": {"epochs": 300, "threads": 2}}))
    assert run.update_config(from_dict({"train": {"epochs": 300, "threads": 2}})) == []
    changed = run.update_config(from_dict({"train": {"epochs": 200, "threads": 1}}))
    assert changed == ["train.epochs: 300 -> 200", "train.threads: 2 -> 1"]
    assert run.read_config().train.epochs == 200 and run.read_config().train.threads == 1
