"""NEq epsilon sweep plus the random ("stochastic") and top-k baselines at NEq's trained fraction.

Runs ``neuronwise run CONFIG`` once per epsilon (eps = 0 is the dense baseline), then with
``neq.selection=topk`` and ``neq.selection=random`` (METHODS.md §5 baselines) at the mean trained
fraction of the reference epsilon, and prints one table:
final test accuracy, mean frozen share of hooked neurons, mean backward-FLOPs saving (NEq
convention, METHODS.md §5) and mean training time per epoch. Runs are resumable run directories.

    python benchmarks/neq_eps_sweep.py configs/neq/lenet300_mnist.yaml --out runs/neq-sweep
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neuronwise.experiment.cli import main as neuronwise


def run(config: str, run_dir: Path, sets: list[str]) -> list[dict]:
    if not (run_dir / "metrics.jsonl").exists() or not (run_dir / "last.pt").exists():
        argv = ["run", config, "--run-dir", str(run_dir)]
        argv += ["--resume"] if run_dir.exists() else []
        for item in sets:
            argv += ["--set", item]
        if neuronwise(argv) != 0:
            raise SystemExit(f"run failed: {run_dir}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(records: list[dict]) -> dict:
    mean = lambda key: sum(r.get(key, 0.0) for r in records) / len(records)
    return {"accuracy": records[-1]["test_accuracy"], "frozen": mean("frozen_percent"),
            "saving": mean("backward_saving_percent"), "time": mean("train_time_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--out", default="runs/neq-sweep")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.0, 1e-4, 1e-3, 1e-2])
    parser.add_argument("--reference", type=float, default=1e-3,
                        help="epsilon whose mean trained fraction the top-k baseline matches")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    out = Path(args.out)
    rows = {}
    for eps in args.eps:
        rows[f"eps={eps:g}"] = summary(run(args.config, out / f"eps{eps:g}",
                                           [f"neq.eps={eps}", *args.set]))
    trained = 1.0 - rows[f"eps={args.reference:g}"]["frozen"] / 100.0
    for selection, label in (("topk", "top-k"), ("random", "random")):
        rows[f"{label} p={trained:.3f}"] = summary(run(
            args.config, out / selection,
            [f"neq.selection={selection}", f"neq.trained_fraction={trained:.4f}", *args.set]))
    print(f"{'setting':<16}{'test acc %':>11}{'frozen %':>10}{'bwd FLOPs saved %':>19}"
          f"{'train s/epoch':>15}")
    for name, r in rows.items():
        print(f"{name:<16}{r['accuracy']:>11.2f}{r['frozen']:>10.2f}{r['saving']:>19.2f}"
              f"{r['time']:>15.2f}")
    print(f"rerun: python benchmarks/neq_eps_sweep.py {args.config} --out {args.out}")


if __name__ == "__main__":
    main()
