"""Kill -9 at random moments and resume, N times: does every run end bit-identical?

Runs ``python -m neuronwise run CONFIG`` once uninterrupted, then N trials of: start the same run in
a fresh process, SIGKILL it at a random moment (seeded), resume it with ``--resume``, kill again,
and so on ``--kills`` times; the last resume runs to the end. A trial is identical when its last.pt
(weights, optimizer, scheduler, method and pruning state, RNG states, history without timings),
best.pt and metrics.jsonl (without ``*time_s``) equal the uninterrupted run's.

A kill lands once the process has finished its set-up (imports, data, model; killed there, a run
just starts over), after a delay drawn uniformly over the time its remaining epochs are expected to
take: anywhere in training, evaluation, pruning or checkpoint writing. With ``--early`` it lands
anywhere from 0.5 s after the process started, set-up included (before the run directory exists,
while it is being created, before the first checkpoint). Every start passes ``--resume``, as a
requeue script would: the first one finds nothing to resume and starts the run.

    python benchmarks/crash_resume.py                  # quickstart (digits), LOBSTER + pruning
    python benchmarks/crash_resume.py -n 10 --kills 4
    python benchmarks/crash_resume.py -n 5 --kills 4 --early     # kills from 0.5 s on
    python benchmarks/crash_resume.py --config configs/lobster/lenet300_mnist.yaml \\
        --set train.epochs=4 --set pruning.patience=1 --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_SETTINGS = ["train.epochs=8", "pruning.patience=1", "data.batch_size=64",
                    "train.threads=1"]


def strip_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in records]


def differences(a, b, where: str = "") -> list[str]:
    """Paths at which two nested checkpoint values differ (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor):
        same = (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a, b))
        return [] if same else [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [where]
        return [d for key in a for d in differences(a[key], b[key], f"{where}.{key}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [where]


def outcome(run: Path) -> dict:
    last = torch.load(run / "last.pt", weights_only=True)
    last["history"] = strip_times(last["history"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"last": last, "best": torch.load(run / "best.pt", weights_only=True)["model"],
            "metrics": strip_times(metrics)}


def metrics_lines(run: Path) -> int:
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def training_started(run: Path, since: float) -> bool:
    """Set-up is over: a fresh run writes config.yaml, a resumed one rewrites metrics.jsonl."""
    for name in ("config.yaml", "metrics.jsonl"):
        try:
            if (run / name).stat().st_mtime >= since:
                return True
        except FileNotFoundError:
            pass
    return False


def start(args: argparse.Namespace, run: Path, log, wait: bool = True) -> subprocess.Popen:
    """Start the run with ``--resume``; with ``wait``, return once its training has begun."""
    since = time.time()
    process = subprocess.Popen(command(args, run), stdout=log, stderr=log)
    while wait and not training_started(run, since) and process.poll() is None:
        time.sleep(0.005)
    return process


def command(args: argparse.Namespace, run: Path) -> list[str]:
    argv = [sys.executable, "-m", "neuronwise", "run", args.config, "--run-dir", str(run)]
    for setting in args.set:
        argv += ["--set", setting]
    if args.data_root:
        argv += ["--data-root", args.data_root]
    return argv + ["--resume"]


def trial(args: argparse.Namespace, run: Path, epochs: int, epoch_time: float, setup: float,
          rng: random.Random, log) -> list[str]:
    """Kill and resume ``args.kills`` times, then finish; returns where each kill landed."""
    landed = []
    for _ in range(args.kills):
        done = metrics_lines(run)
        if done == epochs:
            break
        process = start(args, run, log, wait=not args.early)
        if args.early:  # from 0.5 s after the start, set-up included
            delay = rng.uniform(0.5, setup + (epochs - done) * epoch_time)
            where = (f"{delay:.2f} s (set-up)" if delay < setup else
                     f"{delay:.2f} s (epoch ≈{done + (delay - setup) / epoch_time:.2f})")
        else:
            delay = rng.uniform(0, (epochs - done) * epoch_time)
            where = f"epoch ≈{done + delay / epoch_time:.2f}"
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            landed.append(where)
            continue
        if process.returncode != 0:
            raise SystemExit(f"run failed (exit {process.returncode}); see {log.name}")
    if start(args, run, log).wait() != 0:
        raise SystemExit(f"resume failed; see {log.name}")
    return landed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help=f"config override (default: {' '.join(DEFAULT_SETTINGS)})")
    parser.add_argument("--data-root")
    parser.add_argument("-n", "--trials", type=int, default=5)
    parser.add_argument("--kills", type=int, default=3, help="kills per trial")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--early", action="store_true",
                        help="kill from 0.5 s after the start on, set-up included")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    args = parser.parse_args()
    args.set = args.set if args.set is not None else DEFAULT_SETTINGS

    folder = Path(tempfile.mkdtemp(prefix="crash_resume-"))
    log = open(folder / "log.txt", "w")  # noqa: SIM115 - the children write to it throughout
    reference = folder / "uninterrupted"
    launched = time.time()
    process = start(args, reference, log)
    started = time.time()
    setup = started - launched  # imports, data, model: until training begins
    if process.wait() != 0:
        raise SystemExit(f"the uninterrupted run failed; see {log.name}")
    expected = outcome(reference)
    epochs = len(expected["metrics"])
    # Per epoch, everything included (training, evaluation, pruning, checkpoint writing): from
    # the end of set-up to the last metrics line.
    epoch_time = ((reference / "metrics.jsonl").stat().st_mtime - started) / epochs
    print(f"uninterrupted: {setup:.2f} s set-up, {epochs} epochs, {epoch_time:.3f} s/epoch")

    rng = random.Random(args.seed)
    identical = 0
    for number in range(1, args.trials + 1):
        run = folder / f"trial{number}"
        landed = trial(args, run, epochs, epoch_time, setup, rng, log)
        got = outcome(run)
        wrong = [d for key in expected for d in differences(expected[key], got[key], key)]
        identical += not wrong
        verdict = "identical" if not wrong else f"DIFFERENT at {', '.join(wrong[:5])}"
        print(f"trial {number}: killed at {', '.join(landed) or 'no moment (finished first)'}: "
              f"{verdict}")
    log.close()
    print(f"{identical} of {args.trials} identical")
    rerun = " ".join(["python", "benchmarks/crash_resume.py", "-n", str(args.trials), "--kills",
                      str(args.kills), "--seed", str(args.seed), "--config", args.config]
                     + (["--early"] if args.early else [])
                     + [f"--set {s}" for s in args.set]
                     + ([f"--data-root {args.data_root}"] if args.data_root else []))
    print(f"rerun: {rerun}")
    if args.keep:
        print(f"run directories: {folder}")
    else:
        shutil.rmtree(folder)
    if identical != args.trials:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
