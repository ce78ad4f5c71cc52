"""Measured CPU/GPU inference latency, several models interleaved so they share machine noise."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from contextlib import ExitStack

import torch
from torch import nn

from neuronwise._utils import evaluating


@torch.no_grad()
def measure_latency(models: Sequence[nn.Module], inputs: torch.Tensor, repeats: int = 50,
                    warmup: int = 5, clock: str = "wall") -> list[float]:
    """Median seconds per forward of each model on ``inputs``, timed round-robin.

    Round-robin timing (model A, B, A, B, ...) exposes every model to the same background load,
    so their ratio is meaningful even on a busy machine. ``clock="cpu"`` measures the process's
    CPU time instead of wall time (CPU inputs only): on an oversubscribed machine a call that is
    descheduled mid-way costs whole scheduler slices of wall time, which makes wall-time medians
    of millisecond calls jump between two modes; CPU time leaves those slices out (it is the
    latency only for single-threaded work).
    """
    if repeats < 1:
        raise ValueError(f"Invalid repeats: {repeats} (expected >= 1)")
    if clock not in ("wall", "cpu") or (clock == "cpu" and inputs.is_cuda):
        raise ValueError(f"Invalid clock: {clock!r} (expected 'wall', or 'cpu' for CPU inputs)")
    now = time.perf_counter if clock == "wall" else time.process_time
    synchronize = torch.cuda.synchronize if inputs.is_cuda else (lambda: None)
    times: list[list[float]] = [[] for _ in models]
    with ExitStack() as stack:
        for model in models:
            stack.enter_context(evaluating(model))
        for round_index in range(warmup + repeats):
            for index, model in enumerate(models):
                synchronize()
                start = now()
                model(inputs)
                synchronize()
                if round_index >= warmup:
                    times[index].append(now() - start)
    return [statistics.median(t) for t in times]
