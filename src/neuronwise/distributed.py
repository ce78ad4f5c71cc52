"""The one place where statistics are reduced across DDP ranks.

Every decision taken from data (validation loss for pruning, NEq similarities, PSP counts) goes
through these helpers, so that all ranks decide the same. Without an initialized process group
they are identities, so single-process code pays nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group is initialized with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def _reduce_device(tensor: torch.Tensor) -> torch.device:
    # gloo reduces CPU tensors, nccl CUDA tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place, and return it (identity when not distributed)."""
    if not is_distributed():
        return tensor
    device = _reduce_device(tensor)
    buffer = tensor.to(device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks, in place (identity when not distributed)."""
    all_reduce_sum(tensor)
    if is_distributed():
        tensor.div_(world_size())
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s value (identity when not distributed)."""
    if not is_distributed():
        return tensor
    device = _reduce_device(tensor)
    buffer = tensor.to(device)
    dist.broadcast(buffer, src=src)
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor
