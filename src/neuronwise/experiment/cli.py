"""The ``neuronwise`` command line (also ``python -m neuronwise``).

A user mistake (bad config, missing data, unusable run directory) prints one line
``neuronwise: error: ...`` and exits with code 2; set ``NEURONWISE_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from importlib import resources
from pathlib import Path

EXIT_USAGE = 2
EXIT_FAILED = 1


def quickstart_config_path() -> Path:
    return Path(str(resources.files("neuronwise.experiment") / "quickstart.yaml"))


def _default_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _train(config_path: Path | None, args: argparse.Namespace) -> int:
    from neuronwise import distributed

    from .distributed_setup import distributed_session, run_on_main
    from .trainer import Trainer

    overrides = list(args.set or [])
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.resume and not args.run_dir:
        raise ValueError("--resume needs --run-dir (the run directory to continue)")
    with distributed_session():
        # Rank 0 reads the files (a resumed run's record too) and sends the config.
        config = run_on_main(lambda: _config_of_run(config_path, overrides, args))
        run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(config.name)
        trainer = Trainer(config, str(run_dir), resume=args.resume)
        history = trainer.fit()
        if distributed.is_main_process():
            _print_outcome(trainer, history)
    return 0


def _config_of_run(config_path: Path | None, overrides: list[str], args: argparse.Namespace):
    from .resume import load_config, resume_config
    from .rundir import RunDir

    if args.resume:
        return resume_config(RunDir(args.run_dir), config_path, overrides,
                             log=lambda line: print(line, flush=True),
                             compare=args.command == "run")
    if config_path is None:
        raise ValueError("run: CONFIG is needed to start a run (only --resume continues a run "
                         "without it, from its recorded config.yaml)")
    return load_config(config_path, overrides)


def _print_outcome(trainer, history: list[dict]) -> None:
    path = trainer.run.path
    if trainer.epoch == trainer.start_epoch:
        if trainer.epoch == 0:
            print(f"nothing trained: train.epochs is 0 (data, model and method were set up); "
                  f"run directory: {path}")
        else:
            print(f"nothing to do: the run in {path} has already finished its {trainer.epoch} "
                  f"epochs (--resume --set train.epochs=N with N > {trainer.epoch} trains on)")
        return
    last = history[-1]
    print(
        f"done: test accuracy {last['test_accuracy']:.2f}%, "
        f"remaining parameters {last['remaining_percent_paper']:.2f}% "
        f"({last['nonzero_paper']:,} of {last['params_paper']:,}, 'paper' convention), "
        f"neurons {last['neurons_alive']}/{last['neurons_total']}\n"
        f"run directory: {path}  (report: neuronwise report {path})"
    )


def cmd_run(args: argparse.Namespace) -> int:
    return _train(Path(args.config) if args.config else None, args)


def cmd_quickstart(args: argparse.Namespace) -> int:
    return _train(quickstart_config_path(), args)


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(args.run_dir)
    print(f"report written: {path}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from neuronwise import data

    root = data.resolve_root(args.data_root)
    print(f"data root: {root}")
    for row in data.status(root):
        print(row)
    return 0


def cmd_simplify(args: argparse.Namespace) -> int:
    from .tools import explain_run, simplify_run

    print(simplify_run(args.run_dir, export=args.export, checkpoint=args.checkpoint))
    if args.explain:
        print(explain_run(args.run_dir, checkpoint=args.checkpoint))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from .deployment import deploy_run

    print(deploy_run(args.run_dir, batch_size=args.batch_size, export=args.export,
                     checkpoint=args.checkpoint))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze_run

    layers = [n for n in args.layers.split(",") if n] if args.layers else None
    print(analyze_run(args.run_dir, entropy=args.entropy, sharpness=args.sharpness,
                      checkpoint=args.checkpoint, data_root=args.data_root, layers=layers,
                      limit=args.limit, draws=args.draws, seed=args.seed))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from .study import load_study, run_study

    overrides = list(args.set or [])
    if args.data_root:
        overrides.append(f"base.data.root={args.data_root}")
    study = load_study(args.config, overrides)
    study_dir = Path(args.study_dir) if args.study_dir else Path("runs") / study.name
    command = " ".join(["neuronwise", "study", str(args.config), "--study-dir", str(study_dir)]
                       + [f"--set {o}" for o in overrides])
    print(f"report written: {run_study(study, study_dir, command=command)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import load_comparison, run_all
    from .compare_report import check_csv, refresh_quotes, write_records

    comparison = load_comparison(args.config, list(args.set or []))
    runs, results = Path(args.runs), Path(args.results)
    if not args.records_only:
        extra = [f"train.threads={args.threads}"] if args.threads else []
        if args.data_root:
            extra.append(f"data.root={args.data_root}")
        run_all(comparison, runs, extra, only=args.only)
    from .compare_latency import measure_missing

    measure_missing(comparison, runs)  # with latency: set, finished runs not yet measured
    if comparison.kind == "training":  # nothing pruned: no targets
        from .compare_training import write_records
    section, notes = write_records(comparison, runs, results)
    refresh_quotes(results.parent / "RESULTS.md")  # docs/RESULTS.md quotes the generated tables
    for method, waiting in notes.items():
        if waiting:
            print(f"compare: {method}: not finished: {', '.join(waiting)}")
    problems = check_csv(results / "comparisons.csv", runs)
    for problem in problems:
        print(f"compare: check: {problem}", file=sys.stderr)
    print(f"records written: {results / 'comparisons.csv'}, {section}")
    return EXIT_FAILED if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuronwise",
        description="Train sparse and efficient networks: LOBSTER, SeReNe, NEq, PSP-entropy.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def training_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--run-dir", help="run directory (default: runs/NAME-TIMESTAMP)")
        p.add_argument("--resume", action="store_true",
                       help="continue the run in --run-dir from its last checkpoint, as recorded "
                            "there (only --set values change it); starts it if there is none")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=5 (repeatable)")
        p.add_argument("--data-root", help="data folder (default: $NEURONWISE_DATA, else the cache)")

    run = commands.add_parser("run", help="train from a YAML config")
    run.add_argument("config", nargs="?",
                     help="YAML config, e.g. configs/lobster/lenet300_mnist.yaml (optional with "
                          "--resume: the run continues as recorded in --run-dir)")
    training_flags(run)
    run.set_defaults(func=cmd_run)

    quick = commands.add_parser("quickstart",
                                help="LOBSTER on the embedded digits data (no download, < 1 min)")
    training_flags(quick)
    quick.set_defaults(func=cmd_quickstart)

    report = commands.add_parser("report", help="markdown + HTML report with plots of a run")
    report.add_argument("run_dir", help="run directory holding metrics.jsonl")
    report.set_defaults(func=cmd_report)

    datasets = commands.add_parser("datasets", help="what the data root holds, checksums verified")
    datasets.add_argument("--data-root")
    datasets.set_defaults(func=cmd_datasets)

    simplify = commands.add_parser("simplify",
                                   help="remove dead neurons of a run's model; measure; export")
    simplify.add_argument("run_dir", help="run directory holding config.yaml and last.pt")
    simplify.add_argument("--export", metavar="FILE.onnx", help="also export to ONNX")
    simplify.add_argument("--checkpoint", default="last", choices=["last", "best"])
    simplify.add_argument("--explain", action="store_true",
                          help="list the dead neurons kept, per layer, and the node that blocked them")
    simplify.set_defaults(func=cmd_simplify)

    deploy = commands.add_parser(
        "deploy", help="simplify, then time dense vs sparse (CSR) kernels per layer; measure")
    deploy.add_argument("run_dir", help="run directory holding config.yaml and last.pt")
    deploy.add_argument("--batch-size", type=int, default=32, help="batch size to optimise for")
    deploy.add_argument("--export", metavar="DIR",
                        help="write deployed.pt and deploy.json here (default: the run directory)")
    deploy.add_argument("--checkpoint", default="last", choices=["last", "best"])
    deploy.set_defaults(func=cmd_deploy)

    analyze = commands.add_parser("analyze", help="PSP-entropy / sharpness analysis of a run")
    analyze.add_argument("run_dir", help="run directory holding config.yaml and last.pt")
    analyze.add_argument("--entropy", action="store_true", help="PSP-entropy per layer")
    analyze.add_argument("--sharpness", action="store_true", help="loss increase under noise")
    analyze.add_argument("--checkpoint", default="last", choices=["last", "best"])
    analyze.add_argument("--data-root")
    analyze.add_argument("--layers", metavar="NAME[,NAME]",
                         help="Linear/Conv2d modules for the entropy (default: all)")
    analyze.add_argument("--limit", type=int, metavar="N", help="use the first N test samples")
    analyze.add_argument("--draws", type=int, default=10, help="noise draws per sharpness σ")
    analyze.add_argument("--seed", type=int, default=0, help="seed of the noise and directions")
    analyze.set_defaults(func=cmd_analyze)

    study = commands.add_parser(
        "study", help="one-shot vs gradual pruning from one dense model, analysed side by side")
    study.add_argument("config", help="study YAML, e.g. configs/study/oneshot_vs_gradual_"
                                      "lenet300_mnist.yaml")
    study.add_argument("--study-dir", help="study directory (default: runs/NAME); rerunning the "
                                           "command resumes it")
    study.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a study value, e.g. --set budget_epochs=50 (repeatable)")
    study.add_argument("--data-root", help="data folder (default: $NEURONWISE_DATA, else the cache)")
    study.set_defaults(func=cmd_study)

    compare = commands.add_parser(
        "compare", help="methods x seeds at one epoch budget; mean ± std tables, CSV and plots")
    compare.add_argument("config", help="comparison YAML, e.g. configs/compare/lenet300_mnist.yaml")
    compare.add_argument("--runs", default="docs/results/runs",
                         help="folder of the run directories (default: docs/results/runs); "
                              "existing runs are resumed")
    compare.add_argument("--results", default="docs/results",
                         help="where comparisons.csv and comparisons/NAME.md go (default: "
                              "docs/results)")
    compare.add_argument("--threads", type=int, help="train.threads of every run")
    compare.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="override a comparison value, e.g. --set epochs=3 (repeatable)")
    compare.add_argument("--only", action="append", metavar="METHOD",
                         help="train only this method's runs (repeatable), e.g. to share a "
                              "comparison among processes; the records cover every method")
    compare.add_argument("--records-only", action="store_true",
                         help="train nothing: rewrite the records from the runs as they are")
    compare.add_argument("--data-root", help="data folder (default: $NEURONWISE_DATA, else the cache)")
    compare.set_defaults(func=cmd_compare)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # One line, like errors: e.g. an unreadable last.pt and the fallback to previous.pt.
    print(f"neuronwise: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .trainer import NonFiniteLossError

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            # Library deprecation notices (torch internals) are for developers, not CLI users.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return args.func(args)
    except NonFiniteLossError as error:
        print(f"neuronwise: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except ModuleNotFoundError as error:  # an optional extra that is not installed
        from neuronwise.extras import MissingExtraError, missing_extra

        if not isinstance(error, MissingExtraError):
            error = missing_extra(error, f"neuronwise {args.command}")
        if not isinstance(error, MissingExtraError) or os.environ.get("NEURONWISE_DEBUG"):
            raise
        print(f"neuronwise: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, OSError) as error:
        if os.environ.get("NEURONWISE_DEBUG"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"neuronwise: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("neuronwise: interrupted; resume with --resume", file=sys.stderr)
        return 130
