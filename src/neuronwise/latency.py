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
                    warmup: int = 5) -> list[float]:
    """Median seconds per forward of each model on ``inputs``, timed round-robin.

    Round-robin timing (model A, B, A, B, ...) exposes every model to the same background load,
    so their ratio is meaningful even on a busy machine.
    """
    if repeats < 1:
        raise ValueError(f"Invalid repeats: {repeats} (expected >= 1)")
    synchronize = torch.cuda.synchronize if inputs.is_cuda else (lambda: None)
    times: list[list[float]] = [[] for _ in models]
    with ExitStack() as stack:
        for model in models:
            stack.enter_context(evaluating(model))
        for round_index in range(warmup + repeats):
            for index, model in enumerate(models):
                synchronize()
                start = time.perf_counter()
                model(inputs)
                synchronize()
                if round_index >= warmup:
                    times[index].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]
