"""Process-group set-up for ``torchrun``: gloo on CPU, nccl on GPU, with timeouts (never a hang)."""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("NEURONWISE_DIST_TIMEOUT_MIN", "10")))


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def distributed_session():
    """Initialise the default process group when launched by torchrun; tear it down after."""
    if not _launched_by_torchrun() or dist.is_initialized():
        yield
        return
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()
