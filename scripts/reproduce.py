"""Rerun every experiment quoted in docs/RESULTS.md, in order, resuming whatever already ran.

Each step is one command of RESULTS.md; run directories live under ``--runs`` (default ``runs/``)
with the names RESULTS.md uses. A step whose run directory holds a run continues it with
``--resume`` (a finished run is a no-op), so the script can be stopped at any moment and started
again, in this session or the next. Steps run one after the other as subprocesses; the first
failure stops the script with its exit status.

    python scripts/reproduce.py --list                 # the steps and their state
    python scripts/reproduce.py --only lenet300        # every step whose name contains "lenet300"
    python scripts/reproduce.py --threads 1 --dry-run  # print the commands only

The data root comes from ``$NEURONWISE_DATA`` (or ``--data-root``), as for ``neuronwise``. Budget
(an estimate from ~1 s per LeNet-300 epoch and ~10 s per LeNet-5 epoch on 2 idle CPU cores, not a
measurement of the whole script): hours for the ~3,500 LeNet-300 epochs, about a day for the
~2,000 LeNet-5 epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from neuronwise.experiment.config import read_yaml

# (step name = run directory under --runs, kind, arguments). Kinds: "run" (neuronwise run CONFIG,
# resumable), "study" (neuronwise study, resumes itself), "simplify" (of the run named first),
# "script" (a resumable benchmarks/ script taking --out).
STEPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("dense-lenet300-mnist", "run", ("configs/baselines/lenet300_mnist_dense.yaml",)),
    ("iterative-lenet300-mnist", "run", ("configs/baselines/lenet300_mnist_iterative.yaml",)),
    ("lobster-lenet300-mnist-fast", "run",
     ("configs/lobster/lenet300_mnist_fast.yaml", "--set", "train.epochs=1000")),
    ("lobster-lenet300-mnist-strong", "run", ("configs/lobster/lenet300_mnist_strong.yaml",)),
    ("lobster-lenet300-mnist", "run", ("configs/lobster/lenet300_mnist.yaml",)),
    ("serene-lenet300-mnist-fast", "run", ("configs/serene/lenet300_mnist_fast.yaml",)),
    ("serene-lenet300-mnist-fast", "simplify", ()),
    ("neq-sweep-lenet300", "script", ("benchmarks/neq_eps_sweep.py", "configs/neq/lenet300_mnist.yaml")),
    ("neq-optimizers", "script", ("benchmarks/neq_optimizers.py", "configs/neq/lenet300_mnist.yaml")),
    ("study-lenet300-mnist", "study", ("configs/study/oneshot_vs_gradual_lenet300_mnist.yaml",)),
    ("neq-sweep-lenet5", "script", ("benchmarks/neq_eps_sweep.py", "configs/neq/lenet5_fashion.yaml")),
    ("neq-resnet20-fashion", "run", ("configs/neq/resnet20_fashion.yaml",)),
    ("neq-resnet20-fashion-eps0", "run", ("configs/neq/resnet20_fashion.yaml", "--set", "neq.eps=0")),
    ("lobster-lenet5-mnist-strong", "run", ("configs/lobster/lenet5_mnist_strong.yaml",)),
    ("serene-lenet5-mnist-fast", "run", ("configs/serene/lenet5_mnist_fast.yaml",)),
    ("serene-lenet5-mnist-fast", "simplify", ()),
    ("dense-lenet5-mnist", "run", ("configs/baselines/lenet5_mnist_dense.yaml",)),
    ("iterative-lenet5-mnist", "run", ("configs/baselines/lenet5_mnist_iterative.yaml",)),
    ("lobster-lenet5-fashion-strong", "run", ("configs/lobster/lenet5_fashion_strong.yaml",)),
    ("serene-lenet5-fashion-fast", "run", ("configs/serene/lenet5_fashion_fast.yaml",)),
    ("serene-lenet5-fashion-fast", "simplify", ()),
    ("dense-lenet5-fashion", "run", ("configs/baselines/lenet5_fashion_dense.yaml",)),
    ("iterative-lenet5-fashion", "run", ("configs/baselines/lenet5_fashion_iterative.yaml",)),
    ("study-lenet5-mnist", "study", ("configs/study/oneshot_vs_gradual_lenet5_mnist.yaml",)),
    ("study-lenet5-fashion", "study", ("configs/study/oneshot_vs_gradual_lenet5_fashion.yaml",)),
)


def command(name: str, kind: str, args: tuple[str, ...], runs: Path, threads: int | None) -> list[str]:
    """The subprocess command line of one step."""
    cli = [sys.executable, "-m", "neuronwise"]
    directory = runs / name
    threads_set = ["--set", f"train.threads={threads}"] if threads else []
    if kind == "run":
        resume = ["--resume"] if (directory / "config.yaml").exists() else []
        return [*cli, "run", args[0], "--run-dir", str(directory), *resume, *args[1:], *threads_set]
    if kind == "study":
        threads_set = ["--set", f"base.train.threads={threads}"] if threads else []
        return [*cli, "study", args[0], "--study-dir", str(directory), *threads_set]
    if kind == "simplify":
        return [*cli, "simplify", str(directory), "--export", str(directory / "simplified.onnx")]
    if kind == "script":
        return [sys.executable, args[0], *args[1:], "--out", str(directory), *threads_set]
    raise ValueError(f"Invalid step kind: {kind!r}")


def state(name: str, kind: str, runs: Path) -> str:
    """'done', 'epoch E of N', 'started' or 'not started', read from the run directory."""
    directory = runs / name
    if kind == "simplify":
        return "done" if (directory / "simplified.onnx").exists() else "not started"
    if not directory.exists():
        return "not started"
    metrics, config = directory / "metrics.jsonl", directory / "config.yaml"
    if kind != "run" or not metrics.exists() or not config.exists():
        return "started"
    lines = metrics.read_text().splitlines()
    epoch = json.loads(lines[-1])["epoch"] if lines else 0
    wanted = read_yaml(config)["train"]["epochs"]
    return "done" if epoch >= wanted else f"epoch {epoch} of {wanted}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder of run directories")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="only steps whose name contains TEXT (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="--set train.threads=N")
    parser.add_argument("--data-root", help="data folder (default: $NEURONWISE_DATA)")
    parser.add_argument("--list", action="store_true", help="list the steps and their state")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    steps = [s for s in STEPS if not args.only or any(text in s[0] for text in args.only)]
    if not steps:
        print(f"reproduce: no step matches {args.only}", file=sys.stderr)
        return 2
    environment = dict(os.environ)
    if args.data_root:
        environment["NEURONWISE_DATA"] = args.data_root
    for name, kind, step_args in steps:
        if args.list:
            print(f"{name:<32} {kind:<9} {state(name, kind, args.runs)}")
            continue
        line = command(name, kind, step_args, args.runs, args.threads)
        shown = ["neuronwise", *line[3:]] if line[1:3] == ["-m", "neuronwise"] else ["python", *line[1:]]
        print("$ " + " ".join(shown), flush=True)
        if args.dry_run:
            continue
        status = subprocess.call(line, env=environment)
        if status != 0:
            print(f"reproduce: step {name} ({kind}) failed with exit status {status}", file=sys.stderr)
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
