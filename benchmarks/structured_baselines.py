"""SeReNe + simplify against structured magnitude pruning at matched test error (LeNet-300-100).

The SeReNe reference is a finished run (default ``runs/serene-lenet300-mnist-fast``, ``last.pt``),
simplified. The baselines start from the dense run's ``best.pt`` and prune whole hidden neurons
iteratively: at each level (share of each hidden layer's neurons pruned) they prune, then fine-tune
``--epochs`` epochs: the runs' SGD (lr 0.1, no momentum, batch 100, the same train split), with the
rate annealed to 0 by a cosine within each level (a constant 0.1 diverged at the 0.8 level).

- ``l1-layer``: ``neuronwise.l1_structured_prune(scope="layer")``, row L1 norms (Li et al. 2017),
  the same share of every hidden layer; a neuron mask keeps pruned rows at zero; simplify removes
  them.
- ``l1-global``: the same with ``scope="global"`` (norms divided by the layer mean, one ranking).
- ``tp-group-l1``: Torch-Pruning (``pip install -e .[baselines]``),
  ``GroupMagnitudeImportance(p=1)`` (its default group L1: the mean of the neuron's row norm and
  its outgoing column norm), per layer, removing neurons physically; the per-layer counts follow
  ``l1-layer``'s. Skipped with a note if not importable.

For each method two levels are timed: the most-pruned level whose test error is at most SeReNe's
(matched error; selected on the test set, as the comparison is defined) — or, if none is, the level
with the lowest error — and the level whose alive neuron count is closest to SeReNe's (matched
neurons). Latency: ``neuronwise.latency.measure_latency``,
every model interleaved with the dense one, medians, batch 1 and 256. FLOPs: forward, thop rules
(``neuronwise.metrics.forward_flops``). ratio = speed-up / FLOPs reduction (the target is ≥ 0.8).
Each level is cached under ``--cache``, so a rerun only measures.

    python benchmarks/structured_baselines.py [--epochs 6] [--levels 0.1 0.2 ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import neuronwise as nw
from neuronwise import data as nwdata
from neuronwise.experiment.tools import load_run_model
from neuronwise.latency import measure_latency
from neuronwise.metrics import count_neurons, count_parameters, forward_flops
from neuronwise.pruning import ParameterMask
from neuronwise.simplify import simplify

LAYERS = (nn.Linear, nn.Conv2d)
METHODS = ("l1-layer", "l1-global", "tp-group-l1")


def top1_error(model: nn.Module, test: nwdata.ArrayDataset) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum())
                      for x, y in nwdata.TensorLoader(test, batch_size=1000))  # fmt: skip
    return 100.0 - 100.0 * correct / len(test)


def fine_tune(model: nn.Module, loader: nwdata.TensorLoader, first_epoch: int,
              args: argparse.Namespace, mask: ParameterMask | None) -> None:  # fmt: skip
    """``args.epochs`` epochs of SGD; ``cosine`` anneals the rate to 0 over them, per batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    if mask is not None:
        mask.attach(optimizer)
    steps = args.epochs * len(loader)
    factor = (lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))) if (
        args.lr_schedule == "cosine") else (lambda step: 1.0)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    for epoch in range(first_epoch, first_epoch + args.epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            scheduler.step()
    model.eval()


def alive_per_layer(model: nn.Module) -> list[int]:
    """Alive neurons of each Linear/Conv2d (a non-zero weight in the row), in module order."""
    counts = count_neurons(model)
    return [counts[n][0] for n, m in model.named_modules() if isinstance(m, LAYERS)]


def fit_layers(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Resize every Linear of ``model`` to the shapes in ``state`` (a physically pruned model)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            out_features, in_features = state[f"{name}.weight"].shape
            parent, _, child = name.rpartition(".")
            new = nn.Linear(in_features, out_features, bias=module.bias is not None)
            setattr(model.get_submodule(parent) if parent else model, child, new)
    model.load_state_dict(state)
    return model.eval()


def tp_prune(model: nn.Module, example: torch.Tensor, targets: list[int]) -> None:
    """One Torch-Pruning step to ``targets`` alive neurons per hidden layer (group L1, per layer).

    A fresh pruner per level (so that levels resume from checkpoints); a ratio r makes Torch-Pruning
    keep int(N·(1 − r)) channels, hence r = 1 − (target + ½)/N for an exact count.
    """
    import torch_pruning as tp

    layers = [m for m in model.modules() if isinstance(m, LAYERS)]
    ratios = {layer: max(0.0, 1.0 - (target + 0.5) / layer.weight.shape[0])
              for layer, target in zip(layers[:-1], targets)}  # fmt: skip
    pruner = tp.pruner.BasePruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio_dict=ratios, ignored_layers=[layers[-1]], iterative_steps=1,
    )  # fmt: skip
    pruner.step()
    got = [layer.weight.shape[0] for layer in layers[:-1]]
    if got != targets:
        raise RuntimeError(f"Torch-Pruning kept {got} neurons (expected {targets})")


def run_levels(method: str, dense: nn.Module, example: torch.Tensor, args: argparse.Namespace,
               train: nwdata.ArrayDataset, test: nwdata.ArrayDataset) -> list[dict]:  # fmt: skip
    """Prune and fine-tune level by level; each level's weights and results come from the cache
    when its settings match."""
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    loader = nwdata.TensorLoader(train, batch_size=args.batch_size, shuffle=True, seed=args.seed)
    hidden = [m.weight.shape[0] for m in dense.modules() if isinstance(m, LAYERS)][:-1]
    model, records = copy.deepcopy(dense), []
    for index, level in enumerate(args.levels):
        key = {"method": method, "levels": args.levels[: index + 1], "epochs": args.epochs,
               "lr": args.lr, "lr_schedule": args.lr_schedule, "momentum": args.momentum,
               "batch_size": args.batch_size, "seed": args.seed,
               "dense": f"{args.dense_run}:best"}  # fmt: skip
        path = cache / f"{method}-{index:02d}.pt"
        saved = torch.load(path, weights_only=True) if path.exists() else None
        if saved is not None and saved["key"] == json.dumps(key):
            model = fit_layers(copy.deepcopy(dense), saved["state"])
            records.append(saved["record"] | {"model": copy.deepcopy(model)})
            continue
        start = time.perf_counter()
        mask = None
        if method == "tp-group-l1":
            tp_prune(model, example, [n - round(level * n) for n in hidden])
        else:
            mask = ParameterMask(model, LAYERS, granularity="neurons")
            nw.l1_structured_prune(model, level, scope=method.removeprefix("l1-"), mask=mask)
        fine_tune(model, loader, index * args.epochs, args, mask)
        record = {"level": level, "test_error": top1_error(model, test),
                  "alive": alive_per_layer(model),
                  "seconds": time.perf_counter() - start}  # fmt: skip
        torch.save({"key": json.dumps(key), "state": model.state_dict(), "record": record}, path)
        print(f"  {method} level {level:.2f}: alive {record['alive']}, test error "
              f"{record['test_error']:.2f} % ({record['seconds']:.0f} s)", flush=True)  # fmt: skip
        records.append(record | {"model": copy.deepcopy(model)})
    return records


def select(records: list[dict], error: float, neurons: int) -> dict[str, dict]:
    """Most-pruned level with test error ≤ ``error`` (none: the lowest-error level); the level with
    the alive total closest to ``neurons`` (ties: the more pruned)."""
    matched = [r for r in records if r["test_error"] <= error + 1e-9]
    closest = min(reversed(records), key=lambda r: abs(sum(r["alive"]) - neurons))
    if matched:
        return {"matched error": max(matched, key=lambda r: r["level"]),
                "matched neurons": closest}  # fmt: skip
    return {"lowest error": min(records, key=lambda r: (r["test_error"], -r["level"])),
            "matched neurons": closest}  # fmt: skip


def compact(model: nn.Module, example: torch.Tensor, x: torch.Tensor) -> nn.Module:
    """The model without dead neurons (simplified); checks that it computes the same function."""
    small = simplify(model, example)
    with torch.no_grad():
        y = model(x)
        difference = float((small(x) - y).abs().max() / y.abs().max())
    if difference > 1e-5:
        raise RuntimeError(f"simplified output differs by {difference:.2e} (relative)")
    return small


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serene-run", default="runs/serene-lenet300-mnist-fast")
    parser.add_argument("--dense-run", default="runs/dense-lenet300-mnist")
    parser.add_argument("--cache", default="runs/bench/structured-baselines")
    parser.add_argument(
        "--levels",
        type=float,
        nargs="+",
        default=[0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9],
    )
    parser.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs per level")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument(
        "--lr-schedule",
        choices=["constant", "cosine"],
        default="cosine",
        help="per level: constant, or cosine annealing to 0",
    )
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--repeats",
        type=int,
        nargs=2,
        default=[1000, 200],
        help="latency rounds at batch 1 and 256",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: keep)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    if sorted(args.levels) != args.levels or not all(0 < v < 1 for v in args.levels):
        parser.error(f"--levels must increase within (0, 1), got {args.levels}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    config, dense, example = load_run_model(args.dense_run, "best")
    root = nwdata.resolve_root(args.data_root or config.data.root)
    full = nwdata.load(config.data.name, "train", root=root)
    train, _ = nwdata.train_val_split(full, config.data.val_fraction, config.data.split_seed)
    test = nwdata.load(config.data.name, "test", root=root)
    _, serene, _ = load_run_model(args.serene_run, "last")
    serene_error, dense_error = top1_error(serene, test), top1_error(dense, test)
    serene_alive = alive_per_layer(serene)
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}; dense "
          f"{args.dense_run} (best.pt) {dense_error:.2f} %, SeReNe {args.serene_run} (last.pt) "
          f"{serene_error:.2f} %, alive {serene_alive}")  # fmt: skip

    methods = list(args.methods)
    try:
        import torch_pruning  # noqa: F401

        print(f"torch-pruning {importlib.metadata.version('torch-pruning')}")
    except ImportError:
        print("note: torch_pruning not importable (pip install -e .[baselines]): "
              "no Torch-Pruning rows")  # fmt: skip
        methods = [m for m in methods if m != "tp-group-l1"]
    trajectories = {m: run_levels(m, dense, example, args, train, test) for m in methods}

    print(f"\nFine-tuning: {args.epochs} epochs per level, SGD lr {args.lr} ({args.lr_schedule}), "
          f"momentum {args.momentum}, batch {args.batch_size}, seed {args.seed}. "
          "Test error % (alive neurons):")  # fmt: skip
    print("level  " + "  ".join(f"{m:>24}" for m in methods))
    for index, level in enumerate(args.levels):
        cells = [f"{r['test_error']:5.2f} ({'/'.join(map(str, r['alive']))})"
                 for r in (trajectories[m][index] for m in methods)]  # fmt: skip
        print(f"{level:5.2f}  " + "  ".join(f"{c:>24}" for c in cells))
    seconds = [f"{sum(r['seconds'] for r in trajectories[m]):.0f}" for m in methods]
    print("sum s  " + "  ".join(f"{c:>24}" for c in seconds) + "  (prune + fine-tune + test)")

    x = {batch: torch.randn(batch, *example.shape[1:], generator=torch.Generator().manual_seed(0))
         for batch in (1, 256)}  # fmt: skip
    rows = [
        ("dense", "", dense_error, alive_per_layer(dense), dense),
        ("serene+simplify", "", serene_error, serene_alive, compact(serene, example, x[256])),
    ]
    for method in methods:
        choice = select(trajectories[method], serene_error, sum(serene_alive))
        if "lowest error" in choice:
            print(f"note: {method}: no level reaches SeReNe's test error {serene_error:.2f} %; "
                  "timing its lowest-error level instead")  # fmt: skip
        for label, record in choice.items():
            model = record["model"]
            small = model if method == "tp-group-l1" else compact(model, example, x[256])
            rows.append((method, f"{label} ({record['level']:.2f})", record["test_error"],
                         record["alive"], small))  # fmt: skip
    models = [row[-1] for row in rows]
    latency = {batch: measure_latency(models, x[batch], repeats=repeats)
               for batch, repeats in zip((1, 256), args.repeats)}  # fmt: skip

    dense_flops = forward_flops(dense, example)["total"]
    print(f"\nLatency: medians of {args.repeats[0]} (batch 1) / {args.repeats[1]} (batch 256) "
          "rounds, all models interleaved; params = all, dense tensors after simplify; FLOPs = "
          "forward, batch 1 (thop); ratio = speed-up / FLOPs reduction")  # fmt: skip
    header = (f"{'method':16} {'level':24} {'err %':>5} {'alive':>10} {'params':>7} "
              f"{'FLOPs':>7} {'FLOPs red.':>10}  {'b1 ms':>6} {'b1 x':>5} {'ratio':>5}  "
              f"{'b256 ms':>7} {'b256 x':>6} {'ratio':>5}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for index, (method, label, error, alive, model) in enumerate(rows):
        flops = forward_flops(model, example)["total"]
        reduction = dense_flops / flops
        cells = []
        for batch in (1, 256):
            seconds = latency[batch][index]
            speedup = latency[batch][0] / seconds
            width = 6 if batch == 1 else 7
            cells.append(f"{seconds * 1e3:{width}.3f} {speedup:{width - 1}.2f} "
                         f"{speedup / reduction:5.2f}")  # fmt: skip
        print(f"{method:16} {label:24} {error:5.2f} {'/'.join(map(str, alive)):>10} "
              f"{count_parameters(model, 'all'):7,} {flops:7,} {reduction:10.2f}  "
              f"{cells[0]}  {cells[1]}")  # fmt: skip
    print("rerun: python benchmarks/structured_baselines.py " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
