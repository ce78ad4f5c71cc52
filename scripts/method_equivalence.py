"""Record, or compare against a record, the metrics of short LeNet-300/MNIST runs of every method.

A refactor of the method plumbing must not change a single number. Run once before the change
(``record``), once after (``compare``); the comparison is byte-for-byte on ``metrics.jsonl`` except
the wall-clock fields (``*_time_s``), which are dropped from both sides. One thread, seed 0.

    PYTHONPATH=src NEURONWISE_DATA=/work/shared/data OMP_NUM_THREADS=1 \
        python scripts/method_equivalence.py record /tmp/methods-before
    ... change the code ...
    python scripts/method_equivalence.py compare /tmp/methods-before /tmp/methods-after

Each run uses 5,000 training images, 1,000 test images and a pruning patience of 0, so that
pruning fires within 4 epochs (about 10 s a run on one core).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

COMMON = ["train.epochs=4", "train.threads=1", "data.limit_train=5000", "data.limit_test=1000"]
RUNS = {
    "lobster": ("configs/lobster/lenet300_mnist_fast.yaml",
                ["pruning.patience=0", "lobster.lam=1e-3"]),
    "serene": ("configs/serene/lenet300_mnist_fast.yaml",
               ["pruning.patience=0", "serene.lam=1e-3"]),
    "neq": ("configs/neq/lenet300_mnist.yaml", ["schedule.milestones=[2, 3]", "neq.eps=0.01"]),
    "neq-skip": ("configs/neq/lenet300_mnist.yaml",
                 ["neq.skip_frozen_grads=true", "neq.mode=grad", "neq.eps=0.01"]),
    "iterative": ("configs/baselines/lenet300_mnist_iterative.yaml",
                  ["model.init_from=null", "pruning.every=1"]),
    "gradual": ("configs/baselines/lenet300_mnist_iterative.yaml",
                ["model.init_from=null", "pruning.schedule=gradual", "pruning.every=1",
                 "pruning.end_epoch=3"]),
    "oneshot": ("configs/baselines/lenet300_mnist_iterative.yaml",
                ["model.init_from=null", "pruning.schedule=oneshot", "pruning.start_epoch=2"]),
}


def _run_all(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=False)
    for name, (config, extra) in RUNS.items():
        command = [sys.executable, "-m", "neuronwise", "run", config, "--run-dir", str(out / name)]
        for setting in COMMON + extra:
            command += ["--set", setting]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)


def _without_timing(path: Path) -> list[str]:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = {k: v for k, v in json.loads(line).items() if not k.endswith("_time_s")}
        lines.append(json.dumps(record, sort_keys=False))
    return lines


def _compare(before: Path, after: Path) -> int:
    different = 0
    for name in RUNS:
        old = _without_timing(before / name / "metrics.jsonl")
        new = _without_timing(after / name / "metrics.jsonl")
        same = old == new
        different += not same
        print(f"{name:10s} {len(old)} epochs  {'identical' if same else 'DIFFERENT'}")
        if not same:
            for a, b in zip(old, new):
                if a != b:
                    print(f"  before: {a}\n  after:  {b}")
                    break
    return 1 if different else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    record = sub.add_parser("record", help="run every method into OUT")
    record.add_argument("out", type=Path)
    compare = sub.add_parser("compare", help="run every method into AFTER and compare with BEFORE")
    compare.add_argument("before", type=Path)
    compare.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "record":
        _run_all(args.out)
        return 0
    if not args.after.exists():
        _run_all(args.after)
    return _compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
