"""Torch-Pruning's head and FFN pruning of a trained dense ViT, next to SeReNe + simplify.

The dense run (``--dense-run``, its ``best.pt``: the best-validation epoch) is pruned by
Torch-Pruning (``pip install -e .[baselines]``) at each ``--levels`` pair (share of heads, share
of FFN units removed in every block): ``MetaPruner`` with ``GroupMagnitudeImportance(p=1)``,
``num_heads`` given for each ``qkv`` and ``prune_num_heads=True, prune_head_dims=False`` (whole
heads), the residual stream left alone (patch embedding, ``proj``, ``fc2`` and the classifier
ignored); its ``num_heads`` is then written back into each attention by hand (Torch-Pruning does
not). Each level starts again from the dense model and is fine-tuned ``--epochs`` epochs with
the runs' SGD (lr 0.02, momentum 0.9, batch 100, the same train / validation split), the rate
annealed to 0 by a cosine; its test error is taken at the best-validation epoch of the
fine-tuning (the rule of the dense runs) and at the last.

The SeReNe runs (``--serene-run``, repeatable, ``last.pt``) are simplified
(``neuronwise.simplify``: the transformer pass, then the general one) and their test error
measured. Every model is then timed in one process, interleaved with the dense model, by process
CPU time (``vit_simplify_latency.cpu_latency``), at batch 1 and 32; MACs by
``torch.utils.flop_counter``. Each fine-tuned level is cached under ``--cache``.

    python benchmarks/vit_torch_pruning.py --dense-run runs/dense-vit-fashion-small \\
        --serene-run runs/serene-vit-fashion-small [--levels 0.5:0.9 0.75:0.97 ...] [--epochs 6]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vit_simplify_latency import cpu_latency, heads_and_units, macs, test_error

import neuronwise as nw
from neuronwise import data as nwdata
from neuronwise.experiment.components import load_datasets
from neuronwise.experiment.tools import load_run_model
from neuronwise.transformer import simplify_transformer


def tp_prune(model: nn.Module, example: torch.Tensor, heads: float, units: float) -> None:
    """Remove ``heads`` of each block's heads and ``units`` of its FFN units (Torch-Pruning)."""
    import torch_pruning as tp

    attentions = [b.attn for b in model.blocks]
    ignored = [model.patch_embed, model.classifier]
    ignored += [a.proj for a in attentions] + [b.mlp.fc2 for b in model.blocks]
    ratios = {b.mlp.fc1: units for b in model.blocks}
    ratios.update({a.qkv: heads for a in attentions})
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio_dict=ratios, ignored_layers=ignored,
        num_heads={a.qkv: a.num_heads for a in attentions}, prune_num_heads=True,
        prune_head_dims=False, head_pruning_ratio=heads,
    )  # fmt: skip
    pruner.step()
    for attention in attentions:  # the manual step Torch-Pruning leaves to its user
        attention.num_heads = pruner.num_heads[attention.qkv]


def fine_tune(model: nn.Module, train: nwdata.ArrayDataset, val: nwdata.ArrayDataset,
              test: nwdata.ArrayDataset, args: argparse.Namespace) -> dict:  # fmt: skip
    """``args.epochs`` epochs of SGD with a cosine rate; test errors at the best-validation epoch
    and at the last; the model ends with the best-validation weights."""
    loader = nwdata.TensorLoader(train, batch_size=100, shuffle=True, seed=args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    steps = args.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    best = (math.inf, None, None)
    for epoch in range(args.epochs):
        model.train()
        loader.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad():
            val_loss = float(F.cross_entropy(model(val.images), val.labels))
        last = test_error(model, test)
        if val_loss < best[0]:
            best = (val_loss, last, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    return {"test_error_best_val": best[1], "test_error_last": last}


def fit(model: nn.Module, state: dict[str, torch.Tensor], heads: list[int]) -> nn.Module:
    """``model`` resized to the pruned shapes of ``state`` (Linears, head counts), then loaded."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            out_features, in_features = state[f"{name}.weight"].shape
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, nn.Linear(in_features, out_features))
    for block, count in zip(model.blocks, heads):
        block.attn.num_heads = count
    model.load_state_dict(state)
    return model.eval()


def levels(dense: nn.Module, example: torch.Tensor, data: tuple, args: argparse.Namespace):
    """Per level: (label, fine-tuned pruned model, record), from the cache when it matches."""
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for level in args.levels:
        heads, units = (float(v) for v in level.split(":"))
        key = json.dumps({"dense": args.dense_run, "level": level, "epochs": args.epochs,
                          "lr": args.lr, "seed": args.seed})  # fmt: skip
        path = cache / f"tp-{level.replace(':', '-')}.pt"
        saved = torch.load(path, weights_only=True) if path.exists() else None
        if saved is not None and saved["key"] == key:
            model = fit(copy.deepcopy(dense), saved["state"], saved["heads"])
            yield f"tp {level}", model, saved["record"]
            continue
        start = time.process_time()
        model = copy.deepcopy(dense)
        tp_prune(model, example, heads, units)
        record = fine_tune(model, *data, args)
        record["cpu_seconds"] = time.process_time() - start
        counts = [b.attn.num_heads for b in model.blocks]
        torch.save({"key": key, "state": model.state_dict(), "heads": counts, "record": record},
                   path)  # fmt: skip
        yield f"tp {level}", model, record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense-run", required=True)
    parser.add_argument("--serene-run", action="append", default=[])
    parser.add_argument("--levels", nargs="+", default=["0.5:0.9", "0.75:0.9", "0.75:0.97"])
    parser.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs per level")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="runs/bench/vit-torch-pruning")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config, dense, example = load_run_model(args.dense_run, "best")
    full_train, test = load_datasets(config.data)
    train, val = nwdata.train_val_split(full_train, config.data.val_fraction, config.data.split_seed)
    rows = [("dense (best.pt)", dense, {"test_error_best_val": test_error(dense, test)})]
    for run in args.serene_run:
        _, trained, _ = load_run_model(run, "last")
        middle = simplify_transformer(trained, example)
        small = nw.simplify(middle, example)
        record = {"test_error_last": test_error(small, test), "counts": heads_and_units(middle)}
        rows.append((f"serene {Path(run).name}", small, record))
    rows += list(levels(dense, example, (train, val, test), args))
    x = torch.randn(32, *example.shape[1:])
    print(f"vit {config.model.kwargs} ({args.dense_run}, best.pt); torch {torch.__version__}, "
          f"{args.threads} thread(s), cpu clock, median of {args.repeats} interleaved rounds; "
          f"Torch-Pruning levels heads:FFN fine-tuned {args.epochs} epochs (lr {args.lr} cosine)")
    print("model                                heads  FFN  parameters  MACs ratio  "
          "err best-val  err last  batch 1  batch 32")
    base = macs(dense, example)
    for label, model, record in rows:
        heads, units = record.get("counts") or heads_and_units(model)
        speed = []
        for batch in (1, 32):
            t_dense, t_model = cpu_latency([dense, model], x[:batch], args.repeats)
            speed.append(t_dense / t_model)
        best, last = record.get("test_error_best_val"), record.get("test_error_last")
        print(f"{label:36s} {heads!s:>5}  {units!s:>4}  {sum(p.numel() for p in model.parameters()):10,}"
              f"  {macs(model, example) / base:10.3f}  {_pct(best):>12}  {_pct(last):>8}"
              f"  {speed[0]:6.2f}x  {speed[1]:7.2f}x", flush=True)  # fmt: skip
    return 0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} %"


if __name__ == "__main__":
    sys.exit(main())
