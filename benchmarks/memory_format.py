"""Training-step and evaluation time of conv nets in NCHW vs channels-last (NHWC) layout.

``train.channels_last: true`` converts the model's 4-D weights to NHWC (inputs stay NCHW): CPU
convolutions and max-pooling then run their NHWC kernels. This script times both layouts side by
side, interleaved round after round so that load on the machine hits them alike, on random
MNIST-shaped tensors: one SGD step (batch 100, momentum 0.9) and one evaluation forward
(batch 1000). It also prints the largest output difference between the layouts (same weights),
which is floating-point reordering only.

    python benchmarks/memory_format.py [--models lenet5 resnet20] [--rounds 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from neuronwise import models

LAYOUTS = ("nchw", "channels_last")


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x, y) -> None:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def bench(name: str, rounds: int) -> dict:
    torch.manual_seed(0)
    dense = models.create(name, num_classes=10, in_channels=1, image_size=28)
    nets = {"nchw": dense, "channels_last": copy.deepcopy(dense).to(memory_format=torch.channels_last)}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in nets.items()}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(100, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (100,), generator=generator)
    x_eval = torch.randn(1000, 1, 28, 28, generator=generator)
    with torch.no_grad():
        difference = float((nets["nchw"].eval()(x_eval) - nets["channels_last"].eval()(x_eval))
                           .abs().max())
    times = {(kind, layout): [] for kind in ("train", "eval") for layout in LAYOUTS}
    for round_index in range(rounds + 2):  # two warm-up rounds
        for layout in LAYOUTS:
            model = nets[layout].train()
            start = time.perf_counter()
            _step(model, optimizers[layout], x, y)
            train_s = time.perf_counter() - start
            model.eval()
            start = time.perf_counter()
            with torch.no_grad():
                model(x_eval)
            eval_s = time.perf_counter() - start
            if round_index >= 2:
                times["train", layout].append(train_s)
                times["eval", layout].append(eval_s)
    return {"difference": difference,
            **{key: statistics.median(values) for key, values in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "resnet20"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), medians of "
          f"{args.rounds} interleaved rounds")
    print(f"{'model':<10} {'what':<22} {'NCHW ms':>9} {'NHWC ms':>9} {'speed-up':>9}")
    for name in args.models:
        result = bench(name, args.rounds)
        for kind, label in (("train", "train step, batch 100"), ("eval", "eval, batch 1000")):
            a, b = result[kind, "nchw"], result[kind, "channels_last"]
            print(f"{name:<10} {label:<22} {1e3 * a:>9.1f} {1e3 * b:>9.1f} {a / b:>8.2f}x")
        print(f"{name:<10} max |output difference| {result['difference']:.2e}")
    print("rerun: python benchmarks/memory_format.py " + " ".join(
        ["--models", *args.models, "--rounds", str(args.rounds)]
        + (["--threads", str(args.threads)] if args.threads else [])))


if __name__ == "__main__":
    main()
