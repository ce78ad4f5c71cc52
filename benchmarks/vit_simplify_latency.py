"""Dense vs simplified ViT: CPU latency at batch 1 and 32 next to the MACs ratio.

The ViT is the registry's (``--set`` model options), either with random dead heads and FFN units
(``--dead-heads``, ``--dead-units``: fractions killed in every block, value rows and fc1 rows set
to zero) or trained (``--run`` directory: its config.yaml and ``last.pt``/``best.pt``; or a
``--checkpoint`` file with ``--set`` model options). Simplified =
``neuronwise.transformer.simplify_transformer`` then ``neuronwise.simplify``. MACs come from
``torch.utils.flop_counter`` (every matmul, attention's included, batch 1, FLOPs / 2). Latency:
``neuronwise.latency.measure_latency``, models interleaved, medians; report ratios, not times.
On a loaded machine wall time mostly measures waiting for a core; ``--clock cpu`` times each
forward by the process's CPU time instead (one thread: the compute itself), same interleaving.
``--deploy`` also times ``neuronwise.deploy`` (simplify, then one compiled graph of ATen calls
without per-module dispatch, per-layer kernels chosen at batch 32) of the model and of the dense
architecture (fresh weights), in the same rounds; its speed-up is deployed vs dense deployed.

    python benchmarks/vit_simplify_latency.py [--dead-heads 0.5] [--dead-units 0.7] [--set dim=64]
    python benchmarks/vit_simplify_latency.py --run runs/RUN [--checkpoint-name best] [--deploy]
    python benchmarks/vit_simplify_latency.py --checkpoint runs/RUN/last.pt --set dim=64 depth=4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

import neuronwise as nw
from neuronwise.experiment.components import load_datasets
from neuronwise.experiment.tools import load_run_model
from neuronwise.latency import measure_latency
from neuronwise.transformer import (
    Attention,
    MeanAttention,
    MultiheadAttention,
    simplify_transformer,
)
from neuronwise.transformer.groups import AttentionHeads, FeedForwardUnits, neuron_groups


def macs(model: torch.nn.Module, example: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(example)
    return counter.get_total_flops() // 2


@torch.no_grad()
def kill(model: torch.nn.Module, heads: float, units: float, generator: torch.Generator) -> None:
    """Zero the value rows of a fraction of each attention's heads and fc1 rows of each FFN."""
    for group in neuron_groups(model):
        if isinstance(group, AttentionHeads):
            chosen = torch.randperm(group.num_heads, generator=generator)
            chosen = chosen[: round(heads * group.num_heads)]
            value_rows = group.rows(chosen).view(3, -1)[2]
            model.get_parameter(group.in_weight)[value_rows] = 0
        elif isinstance(group, FeedForwardUnits):
            chosen = torch.randperm(group.units, generator=generator)[: round(units * group.units)]
            model.get_submodule(group.fc1).weight[chosen] = 0


def heads_and_units(model: torch.nn.Module) -> tuple[int, int]:
    """(softmax attention heads, FFN units) that ``model``'s attentions and FFNs hold."""
    attentions = (Attention, MultiheadAttention, torch.nn.MultiheadAttention)
    return (sum(m.num_heads for m in model.modules() if isinstance(m, attentions)),
            sum(g.units for g in neuron_groups(model) if isinstance(g, FeedForwardUnits)))


def mean_branches(model: torch.nn.Module) -> int:
    """Attentions whose uniform heads simplify turned into one Linear of the token mean."""
    return sum(isinstance(m, MeanAttention) or (isinstance(m, Attention) and m.mean is not None)
               for m in model.modules())  # fmt: skip


@torch.no_grad()
def test_error(model: torch.nn.Module, test, batch: int = 1000) -> float:
    """Top-1 error (%) of ``model`` on an ``ArrayDataset``."""
    wrong = sum(int((model(test.images[i:i + batch]).argmax(1) != test.labels[i:i + batch]).sum())
                for i in range(0, len(test.labels), batch))
    return 100.0 * wrong / len(test.labels)


@torch.no_grad()
def cpu_latency(models: list[torch.nn.Module], x: torch.Tensor, repeats: int) -> list[float]:
    """Median CPU seconds per forward of each model, timed round-robin after 5 warm-up rounds."""
    times: list[list[float]] = [[] for _ in models]
    for round_index in range(5 + repeats):
        for index, model in enumerate(models):
            start = time.process_time()
            model(x)
            if round_index >= 5:
                times[index].append(time.process_time() - start)
    return [statistics.median(t) for t in times]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a run directory of a registry ViT")
    parser.add_argument("--checkpoint-name", choices=("last", "best"), default="last")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--dead-heads", type=float, default=0.5)
    parser.add_argument("--dead-units", type=float, default=0.7)
    parser.add_argument("--set", nargs="*", default=[], help="model options, e.g. dim=64 depth=4")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--deploy", action="store_true", help="also time neuronwise.deploy")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    options = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    dense = nw.models.create("vit", **options).eval()
    test = None
    if args.run:
        config, dense, _ = load_run_model(args.run, args.checkpoint_name)
        options = config.model.kwargs
        source = f"{args.run}, {args.checkpoint_name}.pt"
        test = load_datasets(config.data)[1]
    elif args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        dense.load_state_dict(state["model"])
        source = args.checkpoint
    else:
        kill(dense, args.dead_heads, args.dead_units, torch.Generator().manual_seed(0))
        source = f"random: {args.dead_heads:.0%} heads, {args.dead_units:.0%} FFN units dead"
    example = torch.zeros(1, 1, 28, 28)
    smaller = simplify_transformer(dense, example)  # nw.simplify's result is an fx graph
    before, after = heads_and_units(dense), heads_and_units(smaller)
    small = nw.simplify(smaller, example)
    x = torch.randn(max(args.batches), 1, 28, 28)
    error = (dense(x) - small(x)).abs().max() / dense(x).abs().max()
    params = [sum(p.numel() for p in m.parameters()) for m in (dense, small)]
    ratio = macs(small, example) / macs(dense, example)
    print(f"vit {options or 'defaults'} ({source}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {args.clock} clock, median of {args.repeats} "
          "interleaved rounds")  # fmt: skip
    print(f"parameters {params[0]:,} -> {params[1]:,}; MACs ratio {ratio:.3f}; "
          f"max relative output difference {error:.1e}")  # fmt: skip
    print(f"softmax attention heads {before[0]} -> {after[0]} (+ {mean_branches(smaller)} "
          f"token-mean Linear(s) of uniform heads); FFN units {before[1]} -> {after[1]}")
    if test is not None:
        print(f"test error of this checkpoint, dense / simplified: {test_error(dense, test):.2f} % / "
              f"{test_error(small, test):.2f} % ({len(test.labels):,} images)")
    models, header = [dense, small], "batch  dense ms  simplified ms  speed-up"
    if args.deploy:  # the dense architecture deployed too (fresh weights: no zero to remove)
        deployed = nw.deploy(dense, example, batch_size=32)
        deployed_error = (dense(x) - deployed(x)).abs().max() / dense(x).abs().max()
        full = nw.deploy(nw.models.create("vit", **options).eval(), example, batch_size=32)
        print(f"deployed: max relative output difference {deployed_error:.1e}")
        models += [full, deployed]
        header += "  dense deployed ms  deployed ms  speed-up (vs dense deployed)"
    print(header + "  (1/MACs ratio)")
    for batch in args.batches:
        measure = cpu_latency if args.clock == "cpu" else measure_latency
        times = measure(models, x[:batch], repeats=args.repeats)
        line = f"{batch:5d}  {times[0] * 1e3:8.3f}  {times[1] * 1e3:13.3f}  {times[0] / times[1]:7.2f}x"
        if args.deploy:
            line += (f"  {times[2] * 1e3:17.3f}  {times[3] * 1e3:11.3f}  "
                     f"{times[2] / times[3]:7.2f}x{'':19}")  # fmt: skip
        print(line + f"  ({1 / ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
