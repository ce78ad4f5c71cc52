"""Overhead of ``Lobster.step()`` on a training step, foreach and per-tensor loop, side by side.

Times one SGD step (forward, backward, ``optimizer.step()``) of LeNet-300-100 and LeNet-5 on random
MNIST-shaped tensors, without the regularizer and with ``Lobster.step()`` in each of its two paths.
The three variants run interleaved, round after round, so that load on the machine hits them alike;
the reported times are medians over rounds and the ratios are relative to the plain step.

    python benchmarks/lobster_overhead.py [--device cuda] [--rounds 30] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from neuronwise.lobster import Lobster


def _fallback(name: str) -> nn.Module:
    # Same layers as neuronwise.models (METHODS.md §7), for use while that package is missing.
    if name == "lenet300":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 300),
            nn.ReLU(),
            nn.Linear(300, 100),
            nn.ReLU(),
            nn.Linear(100, 10),
        )
    return nn.Sequential(
        nn.Conv2d(1, 20, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(800, 500),
        nn.ReLU(),
        nn.Linear(500, 10),
    )


def build(name: str) -> nn.Module:
    try:
        from neuronwise import models
    except ImportError:
        return _fallback(name)
    return models.create(name, in_channels=1, image_size=28)  # the MNIST input it times


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, optimizer, reg, batch, steps, device) -> float:
    """Seconds per training step, averaged over ``steps`` steps."""
    x, y = batch
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if reg is not None:
            reg.step()
    _synchronize(device)
    return (time.perf_counter() - start) / steps


def bench(name: str, args: argparse.Namespace, device: torch.device) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=generator).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=generator).to(device)
    variants = {}
    for label, foreach in (("plain", None), ("foreach", True), ("loop", False)):
        torch.manual_seed(0)
        model = build(name).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        reg = None if label == "plain" else Lobster(model, lam=1e-4, foreach=foreach)
        variants[label] = (model, optimizer, reg)
    times: dict[str, list[float]] = {label: [] for label in variants}
    for label, variant in variants.items():  # warm-up
        time_steps(*variant, (x, y), args.steps, device)
    for _ in range(args.rounds):
        for label, variant in variants.items():
            times[label].append(time_steps(*variant, (x, y), args.steps, device))
    plain = statistics.median(times["plain"])
    print(f"{name} (batch {args.batch}, {device.type}): plain step {plain * 1e3:.3f} ms")
    for label in ("foreach", "loop"):
        median = statistics.median(times[label])
        print(f"  + Lobster.step() {label:8s} {median * 1e3:.3f} ms   ratio {median / plain:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timed blocks")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models:
        bench(name, args, device)
    print("rerun: python " + " ".join(["benchmarks/lobster_overhead.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
