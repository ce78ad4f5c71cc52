"""Rerun every experiment quoted in docs/RESULTS.md, in order, resuming whatever already ran.

Each step is one command of RESULTS.md; run directories live under ``--runs`` (default ``runs/``)
with the names RESULTS.md uses. A step whose run directory holds a run continues it with
``--resume`` (a finished run is a no-op), so the script can be stopped at any moment and started
again, in this session or the next. Steps run as subprocesses, one after the other, or ``--jobs N``
at a time (each then writes ``RUNS/NAME.log``), a step starting only after the steps it needs: a
``simplify`` after its run, a run whose config has ``model.init_from: runs/OTHER/...`` after OTHER.
Paths under ``runs/`` in a step (an ``init_from``, a benchmark's run) follow ``--runs``.
The first failure stops the script (running steps finish) with its exit status.

    python scripts/reproduce.py --list                 # the steps and their records' state
    python scripts/reproduce.py --only lenet300        # every step whose name contains "lenet300"
    python scripts/reproduce.py --threads 1 --dry-run  # print the commands only
    python scripts/reproduce.py --jobs 3 --threads 1   # three steps at a time, one thread each

The data root comes from ``$NEURONWISE_DATA`` (or ``--data-root``), as for ``neuronwise``. Budget
(an estimate from ~1 s per LeNet-300 epoch and ~10 s per LeNet-5 epoch on 2 idle CPU cores, not a
measurement of the whole script): hours for the ~3,500 LeNet-300 epochs, about a day for the
~2,000 LeNet-5 epochs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from neuronwise.experiment.config import read_yaml


def _vit_latency(step: str, output: str, run: str) -> tuple[str, str, tuple[str, ...]]:
    """A step of benchmarks/vit_simplify_latency.py on runs/RUN: CPU clock, 30 rounds, deploy."""
    return (step, "bench", ("benchmarks/vit_simplify_latency.py", output, "--run", f"runs/{run}",
                            "--clock", "cpu", "--repeats", "30", "--deploy"))


# (step name = run directory under --runs, kind, arguments). Kinds: "run" (neuronwise run CONFIG,
# resumable), "study" (neuronwise study, resumes itself), "simplify" (of the run named first),
# "script" (a resumable benchmarks/ script taking --out), "compare" (neuronwise compare CONFIG,
# resumes its runs in docs/results/runs), "bench" (a benchmark whose output is kept).
STEPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("dense-lenet300-mnist", "run", ("configs/baselines/lenet300_mnist_dense.yaml",)),
    ("iterative-lenet300-mnist", "run", ("configs/baselines/lenet300_mnist_iterative.yaml",)),
    ("lobster-lenet300-mnist-fast", "run",
     ("configs/lobster/lenet300_mnist_fast.yaml", "--set", "train.epochs=1000")),
    ("lobster-lenet300-mnist-strong", "run", ("configs/lobster/lenet300_mnist_strong.yaml",)),
    ("lobster-lenet300-mnist", "run", ("configs/lobster/lenet300_mnist.yaml",)),
    ("lobster-lenet300-mnist-deploy-stage1", "run",
     ("configs/lobster/lenet300_mnist_strong.yaml", "--set", "train.epochs=45")),
    ("lobster-lenet300-mnist-deploy", "run", ("configs/lobster/lenet300_mnist_deploy.yaml",)),
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
    # stopped at epoch 93 of 150, once it had reached ~1 % (the sparse deployment benchmark's model)
    ("lobster-lenet5-fashion-deploy", "run",
     ("configs/lobster/lenet5_fashion_deploy.yaml", "--set", "train.epochs=93")),
    ("serene-lenet5-fashion-fast", "run", ("configs/serene/lenet5_fashion_fast.yaml",)),
    ("serene-lenet5-fashion-fast", "simplify", ()),
    ("dense-lenet5-fashion", "run", ("configs/baselines/lenet5_fashion_dense.yaml",)),
    ("iterative-lenet5-fashion", "run", ("configs/baselines/lenet5_fashion_iterative.yaml",)),
    ("serene-vit-fashion-small", "run", ("configs/serene/vit_fashion_small.yaml",)),
    ("dense-vit-fashion-small", "run", ("configs/baselines/vit_fashion_small_dense.yaml",)),
    ("serene-vit-fashion-small-s1", "run",
     ("configs/serene/vit_fashion_small.yaml", "--set", "train.seed=1")),
    ("dense-vit-fashion-small-s1", "run",
     ("configs/baselines/vit_fashion_small_dense.yaml", "--set", "train.seed=1")),
    ("serene-vit-fashion-small-s2", "run",
     ("configs/serene/vit_fashion_small.yaml", "--set", "train.seed=2")),
    ("dense-vit-fashion-small-s2", "run",
     ("configs/baselines/vit_fashion_small_dense.yaml", "--set", "train.seed=2")),
    # SeReNe with whole-neuron masks, then 10 epochs of masked fine-tuning (issue 18's recipe).
    *((f"serene-vit-fashion-small-neurons{suffix}", "run",
       ("configs/serene/vit_fashion_small.yaml", "--set", "pruning.granularity=neurons",
        "--set", "name=serene-vit-fashion-small-neurons", "--set", f"train.seed={seed}"))
      for seed, suffix in ((0, ""), (1, "-s1"), (2, "-s2"))),
    *((f"finetune-vit-fashion-small{suffix}", "run",
       ("configs/finetune/vit_fashion_small.yaml", "--set", f"train.seed={seed}", "--set",
        f"model.init_from=runs/serene-vit-fashion-small-neurons{suffix}/last.pt"))
      for seed, suffix in ((0, ""), (1, "-s1"), (2, "-s2"))),
    *((f"serene-vit-fashion-small-neurons-lam4e-3{suffix}", "run",
       ("configs/serene/vit_fashion_small.yaml", "--set", "pruning.granularity=neurons",
        "--set", "serene.lam=4.0e-3", "--set", "name=serene-vit-fashion-small-neurons-lam4e-3",
        "--set", f"train.seed={seed}"))
      for seed, suffix in ((0, ""), (1, "-s1"), (2, "-s2"))),
    *((f"finetune-vit-fashion-small-lam4e-3{suffix}", "run",
       ("configs/finetune/vit_fashion_small.yaml", "--set", "name=finetune-vit-fashion-small-lam4e-3",
        "--set", f"train.seed={seed}", "--set",
        f"model.init_from=runs/serene-vit-fashion-small-neurons-lam4e-3{suffix}/last.pt"))
      for seed, suffix in ((0, ""), (1, "-s1"), (2, "-s2"))),
    ("lobster-vit-fashion-small", "run", ("configs/lobster/vit_fashion_small.yaml",)),
    # The same small ViT on MNIST (one seed).
    ("dense-vit-mnist-small", "run", ("configs/baselines/vit_fashion_small_dense.yaml", "--set",
                                      "data.name=mnist", "--set", "name=dense-vit-mnist-small")),
    ("lobster-vit-mnist-small", "run", ("configs/lobster/vit_fashion_small.yaml", "--set",
                                        "data.name=mnist", "--set", "name=lobster-vit-mnist-small")),
    ("serene-vit-mnist-small-neurons-lam4e-3", "run",
     ("configs/serene/vit_fashion_small.yaml", "--set", "data.name=mnist", "--set",
      "name=serene-vit-mnist-small-neurons-lam4e-3", "--set", "pruning.granularity=neurons",
      "--set", "serene.lam=4.0e-3")),
    ("finetune-vit-mnist-small-lam4e-3", "run",
     ("configs/finetune/vit_fashion_small.yaml", "--set", "data.name=mnist", "--set",
      "name=finetune-vit-mnist-small-lam4e-3", "--set",
      "model.init_from=runs/serene-vit-mnist-small-neurons-lam4e-3/last.pt")),
    ("neq-vit-fashion-small", "run", ("configs/neq/vit_fashion_small.yaml",)),
    ("study-lenet5-mnist", "study", ("configs/study/oneshot_vs_gradual_lenet5_mnist.yaml",)),
    ("study-lenet5-fashion", "study", ("configs/study/oneshot_vs_gradual_lenet5_fashion.yaml",)),
    ("study-lenet5-fashion-seed1", "study",
     ("configs/study/oneshot_vs_gradual_lenet5_fashion.yaml", "--set", "base.train.seed=1")),
    # Budget-matched multi-seed comparisons: runs and records always in docs/results (issue 19).
    ("compare-lenet300-mnist", "compare", ("configs/compare/lenet300_mnist.yaml",)),
    ("compare-lenet300-mnist-lobster-search", "compare",
     ("configs/compare/lenet300_mnist_lobster_search.yaml",)),
    ("compare-lenet5-mnist", "compare", ("configs/compare/lenet5_mnist.yaml",)),
    ("compare-lenet5-fashion", "compare", ("configs/compare/lenet5_fashion.yaml",)),
    ("compare-lenet300-mnist-structured", "compare",
     ("configs/compare/lenet300_mnist_structured.yaml",)),
    ("compare-lenet5-fashion-structured", "compare",
     ("configs/compare/lenet5_fashion_structured.yaml",)),
    ("compare-lenet5-fashion-neq", "compare", ("configs/compare/lenet5_fashion_neq.yaml",)),
    # Benchmarks: (script, output file under docs/results, script arguments).
    ("bench-lobster-overhead", "bench", ("benchmarks/lobster_overhead.py", "lobster_overhead.txt",
                                         "--rounds", "30")),
    ("bench-memory-format", "bench", ("benchmarks/memory_format.py", "memory_format.txt",
                                      "--models", "lenet5", "resnet20", "--rounds", "15",
                                      "--threads", "1")),
    ("bench-neq-backward", "bench", ("benchmarks/neq_backward.py", "neq_backward.txt", "--threads",
                                     "1", "--batch", "32", "100", "--rounds", "30", "--layers")),
    ("bench-neq-backward-channels-last", "bench",
     ("benchmarks/neq_backward.py", "neq_backward_channels_last.txt", "--models", "lenet5",
      "--batch", "32", "100", "--rounds", "20", "--channels-last")),
    ("bench-simplify-latency", "bench", ("benchmarks/simplify_latency.py", "simplify_latency.txt",
                                         "--threads", "1")),
    ("bench-data-path", "bench", ("benchmarks/data_path.py", "data_path.txt", "--max-batches",
                                  "200", "--repeats", "3", "--threads", "1")),
    _vit_latency("bench-vit-serene-latency", "vit_serene_latency.txt", "serene-vit-fashion-small"),
    _vit_latency("bench-vit-serene-latency-s1", "vit_serene_latency_s1.txt", "serene-vit-fashion-small-s1"),
    _vit_latency("bench-vit-serene-latency-s2", "vit_serene_latency_s2.txt", "serene-vit-fashion-small-s2"),
    _vit_latency("bench-vit-lobster-latency", "vit_lobster_latency.txt", "lobster-vit-fashion-small"),
    ("bench-vit-torch-pruning", "bench",
     ("benchmarks/vit_torch_pruning.py", "vit_torch_pruning.txt", "--dense-run",
      "runs/dense-vit-fashion-small", "--serene-run", "runs/serene-vit-fashion-small",
      "--serene-run", "runs/serene-vit-fashion-small-s1", "--serene-run",
      "runs/serene-vit-fashion-small-s2")),
    _vit_latency("bench-vit-mnist-lobster-latency", "vit_mnist_lobster_latency.txt", "lobster-vit-mnist-small"),
    _vit_latency("bench-vit-mnist-finetune-latency", "vit_mnist_finetune_lam4e-3_latency.txt", "finetune-vit-mnist-small-lam4e-3"),
    # The fine-tuned ViTs of both λ recipes (λ 2e-3: no infix; λ 4e-3: "-lam4e-3"), per seed.
    *(_vit_latency(f"bench-vit-finetune{recipe}-latency{suffix}",
                   f"vit_finetune{recipe.replace('-', '_', 1)}_latency{suffix.replace('-', '_')}.txt",
                   f"finetune-vit-fashion-small{recipe}{suffix}")
      for recipe in ("", "-lam4e-3") for suffix in ("", "-s1", "-s2")),
    *((f"bench-vit-torch-pruning-finetune{recipe}{suffix}", "bench",
       ("benchmarks/vit_torch_pruning.py",
        f"vit_torch_pruning_finetune{recipe.replace('-', '_', 1)}{suffix.replace('-', '_')}.txt",
        "--dense-run", f"runs/dense-vit-fashion-small{suffix}",
        *(arg for run in ("", "-s1", "-s2")
          for arg in ("--serene-run", f"runs/finetune-vit-fashion-small{recipe}{run}")),
        "--levels", "0.5:0.9", "0.75:0.9", "0.75:0.97", "0.75:0.99", "--epochs", "10",
        "--lr", "0.01", "--seed", str(seed), "--cache", f"runs/bench/vit-tp-ft10{suffix or '-s0'}"))
      for recipe in ("", "-lam4e-3") for seed, suffix in ((0, ""), (1, "-s1"), (2, "-s2"))),
    ("bench-structured-baselines", "bench",
     ("benchmarks/structured_baselines.py", "structured_baselines.txt",
      "--serene-run", "runs/serene-lenet300-mnist-fast", "--dense-run", "runs/dense-lenet300-mnist")),
    ("bench-sparse-deploy", "bench", ("benchmarks/sparse_deploy.py", "sparse_deploy.txt",
                                      "--lenet300", "runs/lobster-lenet300-mnist-fast",
                                      "--repeats", "100", "--runs", "3", "--clock", "cpu",
                                      "--no-controls")),
    ("bench-sparse-deploy-lenet5", "bench", ("benchmarks/sparse_deploy.py", "sparse_deploy_lenet5.txt",
                                             "--lenet5", "runs/lobster-lenet5-fashion-deploy",
                                             "--repeats", "100", "--runs", "2", "--clock", "cpu",
                                             "--no-controls")),
    ("bench-sparse-deploy-synthetic", "bench",
     ("benchmarks/sparse_deploy.py", "sparse_deploy_synthetic.txt", "--repeats", "100", "--runs",
      "2", "--clock", "cpu")),
    ("bench-sparse-deploy-synthetic-wall", "bench",
     ("benchmarks/sparse_deploy.py", "sparse_deploy_synthetic_wall.txt", "--repeats", "100",
      "--runs", "2")),
    ("bench-simplify-vs-torch-pruning", "bench",
     ("benchmarks/simplify_vs_torch_pruning.py", "simplify_vs_torch_pruning.txt", "--repeats", "3")),
    ("bench-simplify-vs-torch-pruning-removed", "bench",
     ("benchmarks/simplify_vs_torch_pruning.py", "simplify_vs_torch_pruning_removed.txt",
      "--removed-only", "--size", "64")),
    ("bench-vit-simplify-latency", "bench",
     ("benchmarks/vit_simplify_latency.py", "vit_simplify_latency.txt", "--dead-heads", "0.5",
      "--dead-units", "0.7", "--clock", "cpu", "--repeats", "30")),
    ("bench-vit-simplify-latency-75-90", "bench",
     ("benchmarks/vit_simplify_latency.py", "vit_simplify_latency_75_90.txt", "--dead-heads",
      "0.75", "--dead-units", "0.9", "--clock", "cpu", "--repeats", "30")),
    ("bench-crash-resume", "bench", ("benchmarks/crash_resume.py", "crash_resume.txt", "-n", "10")),
    ("bench-crash-resume-early", "bench", ("benchmarks/crash_resume.py", "crash_resume_early.txt",
                                           "-n", "5", "--kills", "4", "--early")),
    ("bench-ddp-scaling", "bench", ("benchmarks/ddp_scaling.py", "ddp_scaling.txt", "--models",
                                    "lenet5", "resnet20", "--steps", "20")),
)
RESULTS = Path("docs/results")  # comparison records and benchmark outputs


def _relocated(arg: str, runs: Path) -> str:
    """``arg`` with a path under ``runs/`` (alone or as ``KEY=runs/...``) moved under ``runs``."""
    key, equals, value = arg.rpartition("=")
    return f"{key}{equals}{runs / value[len('runs/'):]}" if value.startswith("runs/") else arg


def _init_from(config: str, args: tuple[str, ...]) -> str:
    """The ``model.init_from`` a run step reads: its config's, or the last ``--set`` of it."""
    init = (read_yaml(config).get("model") or {}).get("init_from") or ""
    for flag, value in itertools.pairwise(args):
        if flag == "--set" and value.startswith("model.init_from="):
            init = value.partition("=")[2]
    return init


def command(name: str, kind: str, args: tuple[str, ...], runs: Path, threads: int | None) -> list[str]:
    """The subprocess command line of one step; paths under ``runs/`` in it move under ``runs``."""
    cli = [sys.executable, "-m", "neuronwise"]
    directory = runs / name
    threads_set = ["--set", f"train.threads={threads}"] if threads else []
    if kind == "run":
        resume = ["--resume"] if (directory / "config.yaml").exists() else []
        init = _init_from(args[0], ())  # the config's; a --set of it moves with the arguments
        moved = _relocated(init, runs)
        overridden = any(a.startswith("model.init_from=") for a in args[1:])
        init_set = ["--set", f"model.init_from={moved}"] if moved != init and not overridden else []
        return [*cli, "run", args[0], "--run-dir", str(directory), *resume,
                *(_relocated(a, runs) for a in args[1:]), *init_set, *threads_set]
    if kind == "study":
        threads_set = ["--set", f"base.train.threads={threads}"] if threads else []
        return [*cli, "study", args[0], "--study-dir", str(directory), *args[1:], *threads_set]
    if kind == "simplify":
        return [*cli, "simplify", str(directory), "--export", str(directory / "simplified.onnx")]
    if kind == "script":
        return [sys.executable, args[0], *(_relocated(a, runs) for a in args[1:]), "--out",
                str(directory), *threads_set]
    if kind == "compare":
        return [*cli, "compare", args[0], *(["--threads", str(threads)] if threads else [])]
    if kind == "bench":  # one thread, stdout kept as docs/results/OUTPUT once the script succeeds
        out = RESULTS / args[1]
        script = " ".join(shlex.quote(a) for a in (sys.executable, args[0],
                                                    *(_relocated(a, runs) for a in args[2:])))
        return ["sh", "-c", f"OMP_NUM_THREADS=1 {script} > {out}.part && mv {out}.part {out}"]
    raise ValueError(f"Invalid step kind: {kind!r}")


def state(name: str, kind: str, runs: Path, args: tuple[str, ...] = ()) -> str:
    """'done', 'epoch E of N', 'K of N runs done', 'started' or 'not started', read from the run
    directory (a benchmark: its output file; a comparison: its runs)."""
    directory = runs / name
    if kind == "simplify":  # the records keep simplify.json, not the ONNX file
        done = (directory / "simplified.onnx").exists() or (directory / "simplify.json").exists()
        return "done" if done else "not started"
    if kind == "bench":
        return "done" if (RESULTS / args[1]).exists() else "not started"
    if kind == "compare":
        return _compare_state(args[0], runs)
    if not directory.exists():
        return "not started"
    if kind == "study":  # the report is written last (the records keep study.json beside it)
        done = (directory / "study.md").exists() or (directory / "study.json").exists()
        return "done" if done else "started"
    metrics, config = directory / "metrics.jsonl", directory / "config.yaml"
    if kind == "script":  # done when each of its runs is
        runs_of = [p.name for p in sorted(directory.iterdir()) if (p / "config.yaml").exists()]
        done = runs_of and all(state(n, "run", directory) == "done" for n in runs_of)
        return f"done ({len(runs_of)} runs)" if done else "started"
    if kind != "run" or not metrics.exists() or not config.exists():
        return "started"
    lines = metrics.read_text().splitlines()
    epoch = json.loads(lines[-1])["epoch"] if lines else 0
    wanted = read_yaml(config)["train"]["epochs"]
    return "done" if epoch >= wanted else f"epoch {epoch} of {wanted}"


def _compare_state(config: str, runs: Path) -> str:
    from neuronwise.experiment.compare import load_comparison, run_name

    comparison = load_comparison(config)
    names = [run_name(comparison, m, s) for s in comparison.seeds for m in comparison.methods]
    states = [state(n, "run", runs) for n in names]
    if all(s == "not started" for s in states):
        return "not started"
    done = states.count("done")
    return "done" if done == len(names) else f"{done} of {len(names)} runs done"


def needs(step: tuple[str, str, tuple[str, ...]], names: set[str]) -> set[str]:
    """The names among ``names`` of the steps that must finish before ``step`` starts."""
    name, kind, args = step
    if kind == "simplify":
        return {name} & names
    if kind == "bench":  # the runs its arguments read
        return {Path(a).parts[1] for a in args if a.startswith("runs/")} & names
    if kind != "run":
        return set()
    parts = Path(_init_from(args[0], args[1:])).parts
    return {parts[1]} & names if len(parts) > 2 and parts[0] == "runs" else set()


def _shown(line: list[str]) -> str:
    if line[:2] == ["sh", "-c"]:
        return "$ " + line[2]
    shown = ["neuronwise", *line[3:]] if line[1:3] == ["-m", "neuronwise"] else ["python", *line[1:]]
    return "$ " + " ".join(shown)


def _run_parallel(steps: list, args: argparse.Namespace, environment: dict) -> int:
    """Run ``steps`` ``args.jobs`` at a time in STEPS order as their needs allow; each logs to a file."""
    names = {name for name, _, _ in steps}
    waiting = list(range(len(steps)))
    # A step waits for the earlier runs it needs (a simplify for its run, a run for its init_from).
    blockers = {i: {j for j in range(i) if steps[j][1] == "run"
                    and steps[j][0] in needs(steps[i], names)} for i in waiting}
    running: dict[int, subprocess.Popen] = {}
    finished: set[int] = set()
    failure = 0
    args.runs.mkdir(parents=True, exist_ok=True)
    while waiting or running:
        while not failure and len(running) < args.jobs:
            ready = [i for i in waiting if blockers[i] <= finished]
            if not ready:
                break
            index = ready[0]
            waiting.remove(index)
            name, kind, step_args = steps[index]
            line = command(name, kind, step_args, args.runs, args.threads)
            log = args.runs / (f"{name}.log" if kind != "simplify" else f"{name}.simplify.log")
            print(f"{_shown(line)}   (log: {log})", flush=True)
            with open(log, "a", encoding="utf-8") as handle:
                running[index] = subprocess.Popen(line, env=environment, stdout=handle,
                                                  stderr=subprocess.STDOUT)
        if failure and not running:
            break
        time.sleep(0.2)
        for index, process in list(running.items()):
            status = process.poll()
            if status is None:
                continue
            del running[index]
            name, kind, _ = steps[index]
            if status == 0:
                finished.add(index)
                print(f"done: {name} ({kind})", flush=True)
            else:
                print(f"reproduce: step {name} ({kind}) failed with exit status {status}",
                      file=sys.stderr)
                failure = failure or status
    return failure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder of run directories")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="only steps whose name contains TEXT (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="--set train.threads=N")
    parser.add_argument("--data-root", help="data folder (default: $NEURONWISE_DATA)")
    parser.add_argument("--records", type=Path, default=RESULTS / "runs",
                        help="the quoted records --list reads (default: docs/results/runs)")
    parser.add_argument("--list", action="store_true",
                        help="list the steps and the state of their records")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--jobs", type=int, default=1,
                        help="steps run at the same time, each logging to RUNS/NAME.log")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs: expected >= 1, got {args.jobs}")
    steps = [s for s in STEPS if not args.only or any(text in s[0] for text in args.only)]
    if not steps:
        print(f"reproduce: no step matches {args.only}", file=sys.stderr)
        return 2
    environment = dict(os.environ)
    if args.data_root:
        environment["NEURONWISE_DATA"] = args.data_root
    if args.jobs > 1 and not (args.list or args.dry_run):
        return _run_parallel(steps, args, environment)
    width = max(len(name) for name, _, _ in steps)
    for name, kind, step_args in steps:
        if args.list:
            print(f"{name:<{width}} {kind:<9} {state(name, kind, args.records, step_args)}")
            continue
        line = command(name, kind, step_args, args.runs, args.threads)
        print(_shown(line), flush=True)
        if args.dry_run:
            continue
        status = subprocess.call(line, env=environment)
        if status != 0:
            print(f"reproduce: step {name} ({kind}) failed with exit status {status}", file=sys.stderr)
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
