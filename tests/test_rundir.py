"""Run directories: writer lock, atomic checkpoints with fallback, safe loading, config identity."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

from neuronwise.experiment.config import from_dict
from neuronwise.experiment.rundir import RunDir, RunDirError, load_checkpoint


def test_second_writer_is_refused_and_a_killed_writers_lock_is_free(tmp_path):
    import socket

    first, second = RunDir(tmp_path), RunDir(tmp_path)
    first.acquire()
    owner = f"{os.getpid()}@{socket.gethostname()}"
    with pytest.raises(RunDirError, match=f"in use by process {owner}"):
        second.acquire()
    first.release()
    second.acquire()
    second.release()
    # A writer killed while holding the lock: the OS lock dies with it, only its name stays.
    script = ("import time; from neuronwise.experiment.rundir import RunDir; "
              f"run = RunDir({str(tmp_path)!r}); run.acquire(); print('locked', flush=True); "
              "time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"in use by process {holder.pid}@"):
            RunDir(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".lock.owner").read_text().startswith(f"{holder.pid}@")
    second.acquire()
    assert (tmp_path / ".lock.owner").read_text() == owner
    second.release()
    assert not (tmp_path / ".lock.owner").exists()


def test_of_processes_racing_for_a_dead_writers_lock_exactly_one_wins(tmp_path):
    (tmp_path / ".lock.owner").write_text("999999999@elsewhere")  # a writer that died
    racer = ("import sys, time; from neuronwise.experiment.rundir import RunDir, RunDirError\n"
             "run = RunDir(sys.argv[1])\n"
             "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
             "try:\n    run.acquire()\nexcept RunDirError:\n    print('refused'); sys.exit()\n"
             "print('won', flush=True); time.sleep(2); run.release()\n")
    import time

    start = str(time.time() + 3)  # all racers try at the same moment
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    racers = [subprocess.Popen([sys.executable, "-c", racer, str(tmp_path), start], env=env,
                               stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outcomes = sorted(r.communicate(timeout=120)[0].strip() for r in racers)
    assert outcomes == ["refused", "refused", "won"]


def test_a_run_directory_that_the_writer_created_and_left_empty_is_removed(tmp_path):
    run = RunDir(tmp_path / "new")
    run.acquire()
    run.release()
    assert not (tmp_path / "new").exists()
    existing = RunDir(tmp_path)  # a directory that was there before stays
    existing.acquire()
    existing.release()
    assert tmp_path.is_dir()


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



def test_a_live_lock_is_left_in_place(tmp_path):
    first = RunDir(tmp_path)
    first.acquire()
    owner = (tmp_path / ".lock.owner").read_text()
    with pytest.raises(RunDirError, match="in use by process"):
        RunDir(tmp_path).acquire()
    assert (tmp_path / ".lock.owner").read_text() == owner
    first.release()


def test_update_config_rewrites_only_resumable_changes(tmp_path):
    run = RunDir(tmp_path)
    run.write_config(from_dict({"train": {"epochs": 300, "threads": 2}}))
    assert run.update_config(from_dict({"train": {"epochs": 300, "threads": 2}})) == []
    changed = run.update_config(from_dict({"train": {"epochs": 200, "threads": 1}}))
    assert changed == ["train.epochs: 300 -> 200", "train.threads: 2 -> 1"]
    assert run.read_config().train.epochs == 200 and run.read_config().train.threads == 1
