"""NEq equilibrium under different learning setups: SGD and Adam, two learning rates each.

For each optimizer setting runs ``neuronwise run CONFIG`` with ε = ``--eps`` and with ε = 0 (its
dense baseline), and prints: final test accuracy of both, mean frozen share of hooked neurons, the
first epoch during which each hooked layer had at least half of its neurons frozen ("equilibrium
epoch"), the mean backward-FLOPs saving (NEq convention, METHODS.md §5) and the probe pass's wall
time as a share of the training time. Writes a PNG of the frozen share per layer and epoch, one
panel per setting. Runs are resumable run directories (the helpers of neq_eps_sweep.py).

    python benchmarks/neq_optimizers.py configs/neq/lenet300_mnist.yaml --out runs/neq-optimizers \\
        --plot docs/results/neq_optimizers.png --set train.threads=1
"""

from __future__ import annotations

import argparse
from pathlib import Path

from neq_eps_sweep import run, summary

SETTINGS = {
    "SGD lr 0.1": ["optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9"],
    "SGD lr 0.01": ["optim.name=sgd", "optim.lr=0.01", "optim.momentum=0.9"],
    "Adam lr 1e-3": ["optim.name=adam", "optim.lr=0.001", "optim.momentum=0.0"],
    "Adam lr 1e-4": ["optim.name=adam", "optim.lr=0.0001", "optim.momentum=0.0"],
}


def equilibrium_epochs(records: list[dict], share: float = 50.0) -> dict[str, int | None]:
    """Per hooked layer, the first epoch trained with ≥ ``share`` % of its neurons frozen."""
    if "frozen_per_layer" not in records[-1]:
        raise SystemExit("metrics.jsonl has no frozen_per_layer: rerun with a current neuronwise")
    return {layer: next((r["epoch"] for r in records if r["frozen_per_layer"][layer] >= share),
                        None) for layer in records[-1]["frozen_per_layer"]}


def plot(histories: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(histories), figsize=(3.2 * len(histories), 3.2),
                                sharey=True, squeeze=False)
    for axis, (name, records) in zip(axes[0], histories.items()):
        epochs = [r["epoch"] for r in records]
        for layer in records[-1]["frozen_per_layer"]:
            axis.plot(epochs, [r["frozen_per_layer"][layer] for r in records], label=layer)
        axis.plot(epochs, [r["frozen_percent"] for r in records], "k--", label="all hooked")
        axis.set_title(name)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("frozen neurons (%)")
    axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--out", default="runs/neq-optimizers")
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--plot", default="neq_optimizers.png", help="PNG of frozen % per epoch")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    out = Path(args.out)
    histories, rows = {}, []
    for name, sets in SETTINGS.items():
        folder = name.lower().replace(" ", "-")
        records = run(args.config, out / f"{folder}-eps{args.eps:g}",
                      [*sets, f"neq.eps={args.eps}", *args.set])
        dense = run(args.config, out / f"{folder}-eps0", [*sets, "neq.eps=0", *args.set])
        probe = sum(r["neq_time_s"] for r in records) / sum(r["train_time_s"] for r in records)
        histories[name] = records
        rows.append((name, summary(records), summary(dense), equilibrium_epochs(records), probe))
    print(f"{'setting':<14}{'test acc %':>11}{'eps=0 acc %':>12}{'frozen %':>10}"
          f"{'bwd FLOPs saved %':>19}{'probe % of train':>18}  equilibrium epoch (>=50 % frozen)")
    for name, r, dense, equilibrium, probe in rows:
        layers = ", ".join(f"{layer} {epoch or 'never'}" for layer, epoch in equilibrium.items())
        print(f"{name:<14}{r['accuracy']:>11.2f}{dense['accuracy']:>12.2f}{r['frozen']:>10.2f}"
              f"{r['saving']:>19.2f}{100 * probe:>18.2f}  {layers}")
    print(f"eps=0 runs: mean frozen % at most {max(d['frozen'] for _, _, d, _, _ in rows):.2f} "
          "(|velocity| exactly 0)")
    plot(histories, Path(args.plot))
    sets = "".join(f" --set {item}" for item in args.set)
    print(f"rerun: python benchmarks/neq_optimizers.py {args.config} --out {args.out} "
          f"--eps {args.eps:g} --plot {args.plot}{sets}")


if __name__ == "__main__":
    main()
