"""Measured backward time of NEq's ``skip_frozen_grads`` path next to the FLOPs-accounted saving.

For LeNet-5 (1×28×28) and ResNet-20 (3×32×32) from ``neuronwise.models``, with a share of each
hooked layer's neurons frozen (random draw, ``selection="random"``; "all" = every hooked neuron,
i.e. all but the classifier), times ``loss.backward()`` of the fast path (fully frozen layers
without ``requires_grad``, partly frozen Conv2d/Linear computing weight gradients of active rows
only) against the full backward of the same model, interleaved round after round; medians over
rounds. The forward is timed too, since the fast path adds a hook per partly frozen layer.
"FLOPs saving" is METHODS §5's accounting (backward = 2× forward per layer, × (1 − frozen
fraction)): a convention, not a measurement.

    python benchmarks/neq_backward.py [--device cuda] [--batch 32] [--rounds 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from neuronwise import metrics, models
from neuronwise.neq import NEq

SETUPS = {
    "lenet5": {"in_channels": 1, "image_size": 28},
    "resnet20": {"in_channels": 3, "image_size": 32},
}
FROZEN = [("0 %", 0.0), ("50 %", 0.5), ("90 %", 0.9), ("all", 1.0)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(model, x, y, device) -> tuple[float, float]:
    """(forward, backward) seconds of one training iteration."""
    model.zero_grad(set_to_none=True)
    _sync(device)
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    _sync(device)
    middle = time.perf_counter()
    loss.backward()
    _sync(device)
    return middle - start, time.perf_counter() - middle


def bench(name: str, frozen: float, args, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    setup = SETUPS[name]
    full = models.create(name, num_classes=10, **setup).to(device)
    fast = copy.deepcopy(full)
    size = (setup["in_channels"], setup["image_size"], setup["image_size"])
    neq = NEq(
        fast,
        torch.randn(8, *size, device=device),
        selection="random",
        trained_fraction=1.0 - frozen,
        skip_frozen_grads=True,
    )
    neq.step()  # after the warm-up epoch: the frozen set of the next epoch
    example = torch.randn(1, *size, device=device)
    flops_saving = 1 - neq.backward_flops(example) / metrics.backward_flops(full, example)
    x = torch.randn(args.batch, *size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    times: dict[str, list[tuple[float, float]]] = {"full": [], "fast": []}
    variants = [("full", full), ("fast", fast)]
    for _ in range(args.warmup):
        for _, model in variants:
            _timed_step(model, x, y, device)
    for round_ in range(args.rounds):
        # Alternate which variant goes first so that drifting load hits both alike.
        for key, model in variants if round_ % 2 == 0 else variants[::-1]:
            times[key].append(_timed_step(model, x, y, device))
    med = {k: [statistics.median(t[i] for t in v) for i in (0, 1)] for k, v in times.items()}
    return {
        "frozen": neq.frozen_fraction(),
        "full_fwd": med["full"][0],
        "fast_fwd": med["fast"][0],
        "full_bwd": med["full"][1],
        "fast_bwd": med["fast"][1],
        "flops_saving": flops_saving,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (quieter when 1)")
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"NEq skip_frozen_grads vs full backward — {label}, torch {torch.__version__}, "
        f"batch {args.batch}, medians of {args.rounds} interleaved rounds"
    )
    print(
        f"{'model':9} {'frozen':>7} {'bwd full ms':>11} {'bwd fast ms':>11} {'measured':>9} "
        f"{'FLOPs':>7} {'fwd full ms':>11} {'fwd fast ms':>11}"
    )
    for name in args.models:
        for label_, frozen in FROZEN:
            r = bench(name, frozen, args, device)
            print(
                f"{name:9} {label_:>7} {1e3 * r['full_bwd']:11.2f} {1e3 * r['fast_bwd']:11.2f} "
                f"{100 * (1 - r['fast_bwd'] / r['full_bwd']):8.1f}% "
                f"{100 * r['flops_saving']:6.1f}% {1e3 * r['full_fwd']:11.2f} "
                f"{1e3 * r['fast_fwd']:11.2f}"
            )
    print("measured = 1 − fast/full backward time; FLOPs = METHODS §5 backward-FLOPs saving")
    print("rerun: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
