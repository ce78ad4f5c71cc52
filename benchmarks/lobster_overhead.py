"""Overhead of ``Lobster.step()`` and ``SeReNe.step()`` on a training step, side by side.

Times one SGD step (forward, backward, ``optimizer.step()``) of LeNet-300-100 and LeNet-5 on random
MNIST-shaped tensors: plain; with ``Lobster.step()`` in each of its two paths (foreach, per-tensor
loop); with SeReNe's ``compute()`` alone and with ``compute()`` + ``step()``, whose difference is
the cost of ``SeReNe.step()`` (``compute()`` is an extra backward, reported apart); and, as a floor,
with one in-place pass over the parameters (``torch._foreach_mul_(params, 1.0)``: one read and one
write of each), the least that any update applied after ``optimizer.step()`` costs. The variants
run interleaved, round after round, so that load on the machine hits them alike; the reported times
are medians over rounds and the ratios are relative to the plain step. On CPU the clock is the
process's CPU time (``time.process_time``), which time slices given to other processes of a loaded
machine do not inflate; on CUDA it is wall-clock time after a synchronize.

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
from neuronwise.serene import SeReNe


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


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def time_steps(model, optimizer, reg, batch, steps, device) -> float:
    """Seconds per training step, averaged over ``steps`` steps.

    ``reg``: None, a Lobster, ``"one pass"``, or ``(serene, call_step)``: SeReNe's compute(), and
    its step() if ``call_step``.
    """
    params = list(model.parameters())
    x, y = batch
    serene, call_step = reg if isinstance(reg, tuple) else (None, False)
    start = _clock(device)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=False)
        logits = model(x)
        if serene is not None:
            serene.compute(logits)
        nn.functional.cross_entropy(logits, y).backward()
        optimizer.step()
        if isinstance(reg, Lobster):
            reg.step()
        elif reg == "one pass":
            with torch.no_grad():
                torch._foreach_mul_(params, 1.0)
        elif call_step:
            serene.step()  # without it, compute() keeps adding to its sums (one small add each)
    return (_clock(device) - start) / steps


def bench(name: str, args: argparse.Namespace, device: torch.device) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=generator).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=generator).to(device)
    variants = {}
    for label in ("plain", "one pass", "lobster foreach", "lobster loop", "serene compute",
                  "serene step"):
        torch.manual_seed(0)
        model = build(name).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        reg = None
        if label == "one pass":
            reg = label
        elif label.startswith("lobster"):
            reg = Lobster(model, lam=1e-4, foreach=label.endswith("foreach"))
        elif label.startswith("serene"):
            reg = (SeReNe(model, lam=1e-4), label.endswith("step"))
        variants[label] = (model, optimizer, reg)
    times: dict[str, list[float]] = {label: [] for label in variants}
    for label, variant in variants.items():  # warm-up
        time_steps(*variant, (x, y), args.steps, device)
    for _ in range(args.rounds):
        for label, variant in variants.items():
            times[label].append(time_steps(*variant, (x, y), args.steps, device))
    median = {label: statistics.median(t) for label, t in times.items()}
    plain = median["plain"]
    print(f"{name} (batch {args.batch}, {device.type}): plain step {plain * 1e3:.3f} ms")
    one_pass = median["one pass"]
    print(f"  + one pass over params   {one_pass * 1e3:.3f} ms   ratio {one_pass / plain:.3f}")
    for label in ("foreach", "loop"):
        step = median[f"lobster {label}"]
        print(f"  + Lobster.step() {label:8s} {step * 1e3:.3f} ms   ratio {step / plain:.3f}")
    compute, step = median["serene compute"], median["serene step"]
    print(f"  + SeReNe.compute()          {compute * 1e3:.3f} ms   ratio {compute / plain:.3f}")
    print(f"  + SeReNe.compute() + step() {step * 1e3:.3f} ms   "
          f"SeReNe.step() alone ratio {(plain + step - compute) / plain:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timed blocks")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    clock = "wall-clock" if device.type == "cuda" else "process CPU time"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {clock}")
    for name in args.models:
        bench(name, args, device)
    print("rerun: python " + " ".join(["benchmarks/lobster_overhead.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
