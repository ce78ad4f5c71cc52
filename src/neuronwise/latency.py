"""Measured CPU/GPU inference latency, several models interleaved so they share machine noise."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn


@torch.no_grad()
def measure_latency(models: Sequence[nn.Module], inputs: torch.Tensor, repeats: int = 50,
                    warmup: int = 5) -> list[float]:
    """Median seconds per forward of each model on ``inputs``, timed round-robin.

    Round-robin timing (model A, B, A, B, ...) exposes every model to the same background load,
    so their ratio is meaningful even on a busy machine.
    """
    if repeats < 1:
        raise ValueError(f"Invalid repeats: {repeats} (expected >= 1)")
    modes = [m.training for m in models]
    for model in models:
        model.eval()
    synchronize = torch.cuda.synchronize if inputs.is_cuda else (lambda: None)
    times: list[list[float]] = [[] for _ in models]
    try:
        for round_index in range(warmup + repeats):
            for index, model in enumerate(models):
                synchronize()
                start = time.perf_counter()
                model(inputs)
                synchronize()
                if round_index >= warmup:
                    times[index].append(time.perf_counter() - start)
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    return [statistics.median(t) for t in times]
