"""simplify vs Torch-Pruning on torchvision's families, with half of every coupled group dead.

For each model (random weights, random BN statistics and affine), Torch-Pruning 1.6.1's dependency
graph gives the coupled channel groups (classifier ignored); in each, every other channel (root
indices 0, 2, 4, ...) is made exactly dead: producer rows and biases zero, BN γ and β zero. Then
Torch-Pruning prunes those indices (``get_pruning_group(...).prune()``) and ``neuronwise.simplify``
is asked to find them. Where Torch-Pruning cannot build its graph, the groups come from
``neuronwise.structure.channel_groups`` instead (simplify only).

Printed per model: share of Torch-Pruning's removal that simplify achieves (removed Conv2d/Linear
weights, simplify / TP; ≥ 1 means at least as much), relative output error of both (max|Δy| /
max|y|), parameters (dense, simplify with BN folded, TP), the "constant" variant (BN left random:
the dead channels carry constants, which simplify folds and TP cannot remove exactly) and CPU
latency at batch 1 and 32 of dense / simplify / TP, timed interleaved in one process
(``neuronwise.latency.measure_latency``, medians), as speed-ups over dense.

    python benchmarks/simplify_vs_torch_pruning.py [--models resnet18 ...] [--size 224]
        [--repeats 5] [--threads 1]
    python benchmarks/simplify_vs_torch_pruning.py --removed-only --size 64   # exact counts

Needs torchvision (imported through ``neuronwise.integrations.torchvision``) and torch-pruning
(extra ``baselines``).
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys

import torch
from torch import nn

from neuronwise.integrations.torchvision import models as torchvision_models
from neuronwise.latency import measure_latency
from neuronwise.structure import channel_groups, simplify

FAMILIES = [
    "resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
    "densenet121", "googlenet", "regnet_y_400mf", "shufflenet_v2_x1_0",
]  # fmt: skip


def build(name: str, seed: int = 0) -> nn.Module:
    extra = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    torch.manual_seed(seed)
    model = getattr(torchvision_models(), name)(**extra).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def zero(module: nn.Module, rows: list[int], constant: bool) -> None:
    """Kill output rows: weights and bias of a Conv2d/Linear; γ, β of a BN unless ``constant``."""
    if isinstance(module, nn.BatchNorm2d) and constant:
        return
    if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
        with torch.no_grad():
            module.weight[rows] = 0.0
            if module.bias is not None:
                module.bias[rows] = 0.0


def torch_pruning_plan(model: nn.Module, x: torch.Tensor) -> list[tuple[str, list[int]]]:
    """(root module, every other root index) for each Torch-Pruning group; classifier ignored."""
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    plan = []
    names = {m: n for n, m in model.named_modules()}
    for group in graph.get_all_groups(
        ignored_layers=[classifier], root_module_types=[nn.Conv2d, nn.Linear]
    ):
        channels = len(group[0].idxs)
        plan.append((names[group[0].dep.target.module], list(range(0, channels, 2))))
    return plan


def apply_plan(model, x, plan, constant: bool, prune: bool) -> None:
    """Zero (or, with ``prune``, let Torch-Pruning remove) the planned channels of every group."""
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    for root_name, idxs in plan:
        root = model.get_submodule(root_name)
        group = graph.get_pruning_group(
            root, graph.get_pruner_of_module(root).prune_out_channels, idxs
        )
        if prune:
            group.prune()
            continue
        for dep, hybrid in group:
            if graph.is_out_channel_pruning_fn(dep.handler):
                zero(dep.target.module, [getattr(i, "idx", i) for i in hybrid], constant)


def own_plan_zero(model, x, constant: bool) -> None:
    """Every other removable channel group of neuronwise's analysis, killed."""
    for group in [g for g in channel_groups(model, x) if g.blocked_by is None][::2]:
        for name, side, c in group.members:
            if side == "out":
                zero(model.get_submodule(name), [c], constant)


def weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def error(reference: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    y = reference(x)
    return float((y - model(x)).abs().max() / y.abs().max())


def run(name: str, size: int, repeats: int) -> dict:
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    probe = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(2))
    dense = build(name)
    row: dict = {"model": name, "dense_params": params(dense)}
    try:
        plan = torch_pruning_plan(copy.deepcopy(dense), x)
    except Exception as failure:  # noqa: BLE001 - Torch-Pruning cannot trace or group it
        plan, row["tp_failure"] = None, f"{type(failure).__name__}: {str(failure)[:60]}"
    variants = {}
    for constant in (False, True):
        model = build(name)
        if plan is None:
            own_plan_zero(model, x, constant)
        else:
            apply_plan(model, x, plan, constant, prune=False)
        variants[constant] = model
    exact = variants[False]
    small = simplify(exact, x)
    row.update(simplify_err=error(exact, small, probe), simplify_params=params(small))
    contenders = [exact, small]
    if plan is not None:
        pruned = copy.deepcopy(exact)
        apply_plan(pruned, x, plan, False, prune=True)
        contenders.append(pruned)
        row.update(tp_err=error(exact, pruned, probe), tp_params=params(pruned))
        row["share"] = (weights(exact) - weights(small)) / (weights(exact) - weights(pruned))
    small_c = simplify(variants[True], x)
    row.update(const_err=error(variants[True], small_c, probe), const_params=params(small_c))
    for batch in (1, 32):
        inputs = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3))
        times = measure_latency(contenders, inputs, repeats=repeats, warmup=1)
        row[f"speedup{batch}"] = [times[0] / t for t in times[1:]]
    return row


def removed_counts(names: list[str], size: int) -> None:
    """Per model: Conv2d/Linear weights removed by simplify and by Torch-Pruning (exact variant)."""
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    print(f"# size {size} px: removed Conv2d/Linear weights, simplify vs Torch-Pruning")
    for name in names:
        try:
            plan = torch_pruning_plan(build(name), x)
        except Exception as failure:  # noqa: BLE001 - Torch-Pruning cannot trace or group it
            print(f"{name}: Torch-Pruning fails ({type(failure).__name__})")
            continue
        model = build(name)
        apply_plan(model, x, plan, False, prune=False)
        pruned = copy.deepcopy(model)
        apply_plan(pruned, x, plan, False, prune=True)
        ours, theirs = (
            weights(model) - weights(simplify(model, x)),
            weights(model) - weights(pruned),
        )
        verdict = "at least as much" if ours >= theirs else "LESS"
        print(f"{name}: simplify {ours:,}, Torch-Pruning {theirs:,} ({verdict})", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=FAMILIES)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--removed-only", action="store_true",
        help="only the removed Conv2d/Linear weights of both, exact counts (no timing)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rerun = "rerun: python benchmarks/simplify_vs_torch_pruning.py " + " ".join(
        map(shlex.quote, argv)
    )
    if args.removed_only:
        removed_counts(args.models, args.size)
        print(rerun)
        return 0
    print(
        f"# size {args.size} px, {args.threads} thread(s), median of {args.repeats} interleaved "
        "rounds; speed-ups over dense: simplify / Torch-Pruning"
    )
    print(
        "| model | share of TP's removal | rel. error simplify / TP | params dense / simplify / "
        "TP | constant variant: error, params | batch-1 speed-up | batch-32 speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        r = run(name, args.size, args.repeats)
        tp = "tp_failure" not in r
        share = f"{r['share']:.3f}" if tp else f"– ({r['tp_failure']})"
        err = f"{r['simplify_err']:.1e} / " + (f"{r['tp_err']:.1e}" if tp else "–")
        par = f"{r['dense_params']:,} / {r['simplify_params']:,} / " + (
            f"{r['tp_params']:,}" if tp else "–"
        )
        const = f"{r['const_err']:.1e}, {r['const_params']:,}"
        speed = [" / ".join(f"{s:.2f}" for s in r[f"speedup{b}"]) for b in (1, 32)]
        print(
            f"| {name} | {share} | {err} | {par} | {const} | {speed[0]} | {speed[1]} |", flush=True
        )
    print(rerun)
    return 0


if __name__ == "__main__":
    sys.exit(main())
