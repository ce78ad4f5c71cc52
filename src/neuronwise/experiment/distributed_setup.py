"""Process-group set-up for ``torchrun`` and the rank-0-first steps of a distributed run.

``torchrun`` sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; with more than one
process, :func:`distributed_session` joins the default group (gloo on CPU, nccl on GPU) with a
timeout (``NEURONWISE_DIST_TIMEOUT_MIN`` minutes, default 10), so a rendezvous that never completes
or a peer that stops answering becomes an error, never a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from neuronwise import distributed


class RendezvousError(ConnectionError):
    """The process group could not be formed (missing variables, peers that never joined)."""


class PeerFailedError(ValueError):
    """Rank 0 failed a step that the other ranks were waiting for; they stop with its message."""


def timeout() -> datetime.timedelta:
    """Collective and rendezvous timeout, from ``NEURONWISE_DIST_TIMEOUT_MIN`` (minutes)."""
    text = os.environ.get("NEURONWISE_DIST_TIMEOUT_MIN", "10")
    try:
        minutes = float(text)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise ValueError(f"Invalid NEURONWISE_DIST_TIMEOUT_MIN: {text!r} (expected minutes > 0)")
    return datetime.timedelta(minutes=minutes)


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def restart_count() -> int:
    """How often torchrun has restarted the workers of this job (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def elastic_job() -> str | None:
    """An identity of the torchrun job that survives its restarts; None outside torchrun.

    torchrun's run id, or, when it is the static default ``"none"``, the agent (the parent of
    every worker on this host, alive across restarts).
    """
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id and run_id != "none":
        return run_id
    return f"agent {os.getppid()}@{socket.gethostname()}"


@contextlib.contextmanager
def distributed_session():
    """Initialise the default process group when launched by torchrun; tear it down after.

    Release every ``DistributedDataParallel`` wrapper before leaving: torch 2.13 aborts a worker
    whose process group is destroyed under a live wrapper.
    """
    if not _launched_by_torchrun() or dist.is_initialized():
        yield
        return
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RendezvousError(
            f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set: "
            "launch with torchrun (python -m torch.distributed.run)")
    limit = timeout()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    try:
        store, rank, world = next(dist.rendezvous("env://", timeout=limit))
        # torchrun's agent keeps one store across restarts: a restarted worker could read the
        # address a killed peer published and fail to connect, so each attempt gets its own keys.
        store = dist.PrefixStore(f"neuronwise/attempt_{restart_count()}", store)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=store, rank=rank,
                                world_size=world, timeout=limit)
    except (RuntimeError, TimeoutError) as error:  # c10d's DistError family and store timeouts
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RendezvousError(
            f"rendezvous at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} failed "
            f"(rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}, timeout {limit}): "
            f"{first[:300]}") from None
    try:
        yield
    finally:
        # DDP wrappers live in reference cycles: free the unreachable ones before the process
        # group goes, or torch 2.13 aborts the worker at exit.
        gc.collect()
        dist.destroy_process_group()


def run_on_main(action: Callable[[], Any]) -> Any:
    """Run ``action`` on rank 0 while the other ranks wait; every rank returns rank 0's result.

    The result travels pickled (e.g. a checkpoint that only rank 0 reads, so the ranks need no
    shared file system). An exception on rank 0 is re-raised there and becomes a
    :class:`PeerFailedError` with its message on the other ranks, so no rank waits for a peer
    that has given up. Without a process group this is ``action()``.
    """
    if not distributed.is_distributed():
        return action()
    payload: list[Any] = [None]
    error: Exception | None = None
    if distributed.is_main_process():
        try:
            payload[0] = ("ok", action())
        except Exception as caught:  # noqa: BLE001 - every failure must reach the waiting ranks
            error = caught
            payload[0] = ("failed", " ".join(str(caught).split()) or type(caught).__name__)
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    status, value = payload[0]
    if status == "failed":
        raise PeerFailedError(f"rank 0 failed: {value}")
    return value
