"""DDP throughput: 1 process vs 2 processes (torchrun, gloo on CPU / nccl on GPU), side by side.

Each configuration is launched with torchrun and trains ``--steps`` SGD steps of the same global
batch on fixed synthetic inputs (timing excludes start-up and ``--warmup`` steps). Rows:
1 process × 1 thread, 1 process × T threads and 2 processes × T/2 threads (T = ``--threads``), so
the last two use the same cores. Ratios: samples/s of 2 processes over each 1-process row.

    python benchmarks/ddp_scaling.py --models lenet5 resnet20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from neuronwise import distributed, models
from neuronwise.experiment.distributed_setup import distributed_session

SHAPES = {"lenet5": (1, 28), "lenet300": (1, 28), "mlp": (1, 8)}  # others: CIFAR 3×32×32


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "resnet20"])
    parser.add_argument("--batch-size", type=int, default=100, help="global batch")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (>= 1)")
    parser.add_argument("--threads", type=int, default=2, help="cores to use (even)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per launch")
    parser.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error(f"--steps {args.steps}, --warmup {args.warmup}: expected >= 1 each")
    if args.threads < 2 or args.threads % 2:
        parser.error(f"--threads {args.threads}: expected an even number >= 2")
    if args.batch_size % 2:
        parser.error(f"--batch-size {args.batch_size}: expected an even number (2 processes)")
    return args


def measure(args: argparse.Namespace) -> float:
    """Samples/s of DDP training steps, paced by the slowest rank."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    channels, size = SHAPES.get(args.worker, (3, 32))
    torch.manual_seed(0)
    model = models.create(args.worker, num_classes=10, in_channels=channels,
                          image_size=size).to(device)
    train_model = model
    if distributed.is_distributed():
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    local = args.batch_size // distributed.world_size()
    x = torch.randn(local, channels, size, size, device=device)
    y = torch.randint(0, 10, (local,), device=device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            distributed.all_reduce_sum(torch.zeros(1))  # start the clocks together
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(train_model(x), y).backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    slowest = torch.tensor([time.perf_counter() - started])
    if distributed.is_distributed():
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
    return args.steps * args.batch_size / slowest.item()


def worker(args: argparse.Namespace) -> None:
    """Inside torchrun: rank 0 prints one JSON line."""
    with distributed_session():
        # measure() returns before the process group goes, releasing its DDP wrapper (torch 2.13
        # aborts a worker whose group is destroyed under a live wrapper).
        throughput = measure(args)
        if distributed.is_main_process():
            print(json.dumps({"samples_per_s": throughput}))


def launch(args: argparse.Namespace, model: str, processes: int, threads: int) -> float:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={processes}", __file__, "--worker", model,
               "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=env,
                            timeout=args.timeout, check=False)
    lines = [x for x in result.stdout.splitlines() if x.startswith("{")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"launch failed ({shlex.join(command)}):\n{result.stderr[-2000:]}")
    return json.loads(lines[-1])["samples_per_s"]


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    half = args.threads // 2
    print(f"# {shlex.join(['python', 'benchmarks/ddp_scaling.py', *argv])}")
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs visible, global batch "
          f"{args.batch_size}, {args.steps} timed steps; samples/s")
    print(f"{'model':<10} {'1p×1t':>9} {f'1p×{args.threads}t':>9} {f'2p×{half}t':>9} "
          f"{'2p/1p×1t':>9} {f'2p/1p×{args.threads}t':>11}")
    for model in args.models:
        one = launch(args, model, 1, 1)
        one_all = launch(args, model, 1, args.threads)
        two = launch(args, model, 2, half)
        print(f"{model:<10} {one:>9.0f} {one_all:>9.0f} {two:>9.0f} {two / one:>9.2f} "
              f"{two / one_all:>11.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
