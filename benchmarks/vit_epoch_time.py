"""CPU time of one training epoch of the registry ViT, extrapolated from timed steps.

Times ``--steps`` training steps (AdamW, batch ``--batch``; with ``--serene`` also SeReNe's extra
backward and decay) by process CPU time, which a loaded machine inflates less than wall time,
and scales to one epoch of ``--train-size`` images. Indicative: one process, one thread.

    python benchmarks/vit_epoch_time.py [--steps 10] [--batch 128] [--serene] [--set dim=64]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
import yaml

import neuronwise as nw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--train-size", type=int, default=54_000)
    parser.add_argument("--serene", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], help="model options, e.g. dim=64 depth=4")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    options = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    model = nw.models.create("vit", **options).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reg = nw.SeReNe(model, lam=1e-4) if args.serene else None
    x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    cpu, wall = [], []
    for step in range(args.steps + 2):
        c0, w0 = time.process_time(), time.perf_counter()
        opt.zero_grad()
        logits = model(x)
        if reg is not None:
            reg.compute(logits)
        F.cross_entropy(logits, y).backward()
        opt.step()
        if reg is not None:
            reg.step()
        if step >= 2:  # two warm-up steps
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    steps_per_epoch = args.train_size / args.batch
    params = sum(p.numel() for p in model.parameters())
    print(f"vit {options or 'defaults'}: {params:,} parameters, batch {args.batch}, "
          f"{'SeReNe' if reg else 'plain'} step")  # fmt: skip
    print(f"CPU s/step {sum(cpu) / len(cpu):.3f} -> CPU s/epoch ({args.train_size} images) "
          f"{sum(cpu) / len(cpu) * steps_per_epoch:.0f}; wall s/step {sum(wall) / len(wall):.3f} "
          "(loaded machine)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
