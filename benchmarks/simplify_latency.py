"""Dense vs simplified inference latency on CPU, next to the forward-FLOPs ratio.

Kills a random fraction of the hidden neurons of LeNet-300-100 and LeNet-5 (every Linear row and
Conv2d channel except the classifier's), removes them with ``neuronwise.simplify``, and times both
models interleaved (``neuronwise.latency.measure_latency``: medians over rounds) at batch 1 and 256.
FLOPs follow ``neuronwise.metrics.forward_flops`` (thop rules, batch 1). The dense model computes
the zeros; the speed-up is what removing them buys on this machine, not a FLOPs ratio.

    python benchmarks/simplify_latency.py [--killed 0.7 0.9] [--repeats 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from neuronwise import models
from neuronwise.latency import measure_latency
from neuronwise.metrics import forward_flops
from neuronwise.simplify import simplify

SETUPS = (("lenet300", (1, 28, 28)), ("lenet5", (1, 28, 28)))


def kill_neurons(model: nn.Module, fraction: float, generator: torch.Generator) -> None:
    """Zero the incoming weights of a random ``fraction`` of each hidden layer's neurons."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    with torch.no_grad():
        for layer in layers:
            rows = layer.weight.shape[0]
            layer.weight[torch.randperm(rows, generator=generator)[: round(fraction * rows)]] = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--killed", type=float, nargs="+", default=[0.7, 0.9])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: keep)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)

    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, "
          f"median of {args.repeats} interleaved rounds")  # fmt: skip
    header = "model     killed  FLOPs ratio  batch  dense ms  simplified ms  speed-up"
    print(header)
    print("-" * len(header))
    for name, shape in SETUPS:
        for fraction in args.killed:
            dense = models.create(name).eval()
            kill_neurons(dense, fraction, generator)
            example = torch.zeros(1, *shape)
            small = simplify(dense, example)
            flops = forward_flops(small, example)["total"] / forward_flops(dense, example)["total"]
            for batch in args.batches:
                x = torch.randn(batch, *shape, generator=generator)
                with torch.no_grad():
                    y = dense(x)
                    error = (y - small(x)).abs().max() / y.abs().max()
                if error > 1e-5:
                    print(f"{name}: simplified output differs by {error:.2e} (relative)")
                    return 1
                t_dense, t_small = measure_latency([dense, small], x, repeats=args.repeats)
                print(f"{name:9} {fraction:6.0%}  {flops:11.3f}  {batch:5}  {t_dense * 1e3:8.3f}  "
                      f"{t_small * 1e3:13.3f}  {t_dense / t_small:7.2f}x")  # fmt: skip
    print("rerun: python benchmarks/simplify_latency.py " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
