"""Budget-matched, multi-seed comparisons of pruning methods (``neuronwise compare CONFIG``).

A comparison YAML names the methods (each an experiment config file plus ``--set`` overrides),
the seeds, one epoch budget for every run and the target remaining percentages::

    name: lenet300-mnist
    epochs: 100              # every run of every method trains exactly this many epochs
    seeds: [0, 1, 2]
    candidates: 5            # candidate epochs per (run, target)
    targets: [20, 10, 5]     # remaining parameters, % ('paper' convention)
    methods:
      lobster: {config: configs/lobster/lenet300_mnist_fast.yaml, set: [pruning.patience=2]}
      oneshot: {config: ..., set: [...], targets: [3]}   # optional: this method's own targets

Run ``<name>-<method>-s<seed>`` trains ``config`` with ``set``, then ``name=RUN``,
``train.seed=SEED``, ``train.epochs=EPOCHS`` applied (later wins); an existing run directory is
resumed, a finished one is left as it is.

Selection rule (validation only, the same number of candidates for every method): for a target T
the candidate epochs of a run are the first ``candidates`` epochs e with r(e) ≤ T and
r(e) = r(e−1), where r(e) is the remaining percentage on line e of metrics.jsonl (r(0) = 100). The
second condition keeps only epochs that pruned nothing at their end: a line's accuracies are
measured before the epoch's pruning step and its parameter count after it, so only then do both
describe the same model. The candidate with the highest validation accuracy (earliest on a tie) is
the run's result at T; a run with fewer candidates has none (T not reached within the budget).

Optional ``time_to_target: [R, E]``: per run, the first such epoch with r(e) ≤ R and test error
≤ E (:func:`first_epoch_at`), reported as epochs to the target.

Optional ``latency: {batch: B, repeats: R}`` (structured methods): the selection table gains the
alive neurons of the selected epochs, and each finished run's final model is simplified and its CPU
latency measured against the dense architecture (:mod:`.compare_latency`), reported with the final
test error and plotted as error vs latency.

``kind: training`` compares methods that prune nothing (NEq and its baselines against dense
training): no ``targets``; a run's result is the best-validation epoch among its last
``candidates`` epochs (:func:`select_last`). Optional ``time_to_reference: {method: M, margin: D}``
measures, per run, the first epoch whose test accuracy is at least the mean test accuracy of M's
results minus D points, in epochs and in cumulative training time, the probe pass of NEq included
(module :mod:`.compare_training`). A method with ``match_frozen: M`` (NEq's random / top-k
baselines) trains, in each epoch, the share of neurons that M's run of the same seed trained then
(``neq.trained_fractions``, :func:`_matched`); it waits until that run has finished.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as config_module
from .config import Config, ConfigError
from .rundir import RunDir

REMAINING = "remaining_percent_paper"
LATENCY_KEYS = ("batch", "repeats")
KINDS = ("pruning", "training")


@dataclass
class MethodSpec:
    config: str  # experiment config file of the method
    set: list = field(default_factory=list)  # KEY=VALUE overrides applied to it
    targets: list | None = None  # this method's targets (default: the comparison's)
    match_frozen: str | None = None  # NEq baselines: the method whose frozen share per epoch to copy


@dataclass
class Comparison:
    name: str
    epochs: int
    seeds: list
    candidates: int
    targets: list
    methods: dict  # method name -> MethodSpec
    time_to_target: list | None = None  # [remaining %, test error %]: first epoch meeting both
    latency: dict | None = None  # {batch, repeats}: time each run's simplified final model
    kind: str = "pruning"  # "training": no targets, the last `candidates` epochs (select_last)
    time_to_reference: dict | None = None  # training: {method, margin}: epochs/time to its accuracy


@dataclass
class Selection:
    """One run's result at one target: the chosen line of its metrics.jsonl."""

    target: float | None  # None: a training comparison's (no target)
    epoch: int
    remaining_percent: float
    test_error_percent: float
    val_accuracy: float


def _field(data: dict, key: str, kind: type, source: str) -> Any:
    if key not in data:
        raise ConfigError(f"{source}: missing key '{key}'")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{source}: {key}: expected {kind.__name__}, got {value!r}")
    return value


def _numbers(values: Any, key: str, source: str) -> list[float]:
    if (not isinstance(values, list) or not values
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise ConfigError(f"{source}: {key}: expected a non-empty list of numbers, got {values!r}")
    return [float(v) for v in values]


def comparison_from_dict(data: dict, source: str = "comparison") -> Comparison:
    """Build and validate a :class:`Comparison`; every method's config is loaded (and so checked)."""
    known = {f.name for f in dataclasses.fields(Comparison)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    name = _field(data, "name", str, source)
    epochs = _field(data, "epochs", int, source)
    candidates = _field(data, "candidates", int, source)
    if epochs < 1 or candidates < 1:
        raise ConfigError(f"{source}: epochs and candidates: expected >= 1, got {epochs}, {candidates}")
    kind = data.get("kind", "pruning")
    if kind not in KINDS:
        raise ConfigError(f"{source}: kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    training = kind == "training"
    if training and candidates > epochs:
        raise ConfigError(f"{source}: candidates: expected <= epochs ({epochs}) with kind: "
                          f"training, got {candidates}")
    for key in ("targets", "time_to_target") if training else ("time_to_reference",):
        if key in data:
            raise ConfigError(f"{source}: {key}: not used with kind: {kind}")
    seeds = _field(data, "seeds", list, source)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{source}: seeds: expected a non-empty list of integers, got {seeds!r}")
    targets = [] if training else _numbers(data.get("targets"), "targets", source)
    methods_data = _field(data, "methods", dict, source)
    if not methods_data:
        raise ConfigError(f"{source}: methods: expected at least one method")
    methods = {}
    for method, spec in methods_data.items():
        where = f"{source}: methods.{method}"
        keys = {"config", "set", "targets", "match_frozen"}
        if not isinstance(spec, dict) or set(spec) - keys:
            raise ConfigError(f"{where}: expected a mapping with {', '.join(sorted(keys))}, "
                              f"got {spec!r}")
        match = spec.get("match_frozen")
        if match is not None and (match == method or match not in methods_data):
            raise ConfigError(f"{where}.match_frozen: expected another method of the comparison, "
                              f"got {match!r}")
        overrides = spec.get("set") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"{where}.set: expected a list of KEY=VALUE, got {overrides!r}")
        own = spec.get("targets")
        if training and own is not None:
            raise ConfigError(f"{where}.targets: not used with kind: training")
        methods[str(method)] = MethodSpec(
            config=_field(spec, "config", str, where), set=overrides,
            targets=None if own is None else _numbers(own, f"methods.{method}.targets", source),
            match_frozen=match)
    goal = data.get("time_to_target")
    if goal is not None and len(_numbers(goal, "time_to_target", source)) != 2:
        raise ConfigError(f"{source}: time_to_target: expected [remaining %, test error %], "
                          f"got {goal!r}")
    reference = data.get("time_to_reference")
    if reference is not None:
        where = f"{source}: time_to_reference"
        if not isinstance(reference, dict) or set(reference) != {"method", "margin"}:
            raise ConfigError(f"{where}: expected {{method: M, margin: D}}, got {reference!r}")
        if reference["method"] not in methods:
            raise ConfigError(f"{where}.method: expected one of {', '.join(methods)}, "
                              f"got {reference['method']!r}")
        margin = _numbers([reference["margin"]], "time_to_reference.margin", source)[0]
        reference = {"method": reference["method"], "margin": margin}
    comparison = Comparison(name, epochs, list(seeds), candidates, targets, methods,
                            None if goal is None else [float(v) for v in goal],
                            latency=check_latency(data.get("latency"), source), kind=kind,
                            time_to_reference=reference)
    for method in methods:
        run_config(comparison, method, seeds[0])
    return comparison


def check_latency(value: object, source: str) -> dict | None:
    """The validated ``latency:`` setting of a comparison (``None``: not measured)."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != set(LATENCY_KEYS) or not all(
            isinstance(value[k], int) and not isinstance(value[k], bool) and value[k] >= 1
            for k in LATENCY_KEYS):
        raise ConfigError(f"{source}: latency: expected {{batch: N, repeats: N}} with integers "
                          f">= 1, got {value!r}")
    return dict(value)


def load_comparison(path: str | Path, overrides: list[str] | None = None) -> Comparison:
    """Read a comparison YAML and apply ``KEY=VALUE`` overrides (e.g. ``epochs=3``)."""
    data = config_module.apply_overrides(config_module.read_yaml(path), overrides or [])
    return comparison_from_dict(data, source=str(path))


def run_name(comparison: Comparison, method: str, seed: int) -> str:
    return f"{comparison.name}-{method}-s{seed}"


def run_overrides(comparison: Comparison, method: str, seed: int) -> list[str]:
    """The ``--set`` list that turns the method's config into this run's."""
    spec = comparison.methods[method]
    return [*spec.set, f"name={run_name(comparison, method, seed)}", f"train.seed={seed}",
            f"train.epochs={comparison.epochs}"]


def run_config(comparison: Comparison, method: str, seed: int, extra: list[str] | None = None
               ) -> Config:
    spec = comparison.methods[method]
    return config_module.load(spec.config, run_overrides(comparison, method, seed) + (extra or []))


def targets_of(comparison: Comparison, method: str) -> list[float]:
    own = comparison.methods[method].targets
    return list(own) if own is not None else list(comparison.targets)


def select(history: list[dict], target: float, candidates: int) -> Selection | None:
    """The run's result at ``target`` by the module's selection rule, or None if not reached."""
    chosen: list[dict] = []
    previous = 100.0
    for line in sorted(history, key=lambda r: r["epoch"]):
        remaining = line[REMAINING]
        if remaining <= target and remaining == previous:
            chosen.append(line)
            if len(chosen) == candidates:
                break
        previous = remaining
    return _best(chosen, target, candidates)


def _best(chosen: list[dict], target: float | None, candidates: int) -> Selection | None:
    """The candidate line with the best validation accuracy (earliest on a tie); None if there
    are fewer than ``candidates``."""
    if len(chosen) < candidates:
        return None
    best = max(chosen, key=lambda r: (r["val_accuracy"], -r["epoch"]))
    return Selection(target=target, epoch=int(best["epoch"]), remaining_percent=best[REMAINING],
                     test_error_percent=100.0 - best["test_accuracy"],
                     val_accuracy=best["val_accuracy"])


def select_last(history: list[dict], epochs: int, candidates: int) -> Selection | None:
    """A training comparison's result: the best-validation line (earliest on a tie) among epochs
    ``epochs − candidates + 1`` … ``epochs``; None if the run has not all of them."""
    chosen = [line for line in history if epochs - candidates < line["epoch"] <= epochs]
    return _best(chosen, None, candidates)


def selections(comparison: Comparison, method: str, history: list[dict]) -> list[Selection]:
    """A finished run's results: one per target reached, or one for a training comparison."""
    if comparison.kind == "training":
        found = [select_last(history, comparison.epochs, comparison.candidates)]
    else:
        found = [select(history, t, comparison.candidates) for t in targets_of(comparison, method)]
    return [s for s in found if s is not None]


def first_epoch_at(history: list[dict], remaining: float, error: float) -> dict | None:
    """Time to target: the first line (of a model not pruned at that epoch's end, as in
    :func:`select`) with at most ``remaining`` % of the parameters and at most ``error`` % test
    error. A measurement of when a test-set criterion is first met, not a selection."""
    previous = 100.0
    for line in sorted(history, key=lambda r: r["epoch"]):
        left = line[REMAINING]
        if left <= remaining and left == previous and 100.0 - line["test_accuracy"] <= error:
            return line
        previous = left
    return None


def run_all(comparison: Comparison, runs: Path, extra: list[str] | None = None,
            log=print, only: list[str] | None = None) -> None:
    """Train every (seed, method) run in turn, resuming any that exists; one process, one run.
    ``only`` restricts training to those methods (e.g. to share the runs among processes)."""
    from .trainer import Trainer

    unknown = sorted(set(only or []) - set(comparison.methods))
    if unknown:
        raise ConfigError(f"--only {unknown[0]}: not a method of comparison '{comparison.name}' "
                          f"(methods: {', '.join(comparison.methods)})")
    for seed in comparison.seeds:
        for method in comparison.methods:
            if only and method not in only:
                continue
            name = run_name(comparison, method, seed)
            matched = _matched(comparison, method, seed, runs)
            if matched is None:
                log(f"compare: {name} waits for "
                    f"{run_name(comparison, comparison.methods[method].match_frozen, seed)} "
                    f"(not finished)")
                continue
            directory = runs / name
            resume = (directory / "config.yaml").exists()
            log(f"compare: {name} ({'resume' if resume else 'start'})")
            config = run_config(comparison, method, seed, matched + (extra or []))
            Trainer(config, str(directory), resume=resume).fit()


def _matched(comparison: Comparison, method: str, seed: int, runs: Path) -> list[str] | None:
    """``match_frozen: M``: the override ``neq.trained_fractions=[...]`` that trains, in each
    epoch e, the share 1 − frozen_percent(e) / 100 of M's finished run of this seed (the frozen set
    its line e describes was used during e); None while that run is unfinished. [] otherwise."""
    reference = comparison.methods[method].match_frozen
    if reference is None:
        return []
    directory = RunDir(runs / run_name(comparison, reference, seed))
    if not directory.metrics_path.is_file():
        return None
    history = sorted(directory.read_metrics(), key=lambda r: r["epoch"])
    if [r["epoch"] for r in history] != list(range(1, comparison.epochs + 1)):
        return None
    shares = [round(1.0 - r["frozen_percent"] / 100.0, 6) for r in history]
    return [f"neq.trained_fractions=[{', '.join(f'{p:g}' for p in shares)}]"]
