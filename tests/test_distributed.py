"""DDP through torchrun: 2 CPU processes (gloo) on the digits MLP.

The launched workers run this file as a script (see ``_worker``); the tests compare what every rank
holds at the end, a single-process run with the same global batch, and an elastic restart.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import neuronwise
from neuronwise.experiment import cli, distributed_setup
from neuronwise.experiment import config as config_module
from neuronwise.experiment.trainer import Trainer

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
LAUNCH_TIMEOUT_S = 300
# 497 digits → 448 training samples = 14 global batches of 32: no padding, so 2 ranks × 16 see
# exactly the single-process batches.
COMMON = ["train.epochs=3", "data.limit_train=497", "data.batch_size=32", "pruning.patience=0"]
METHODS = {
    "lobster": ["method=lobster"],
    "serene": ["method=serene", "serene.lam=1e-3"],
    "neq": ["method=neq", "neq.val_size=0.05", "neq.eps=0.05", "pruning.schedule=none"],
    # Every hooked layer frozen: real backward skipping takes them out of DDP's graph.
    "neq_skip": ["method=neq", "neq.val_size=0.05", "neq.eps=10", "neq.skip_frozen_grads=true",
                 "pruning.schedule=none"],
}
# With BatchNorm, DDP normalizes by per-rank batch statistics (no SyncBatchNorm), so only the
# agreement between ranks is checked, not the match with one process.
BATCHNORM = {"neq_resnet": ["model.name=resnet20", "method=neq", "neq.val_size=0.05",
                            "neq.eps=0.05", "pruning.schedule=none"]}


def _config(name: str):
    overrides = COMMON + {**METHODS, **BATCHNORM}[name] + ["train.threads=1"]
    return config_module.load(cli.quickstart_config_path(), overrides)


def _cli_flags(name: str) -> list[str]:
    return [x for s in COMMON + METHODS[name] + ["train.threads=1"] for x in ("--set", s)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list, tmp_path: Path) -> subprocess.CompletedProcess:
    # PYTHONFAULTHANDLER: a worker that aborts (a rank 0 SIGABRT "terminate called without an
    # active exception" was seen once under load, not reproduced since) prints every thread's
    # Python stack, so the failure message says where it was.
    env = {**os.environ, "NEURONWISE_DIST_TIMEOUT_MIN": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONFAULTHANDLER": "1"}
    result = subprocess.run([*TORCHRUN, *map(str, args)], capture_output=True, text=True,
                            check=False, timeout=LAUNCH_TIMEOUT_S, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]
    return result


def _comparable(state):
    """A checkpoint without wall-clock timings, which legitimately differ between ranks."""
    if isinstance(state, dict):
        return {k: _comparable(v) for k, v in state.items() if not str(k).endswith("_time_s")}
    if isinstance(state, (list, tuple)):
        return [_comparable(v) for v in state]
    return state


def _assert_identical(a, b, where="state"):
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        assert a == b or nan, where


# -- the launched workers --------------------------------------------------------------------

def _worker(argv: list[str]) -> int:
    from neuronwise import distributed

    mode = argv[0]
    if mode == "methods":
        out = Path(argv[1])
        with distributed_setup.distributed_session():
            for name in [*METHODS, *BATCHNORM]:
                if name == "serene" and not hasattr(neuronwise, "SeReNe"):
                    continue
                trainer = Trainer(_config(name), str(out / name), progress=False)
                # The DDP wrapper must be gone before the process group is (torch 2.13 aborts at
                # exit otherwise); it sits in a reference cycle, so only a collection frees it.
                # With automatic collection off, only fit() itself can have freed it.
                gc.disable()
                try:
                    trainer.fit()
                    live = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel)
                               for o in gc.get_objects())
                finally:
                    gc.enable()
                (out / f"{name}-ddp-rank{distributed.rank()}.txt").write_text(str(live))
                torch.save(trainer.state_dict(), out / f"{name}-rank{distributed.rank()}.pt")
            mistakes = {
                "odd": (config_module.load(cli.quickstart_config_path(), [
                    "data.batch_size=33", "train.threads=1"]), out / "odd"),
                "taken": (_config("lobster"), out / "lobster"),  # holds a run, no --resume
            }
            for mistake, (config, run_dir) in mistakes.items():
                try:
                    Trainer(config, str(run_dir)).fit()
                except ValueError as error:
                    (out / f"{mistake}-rank{distributed.rank()}.txt").write_text(str(error))
        return 0
    # mode "crash": the CLI, with rank 1 killed at the start of epoch N of the first attempt.
    crash_epoch = int(argv[1])
    if os.environ["RANK"] == "1" and distributed_setup.restart_count() == 0:
        original = Trainer._run_epoch

        def run_epoch(self, epoch):
            if epoch == crash_epoch:
                # Rank 0 writes the previous epoch's checkpoint after the epoch's last collective,
                # so on a busy machine rank 1 can get here first; a kill then would leave no
                # checkpoint and the restart would rightly start over. Wait for it.
                deadline = time.monotonic() + 120
                while not self.run.last_path.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, epoch)

        Trainer._run_epoch = run_epoch
    return cli.main(argv[2:])


# -- tests -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One torchrun launch (2 ranks) trains every method; each rank saves its final state."""
    out = tmp_path_factory.mktemp("ddp")
    _launch([f"--master-port={_free_port()}", __file__, "methods", out], out)
    return out


def _ranks_agree(ddp_runs: Path, name: str) -> dict:
    """Weights, BN statistics, masks, pruner, NEq frozen sets, metrics, RNG: bit-identical on both
    ranks and in the checkpoint that rank 0 wrote; returns rank 0's state."""
    rank0 = torch.load(ddp_runs / f"{name}-rank0.pt", weights_only=True)
    rank1 = torch.load(ddp_runs / f"{name}-rank1.pt", weights_only=True)
    _assert_identical(_comparable(rank0), _comparable(rank1))
    written = torch.load(ddp_runs / name / "last.pt", weights_only=True)
    _assert_identical(_comparable(written["model"]), _comparable(rank0["model"]))
    return rank0


@pytest.mark.parametrize("name", list(METHODS))
def test_ranks_agree_and_match_a_single_process(ddp_runs, tmp_path, name):
    if name == "serene" and not hasattr(neuronwise, "SeReNe"):
        pytest.skip("neuronwise.SeReNe has not landed yet")
    rank0 = _ranks_agree(ddp_runs, name)

    threads = torch.get_num_threads()
    try:  # train.threads=1 sets torch's thread count: restored for the other tests
        single = Trainer(_config(name), str(tmp_path / "single"), progress=False)
        single.fit()
    finally:
        torch.set_num_threads(threads)
    reference = single.state_dict()
    for key, value in reference["model"].items():
        assert torch.allclose(rank0["model"][key], value, atol=1e-4), key
        assert torch.equal(rank0["model"][key] == 0, value == 0), key  # same pruning masks
    history = rank0["history"]
    assert len(history) == 3
    for ours, theirs in zip(history, reference["history"]):
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-4)
        assert ours["nonzero_all"] == theirs["nonzero_all"]
        assert ours.get("pruned") == theirs.get("pruned")
    if name.startswith("neq"):
        frozen = rank0["callbacks"]["neq"]["frozen"]
        _assert_identical(frozen, reference["callbacks"]["neq"]["frozen"])
        expected = (100.0,) if name == "neq_skip" else ()
        # Partly frozen sets, so that their equality says something; or all frozen (neq_skip).
        assert history[-1]["frozen_percent"] in expected or 0 < history[-1]["frozen_percent"] < 100
    else:
        assert history[-1]["remaining_percent_paper"] < 100  # pruning decisions were taken


def test_batchnorm_statistics_and_neq_decisions_agree_across_ranks(ddp_runs):
    rank0 = _ranks_agree(ddp_runs, "neq_resnet")
    assert any(k.endswith("running_var") for k in rank0["model"])
    assert rank0["history"][-1]["frozen_percent"] > 0


def test_batch_not_divisible_by_world_size_is_a_clear_error_on_every_rank(ddp_runs):
    for rank in (0, 1):
        message = (ddp_runs / f"odd-rank{rank}.txt").read_text()
        assert "data.batch_size: 33 is not divisible by the world size 2" in message


def test_a_refused_run_directory_stops_every_rank_with_rank_0s_reason(ddp_runs):
    reason = (ddp_runs / "taken-rank0.txt").read_text()
    assert "already holds a run" in reason
    assert (ddp_runs / "taken-rank1.txt").read_text() == f"rank 0 failed: {reason}"


def test_no_ddp_wrapper_outlives_its_run(ddp_runs):
    counts = {f.name: f.read_text() for f in ddp_runs.glob("*-ddp-rank*.txt")}
    assert len(counts) == 2 * len([*METHODS, *BATCHNORM]) - 2 * (
        not hasattr(neuronwise, "SeReNe"))
    assert set(counts.values()) == {"0"}, counts


def test_killed_worker_restarts_and_finishes_like_an_uninterrupted_run(ddp_runs, tmp_path):
    run_dir = tmp_path / "run"
    result = _launch(["--standalone", "--max-restarts=1", __file__, "crash", 2,
                      "quickstart", "--run-dir", run_dir, *_cli_flags("lobster")], tmp_path)
    assert "resumed" in result.stdout and "after epoch 1" in result.stdout
    restarted = torch.load(run_dir / "last.pt", weights_only=True)
    uninterrupted = torch.load(ddp_runs / "lobster" / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "callbacks", "epoch"):
        _assert_identical(_comparable(restarted[key]), _comparable(uninterrupted[key]), key)
    _assert_identical(_comparable(restarted["history"]), _comparable(uninterrupted["history"]))
    assert not (run_dir / ".lock.owner").exists()


def test_a_restart_resumes_only_a_run_of_its_own_job(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"

    def attempt(job: str, restart: int, epochs: int) -> int:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart))
        return cli.main(["quickstart", "--run-dir", str(run_dir), *_cli_flags("lobster"),
                         "--set", f"train.epochs={epochs}"])

    threads = torch.get_num_threads()
    try:
        assert attempt("job-a", 0, 1) == 0
        assert (run_dir / ".torchelastic").read_text() == "job-a"
        capsys.readouterr()
        assert attempt("job-b", 1, 2) == 2  # another job's restart never takes this run over
        assert "already holds a run" in capsys.readouterr().err
        assert attempt("job-a", 1, 2) == 0
        assert "resumed" in capsys.readouterr().out
        resumed = torch.load(run_dir / "last.pt", weights_only=True)
        # Killed before its first checkpoint: the restart starts over, with the same config.
        for name in ("last.pt", "previous.pt"):
            (run_dir / name).unlink()
        assert attempt("job-a", 1, 2) == 0
        assert "resumed" not in capsys.readouterr().out
        again = torch.load(run_dir / "last.pt", weights_only=True)
    finally:
        torch.set_num_threads(threads)
    assert [r["epoch"] for r in again["history"]] == [1, 2]
    _assert_identical(again["model"], resumed["model"])


def test_missing_rendezvous_variables_are_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["quickstart", "--run-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "launch with torchrun" in error
    assert not (tmp_path / "run").exists()


def test_peers_that_never_join_time_out_with_a_clear_error(tmp_path, monkeypatch, capsys):
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "NEURONWISE_DIST_TIMEOUT_MIN": "0.03"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["quickstart", "--run-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "rendezvous at 127.0.0.1" in error and "failed" in error
    assert not torch.distributed.is_initialized()
    assert not (tmp_path / "run").exists()


def test_helpers_without_a_process_group(monkeypatch):
    assert distributed_setup.run_on_main(lambda: 7) == 7
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert distributed_setup.elastic_job() is None and distributed_setup.restart_count() == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-42")
    assert distributed_setup.elastic_job() == "job-42" and distributed_setup.restart_count() == 2
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert distributed_setup.elastic_job() == f"agent {os.getppid()}@{socket.gethostname()}"
    monkeypatch.setenv("NEURONWISE_DIST_TIMEOUT_MIN", "0")
    with pytest.raises(ValueError, match="Invalid NEURONWISE_DIST_TIMEOUT_MIN: '0'"):
        distributed_setup.timeout()


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
