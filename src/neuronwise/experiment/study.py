"""``neuronwise study``: one-shot vs gradual pruning from one dense model (METHODS.md §6).

Stages, each an ordinary run directory inside the study directory, trained by :class:`Trainer`:

1. ``dense/``: the base config without pruning, ``dense_epochs`` epochs.
2. ``gradual/``: LOBSTER (regularizer + PruneOnPlateau, §1–2) from ``dense/last.pt`` for
   ``budget_epochs`` epochs; its final sparsity s over the LOBSTER tensor set P (all parameters of
   Linear, Conv2d, BatchNorm2d) is the study's target.
3. ``oneshot/``: from ``dense/last.pt``, global magnitude pruning of P to exactly s, then masked
   fine-tuning for ``budget_epochs`` epochs.
4. ``iterative/``: from ``dense/last.pt``, R = ``iterative_rounds`` global magnitude rounds of
   fraction f = 1 − (1 − s)^(1/R) every k = ⌊budget/(R + 1)⌋ epochs (reaching s after epoch R·k),
   masked fine-tuning in between and after, ``budget_epochs`` epochs in all.

A finished stage is skipped and an unfinished one resumed, so rerunning the command continues an
interrupted study. Every final model (``last.pt``) is then analysed on the test set — error,
sparsity, PSP-entropy per layer, sharpness (σ·rms(w) noise on surviving weights), loss along a
random direction and along the line to the dense model, and a linear probe on frozen features of
another dataset (transfer) — and the report is written: ``study.md``, ``study.json``, PNG plots.
Analyses are cached per stage (``STAGE/study_analysis.pt``) and redone when their settings change.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from neuronwise import data as nwdata
from neuronwise import metrics, pruning
from neuronwise.entropy import LayerEntropy
from neuronwise.io import atomic_torch_save, atomic_write_bytes, atomic_write_text
from neuronwise.sharpness import LandscapeSlice, landscape_slice

from .analysis import (
    _png,
    _pyplot,
    analyze_model,
    classwise_layer,
    classwise_png,
    entropy_histograms_png,
    entropy_summary,
    landscape_png,
    linear_probe,
    split_loader,
)
from .config import Config, ConfigError, apply_overrides, from_dict, read_yaml
from .rundir import RESUME_MAY_CHANGE, RunDir, RunDirError
from .tools import load_run_model
from .trainer import Trainer

__all__ = ["STAGES", "AnalysisSettings", "StudyConfig", "TransferSettings", "load_study",
           "run_study", "stage_config", "study_from_dict", "write_report"]

STAGES = ("dense", "gradual", "oneshot", "iterative")
ANALYSIS_FORMAT = 1


@dataclass
class AnalysisSettings:
    """How each final model is probed. ``limit``: test samples for the two weight-space probes
    (sharpness, landscape slices), which evaluate the loss once per σ·draw and per α; error and
    PSP-entropy always use the whole test set."""

    sigmas: list = field(default_factory=lambda: [0.01, 0.05, 0.1])
    draws: int = 10
    seed: int = 0
    landscape_points: int = 21
    limit: int | None = None


@dataclass
class TransferSettings:
    """Linear probe on frozen features (the classifier's input) of ``dataset``'s train split,
    accuracy on its test split; ``dataset: null`` skips the probe."""

    dataset: str | None = None
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 256
    limit_train: int | None = None
    seed: int = 0


@dataclass
class StudyConfig:
    """A study: ``base`` is an experiment config (as for ``neuronwise run``) shared by every
    stage; ``stages.NAME`` holds extra settings merged into ``base`` for that stage only."""

    name: str = "study"
    base: dict = field(default_factory=dict)
    dense_epochs: int = 10
    budget_epochs: int = 30
    iterative_rounds: int = 5
    stages: dict = field(default_factory=dict)
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    transfer: TransferSettings = field(default_factory=TransferSettings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The study decides these per stage; a base or stage setting for them would be silently lost.
_STUDY_KEYS = ("name", "method", "model.init_from", "train.epochs", "pruning.schedule",
               "pruning.sparsity", "pruning.fraction", "pruning.every", "pruning.start_epoch")


# -- config ------------------------------------------------------------------------------------
def _coerce(kind: Any, value: Any, key: str) -> Any:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None:
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, key)
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    expected = {int: (int,), float: (int, float), str: (str,), list: (list,), dict: (dict,)}[kind]
    if isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r} "
                          f"({type(value).__name__})")
    return float(value) if kind is float else value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'study'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(hints)}"
            raise ConfigError(f"unknown key '{dotted}' ({hint})")
        values[key] = _coerce(hints[key], value, dotted)
    return cls(**values)


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict) and key != "kwargs":
            keys += _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _check(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def study_from_dict(data: dict, source: str = "study") -> StudyConfig:
    """Build and validate a :class:`StudyConfig`, including every stage's experiment config, so
    that a mistake fails before any training; errors name ``source`` and the dotted key."""
    try:
        study = _build(StudyConfig, data or {}, "")
        _check(study.dense_epochs >= 1, "dense_epochs", study.dense_epochs, "an int >= 1")
        _check(study.iterative_rounds >= 1, "iterative_rounds", study.iterative_rounds,
               "an int >= 1")
        _check(study.budget_epochs >= study.iterative_rounds + 1, "budget_epochs",
               study.budget_epochs, f"an int >= iterative_rounds + 1 = "
               f"{study.iterative_rounds + 1} (each iterative round is followed by fine-tuning)")
        for stage, extra in study.stages.items():
            _check(stage in STAGES, f"stages.{stage}", stage, f"a stage name in {list(STAGES)}")
            _check(isinstance(extra, dict), f"stages.{stage}", extra, "a mapping")
        for where, tree in [("base", study.base)] + [(f"stages.{s}", e)
                                                     for s, e in study.stages.items()]:
            taken = [k for k in _flat_keys(tree) if k in _STUDY_KEYS]
            if taken:
                raise ConfigError(f"{where}.{taken[0]}: set per stage by the study (remove it; "
                                  f"the study sets {', '.join(_STUDY_KEYS)})")
        a = study.analysis
        _check(bool(a.sigmas) and all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                      and s > 0 for s in a.sigmas),
               "analysis.sigmas", a.sigmas, "a non-empty list of numbers > 0")
        _check(a.draws >= 1, "analysis.draws", a.draws, "an int >= 1")
        _check(a.landscape_points >= 2, "analysis.landscape_points", a.landscape_points,
               "an int >= 2")
        _check(a.limit is None or a.limit >= 1, "analysis.limit", a.limit, "null or an int >= 1")
        t = study.transfer
        _check(t.epochs >= 1, "transfer.epochs", t.epochs, "an int >= 1")
        _check(t.lr > 0, "transfer.lr", t.lr, "a number > 0")
        _check(t.batch_size >= 1, "transfer.batch_size", t.batch_size, "an int >= 1")
        _check(t.limit_train is None or t.limit_train >= 1, "transfer.limit_train",
               t.limit_train, "null or an int >= 1")
        configs = {s: stage_config(study, s, Path("STUDY"), sparsity=0.5) for s in STAGES}
        if t.dataset is not None:
            _check(t.dataset in nwdata.DATASETS, "transfer.dataset", t.dataset,
                   f"null or one of {sorted(nwdata.DATASETS)}")
            own = nwdata.DATASETS[configs["dense"].data.name]
            other = nwdata.DATASETS[t.dataset]
            shape = (own.in_channels, own.image_size)
            _check((other.in_channels, other.image_size) == shape, "transfer.dataset", t.dataset,
                   f"a dataset with the input shape of {own.name} ({shape[0]} channels, "
                   f"{shape[1]}x{shape[1]}), so that the pruned models read it")
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return study


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Load a study YAML, apply ``a.b=value`` overrides (e.g. ``base.data.root=...``), validate."""
    return study_from_dict(apply_overrides(read_yaml(path), overrides or []), source=str(path))


def _iterative_schedule(study: StudyConfig, sparsity: float) -> tuple[float, int]:
    rounds = study.iterative_rounds
    return 1.0 - (1.0 - sparsity) ** (1.0 / rounds), study.budget_epochs // (rounds + 1)


def stage_config(study: StudyConfig, stage: str, study_dir: str | Path,
                 sparsity: float | None = None) -> Config:
    """The experiment config of ``stage``: base, then ``stages.STAGE``, then the study's own
    settings; ``oneshot`` and ``iterative`` need the target ``sparsity``."""
    if stage not in STAGES:
        raise ValueError(f"Invalid stage: {stage!r} (expected one of {list(STAGES)})")
    dense = str((Path(study_dir) / "dense" / "last.pt").resolve())
    if stage == "dense":
        own = {"method": "none", "pruning": {"schedule": "none"},
               "train": {"epochs": study.dense_epochs}}
    elif stage == "gradual":
        own = {"method": "lobster", "pruning": {"schedule": "plateau"}}
    else:
        if sparsity is None:
            raise ValueError(f"stage {stage!r} needs the target sparsity (that gradual reached)")
        if stage == "oneshot":
            own = {"method": "none",
                   "pruning": {"schedule": "oneshot", "sparsity": sparsity, "start_epoch": 0}}
        else:
            fraction, every = _iterative_schedule(study, sparsity)
            own = {"method": "none", "pruning": {"schedule": "iterative", "sparsity": sparsity,
                                                 "fraction": fraction, "every": every}}
    if stage != "dense":
        own = _merge(own, {"model": {"init_from": dense},
                           "train": {"epochs": study.budget_epochs}})
    data = _merge(_merge(study.base, study.stages.get(stage, {})), own)
    data["name"] = f"{study.name}-{stage}"
    return from_dict(data, source=f"stage {stage}")


# -- stages ------------------------------------------------------------------------------------
def _check_study_dir(study: StudyConfig, study_dir: Path) -> None:
    """A study directory holds one study; analysis and transfer settings may change, and so may
    the ``base.train`` keys of :data:`RESUME_MAY_CHANGE` (how the machine computes, not what)."""
    path = study_dir / "study.yaml"
    if path.exists():
        stored = study_from_dict(read_yaml(path), source=str(path)).to_dict()
        wanted = study.to_dict()
        for config in (stored, wanted):
            config["base"] = {**config["base"], "train": {
                k: v for k, v in config["base"].get("train", {}).items()
                if k not in RESUME_MAY_CHANGE}}
        differing = sorted(k for k in set(stored) | set(wanted)
                           if k not in ("analysis", "transfer") and stored.get(k) != wanted.get(k))
        if differing:
            raise RunDirError(f"{study_dir}: study directory belongs to another study config "
                              f"(differs in {', '.join(differing)}); choose another --study-dir")
    atomic_write_text(path, yaml.safe_dump(study.to_dict(), sort_keys=False))


def _run_stage(stage: str, config: Config, study_dir: Path, log: Callable[[str], None]) -> None:
    run = RunDir(study_dir / stage)
    if run.holds_run() and not (run.last_path.exists() or run.previous_path.exists()):
        # Stopped before its first checkpoint: nothing to resume, so start it again (under the
        # lock, so that a live writer is never disturbed).
        run.acquire()
        try:
            for name in ("config.yaml", "run_info.json", "metrics.jsonl"):
                (run.path / name).unlink(missing_ok=True)
        finally:
            run.release()
    resume = run.holds_run()
    if resume:
        run.check_same_run(config)
        done = int(run.load_last()["epoch"])
        if done >= config.train.epochs:
            log(f"[{stage}] finished ({done} epochs): skipped")
            return
        log(f"[{stage}] resuming after epoch {done} of {config.train.epochs}")
    else:
        log(f"[{stage}] training {config.train.epochs} epochs in {run.path}")
    Trainer(config, str(run.path), resume=resume, log=lambda line: log(f"[{stage}] {line}")).fit()


def lobster_set_sparsity(model: torch.nn.Module) -> tuple[int, int]:
    """(zeros, total) over the LOBSTER tensor set P: all parameters of Linear, Conv2d, BN2d."""
    params = [p for _, p in pruning.prunable_parameters(model)]
    return (sum(int((p == 0).sum()) for p in params), sum(p.numel() for p in params))


# -- analysis ----------------------------------------------------------------------------------
def _analysis_key(study: StudyConfig, epoch: int) -> dict:
    return {"format": ANALYSIS_FORMAT, "epoch": epoch,
            "analysis": dataclasses.asdict(study.analysis),
            "transfer": dataclasses.asdict(study.transfer)}


def _analyze_stage(study: StudyConfig, stage: str, study_dir: Path, dense: torch.nn.Module | None,
                   log: Callable[[str], None]) -> dict:
    run = RunDir(study_dir / stage)
    key = _analysis_key(study, int(run.read_metrics()[-1]["epoch"]))
    cache = run.path / "study_analysis.pt"
    if cache.exists():
        record = torch.load(cache, map_location="cpu", weights_only=True)
        if record.get("key") == key:
            return record
    log(f"[{stage}] analysing the final model")
    config, model, _ = load_run_model(run.path)
    a = study.analysis
    test = split_loader(config, "test")
    probe = split_loader(config, "test", limit=a.limit) if a.limit else test
    result = analyze_model(model, test, entropy=True, sharpness=True, sigmas=a.sigmas,
                           draws=a.draws, seed=a.seed, landscape_points=a.landscape_points,
                           sharpness_loader=probe)
    zeros, total = lobster_set_sparsity(model)
    neurons = metrics.count_neurons(model)["total"]
    record: dict = {
        "key": key, "stage": stage, "summary": result.summary(),
        "sparsity": zeros / total, "zeros": zeros, "total": total,
        "remaining_percent_paper": metrics.sparsity_report(model, "paper")["remaining_percent"],
        "neurons_alive": neurons[0], "neurons_total": neurons[1],
        "entropy": {n: {"per_unit": e.per_unit, "per_class": e.per_class, "p_on": e.p_on,
                        "class_counts": e.class_counts, "unit_shape": list(e.unit_shape)}
                    for n, e in result.entropy.items()},
        "classwise_layer": classwise_layer(model, result.entropy),
        "landscape": {"alphas": result.landscape.alphas, "losses": result.landscape.losses},
        "to_dense": None, "transfer": None,
    }
    if dense is not None:
        path = landscape_slice(model, probe, direction=dense, seed=a.seed, alphas=torch.linspace(
            -0.5, 1.5, a.landscape_points, dtype=torch.float64))
        record["to_dense"] = {"alphas": path.alphas, "losses": path.losses}
    t = study.transfer
    if t.dataset is not None:
        probe_train = split_loader(config, "train", limit=t.limit_train, dataset=t.dataset)
        probe_test = split_loader(config, "test", dataset=t.dataset)
        outcome = linear_probe(model, probe_train, probe_test, epochs=t.epochs, lr=t.lr,
                               batch_size=t.batch_size, seed=t.seed)
        record["transfer"] = dataclasses.asdict(outcome)
    atomic_torch_save(record, cache)
    return record


def _entropies(record: dict) -> dict[str, LayerEntropy]:
    return {n: LayerEntropy(e["per_unit"], e["per_class"], e["p_on"], e["class_counts"],
                            tuple(e["unit_shape"])) for n, e in record["entropy"].items()}


def _slice(entry: dict) -> LandscapeSlice:
    return LandscapeSlice(entry["alphas"], entry["losses"])


# -- the study ---------------------------------------------------------------------------------
def run_study(study: StudyConfig, study_dir: str | Path, log: Callable[[str], None] = print,
              command: str | None = None) -> Path:
    """Train (or resume) every stage, analyse the final models, write the report; returns the
    path of ``study.md``."""
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    _check_study_dir(study, study_dir)
    for stage in ("dense", "gradual"):
        _run_stage(stage, stage_config(study, stage, study_dir), study_dir, log)
    _, gradual, _ = load_run_model(study_dir / "gradual")
    zeros, total = lobster_set_sparsity(gradual)
    sparsity = zeros / total
    log(f"gradual pruning reached sparsity {100 * sparsity:.3f}% ({zeros:,} of {total:,} "
        "parameters of Linear/Conv2d/BatchNorm2d are zero); one-shot and iterative follow")
    for stage in ("oneshot", "iterative"):
        _run_stage(stage, stage_config(study, stage, study_dir, sparsity), study_dir, log)
    _, dense, _ = load_run_model(study_dir / "dense")
    records = {stage: _analyze_stage(study, stage, study_dir, None if stage == "dense" else dense,
                                     log) for stage in STAGES}
    return write_report(study, study_dir, records, sparsity, command)


def _commits_text(commits: dict[str, str | None]) -> str:
    if len(set(commits.values())) == 1:
        return f"commit `{next(iter(commits.values()))}`"
    return "commits: " + ", ".join(f"{s} `{c}`" for s, c in commits.items())


def _std_text(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def write_report(study: StudyConfig, study_dir: Path, records: dict[str, dict],
                 sparsity: float, command: str | None = None) -> Path:
    """``study.json``, ``study.md`` and the PNG plots from the stages' analysis records."""
    sigmas = [float(s) for s in study.analysis.sigmas]
    summaries = {s: r["summary"] for s, r in records.items()}
    entropies = {stage: _entropies(r) for stage, r in records.items()}
    layers = list(entropies["dense"])
    commits = {}
    for stage in STAGES:
        info = study_dir / stage / "run_info.json"
        if info.exists():
            commits[stage] = json.loads(info.read_text()).get("commit")
    table = {}
    for stage, r in records.items():
        s = summaries[stage]
        table[stage] = {
            "test_error_percent": s["error"], "test_loss": s["loss"],
            "sparsity_percent": 100 * r["sparsity"], "zeros": r["zeros"], "total": r["total"],
            "remaining_percent_paper": r["remaining_percent_paper"],
            "neurons_alive": r["neurons_alive"], "neurons_total": r["neurons_total"],
            "psp_entropy_bits": entropy_summary(entropies[stage]), "sharpness": s["sharpness"],
            "transfer": r["transfer"],
        }
    report = {"name": study.name, "command": command, "commits": commits,
              "target_sparsity_percent": 100 * sparsity, "transfer_dataset": study.transfer.dataset,
              "study": study.to_dict(), "stages": table}
    atomic_write_text(study_dir / "study.json", json.dumps(report, indent=2) + "\n")

    plots = {
        "entropy_means.png": _entropy_bars_png(entropies, layers),
        "entropy_hist.png": entropy_histograms_png(entropies),
        "classwise.png": classwise_png(
            {s: e[records[s]["classwise_layer"]] for s, e in entropies.items()},
            records["dense"]["classwise_layer"]),
        "sharpness.png": _sharpness_png(summaries, sigmas),
        "landscape.png": landscape_png({s: _slice(r["landscape"]) for s, r in records.items()},
                                       "random filter-normalized direction (surviving weights)",
                                       "α"),
        "to_dense.png": landscape_png(
            {s: _slice(r["to_dense"]) for s, r in records.items() if r["to_dense"]},
            "line from each pruned model (α = 0) to the dense one (α = 1)", "α"),
    }
    if study.transfer.dataset is not None:
        plots["transfer.png"] = _transfer_png(records, study.transfer.dataset)
    for name, png in plots.items():
        atomic_write_bytes(study_dir / name, png)

    lines = [f"# One-shot vs gradual pruning: {study.name}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    base = records["dense"]
    lines += [
        f"From one dense model (`dense/`, {study.dense_epochs} epochs), gradual LOBSTER pruning "
        f"(`gradual/`) ran {study.budget_epochs} epochs and reached **{100 * sparsity:.3f}%** "
        f"sparsity ({records['gradual']['zeros']:,} of {base['total']:,} parameters of "
        "Linear/Conv2d/BatchNorm2d are zero). One-shot global magnitude pruning to the same "
        f"count plus masked fine-tuning (`oneshot/`) and {study.iterative_rounds} iterative "
        f"magnitude rounds (`iterative/`) had the same {study.budget_epochs} epochs. Every "
        "number is measured on the final (`last.pt`) model on the test set; "
        + _commits_text(commits) + ".", "",
        "| stage | test error % | sparsity % (P) | remaining % ('paper') | neurons alive |"
        + (f" transfer → {study.transfer.dataset} acc. % |" if study.transfer.dataset else ""),
        "|---|---|---|---|---|" + ("---|" if study.transfer.dataset else ""),
    ]
    for stage, row in table.items():
        transfer = (f" {row['transfer']['test_accuracy']:.2f} |"
                    if study.transfer.dataset else "")
        lines.append(f"| {stage} | {row['test_error_percent']:.2f} | "
                     f"{row['sparsity_percent']:.3f} | {row['remaining_percent_paper']:.3f} | "
                     f"{row['neurons_alive']}/{row['neurons_total']} |{transfer}")
    lines += ["", ("PSP-entropy per layer in bits: mean H(u) over all units / over the units on "
                   "at least once (fraction of units never on):"), "",
              "| stage | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
    for stage, row in table.items():
        cells = [f"{e['mean']:.3f} / {e['live_mean']:.3f} ({e['never_on_fraction']:.2f})"
                 for e in (row["psp_entropy_bits"][n] for n in layers)]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    probe_samples = (f"the first {study.analysis.limit:,} test samples"
                     if study.analysis.limit else "the test set")
    lines += ["", (f"Sharpness: mean loss increase (± sample std) over {study.analysis.draws} "
              f"draws of noise σ·rms(w) on surviving weights, on {probe_samples}:"), "",
              "| stage | base loss | " + " | ".join(f"σ = {s}" for s in sigmas) + " |",
              "|---|---|" + "---|" * len(sigmas)]
    for stage, row in table.items():
        s = row["sharpness"]
        cells = [f"{m:.4f} ± {_std_text(d)}" for m, d in zip(s["mean_increase"], s["std"])]
        lines.append(f"| {stage} | {s['base_loss']:.4f} | " + " | ".join(cells) + " |")
    lines += ["", ("The paper's claim (unverified): gradual pruning beats one-shot and reaches "
              "narrow (sharp), well-generalizing minima with less class-specific features "
              "(higher PSP-entropy), which should transfer better. A low layer mean is ambiguous: "
              "dead units sit at the entropy floor, so the mean over live units is shown "
              "beside it."), ""]
    captions = {
        "entropy_means.png": "Mean PSP-entropy per layer",
        "entropy_hist.png": "Histograms of H(u) per layer",
        "classwise.png": "Class-wise matrix H_c(u)",
        "sharpness.png": "Sharpness curves",
        "landscape.png": "Loss along a random direction",
        "to_dense.png": "Loss on the line to the dense model",
        "transfer.png": "Transfer: linear probe on frozen features",
    }
    lines += [f"![{captions[name]}]({name})" for name in plots]
    path = study_dir / "study.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _entropy_bars_png(entropies: dict[str, dict[str, LayerEntropy]], layers: list[str]) -> bytes:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(1.6 + 1.5 * len(layers), 3.6))
    width = 0.8 / len(entropies)
    for i, (stage, layer_entropy) in enumerate(entropies.items()):
        positions = [j + (i - (len(entropies) - 1) / 2) * width for j in range(len(layers))]
        axis.bar(positions, [layer_entropy[n].mean for n in layers], width, label=stage)
    axis.set_xticks(range(len(layers)), layers)
    axis.set_ylabel("mean H(u) (bits)")
    axis.set_title("PSP-entropy per layer", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return _png(figure)


def _sharpness_png(summaries: dict[str, dict], sigmas: list[float]) -> bytes:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    for stage, s in summaries.items():
        std = [0.0 if d is None else d for d in s["sharpness"]["std"]]
        axis.errorbar(sigmas, s["sharpness"]["mean_increase"], yerr=std, marker="o", capsize=3,
                      label=stage)
    axis.set_xscale("log")
    axis.set_xlabel("σ (noise std relative to rms(w))")
    axis.set_ylabel("mean loss increase")
    axis.set_title("Sharpness", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return _png(figure)


def _transfer_png(records: dict[str, dict], dataset: str) -> bytes:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.4))
    stages = list(records)
    values = [records[s]["transfer"]["test_accuracy"] for s in stages]
    axis.bar(stages, values)
    for x, v in enumerate(values):
        axis.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    axis.set_ylim(max(0.0, min(values) - 10), 100)
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(f"linear probe on frozen features, {dataset}", fontsize=10)
    figure.tight_layout()
    return _png(figure)
