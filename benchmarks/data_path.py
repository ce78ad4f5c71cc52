"""Time one training epoch fed by TensorLoader vs torch's DataLoader(TensorDataset), side by side.

Same tensors, same model initialization, same SGD (lr 0.1, batch 100), in one process; the
data-only rows time the loaders alone (no model). Ratio = DataLoader time / TensorLoader time.

    python benchmarks/data_path.py --max-batches 100
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from neuronwise import data, models


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="data root holding MNIST/raw (default: resolve_root())")
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--epochs-fraction", type=float, default=1.0, help="time this fraction of an epoch"
    )
    parser.add_argument("--max-batches", type=int, help="time at most this many batches")
    parser.add_argument("--repeats", type=int, default=1, help="report the fastest of N runs")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not 0.0 < args.epochs_fraction <= 1.0:
        parser.error(f"--epochs-fraction {args.epochs_fraction}: expected a value in (0, 1]")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(batches, num_batches: int, model, device: torch.device) -> float:
    """Seconds for ``num_batches`` steps (SGD when ``model`` is given, else only fetching)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1) if model is not None else None
    synchronize(device)
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        if step == num_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if model is not None:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train = data.load("mnist", "train", args.data_root).to(device)
    tensor_loader = data.TensorLoader(train, args.batch_size, shuffle=True, seed=0)
    torch_loader = DataLoader(
        TensorDataset(train.images, train.labels),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=0,
        generator=torch.Generator(device="cpu").manual_seed(0),
    )
    num_batches = max(1, int(len(tensor_loader) * args.epochs_fraction))
    if args.max_batches is not None:
        num_batches = min(num_batches, args.max_batches)

    print(
        f"MNIST train on {device}, {num_batches} batches of {args.batch_size}, "
        f"best of {args.repeats}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'workload':<12} {'TensorLoader s':>15} {'DataLoader s':>13} {'ratio':>7}")
    for name in [None, *args.models]:
        times = {"tensor": [], "torch": []}
        for repeat in range(args.repeats + 1):  # the first round warms up allocators and caches
            for kind, loader in (("tensor", tensor_loader), ("torch", torch_loader)):
                model = None
                if name is not None:
                    torch.manual_seed(0)
                    model = models.create(name, in_channels=1, image_size=28).to(device)
                seconds = run(loader, num_batches if repeat else 2, model, device)
                if repeat:
                    times[kind].append(seconds)
        ours, theirs = min(times["tensor"]), min(times["torch"])
        print(f"{name or 'data only':<12} {ours:>15.3f} {theirs:>13.3f} {theirs / ours:>6.1f}x")
    print("rerun: python benchmarks/data_path.py " + " ".join(map(shlex.quote, argv)))


if __name__ == "__main__":
    main()
