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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from neuronwise import data as nwdata
from neuronwise import metrics, pruning
from neuronwise.io import atomic_torch_save, atomic_write_text
from neuronwise.sharpness import landscape_slice

from .analysis import analyze_model, classwise_layer, linear_probe, split_loader
from .config import Config, ConfigError, apply_overrides, from_dict, read_yaml
from .rundir import RESUME_MAY_CHANGE, RunDir, RunDirError
from .schema import build, flatten, meta, setting
from .study_report import write_report
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

    sigmas: list = field(default_factory=lambda: [0.01, 0.05, 0.1],
                         metadata=meta("sharpness noise scales σ (relative to rms(w))"))
    draws: int = setting(10, "noise draws per σ", bounds="> 0")
    seed: int = setting(0, "seed of the noise draws and the random direction")
    landscape_points: int = setting(21, "loss evaluations along each slice (at least 2)")
    limit: int | None = setting(None, "test samples of the weight-space probes (null: all)",
                                bounds="> 0")


@dataclass
class TransferSettings:
    """Linear probe on frozen features (the classifier's input) of ``dataset``'s train split,
    accuracy on its test split; ``dataset: null`` skips the probe."""

    dataset: str | None = setting(None, "dataset of the probe (null: no probe)")
    epochs: int = setting(10, "probe training epochs", bounds="> 0")
    lr: float = setting(0.01, "probe learning rate", bounds="> 0")
    batch_size: int = setting(256, "probe batch size", bounds="> 0")
    limit_train: int | None = setting(None, "probe training samples (null: all)", bounds="> 0")
    seed: int = setting(0, "seed of the probe")


@dataclass
class StudyConfig:
    """A study: ``base`` is an experiment config (as for ``neuronwise run``) shared by every
    stage; ``stages.NAME`` holds extra settings merged into ``base`` for that stage only."""

    name: str = setting("study", "study name")
    base: dict = field(default_factory=dict, metadata=meta("experiment config of every stage"))
    dense_epochs: int = setting(10, "epochs of the dense stage", bounds="> 0")
    budget_epochs: int = setting(30, "epochs of each pruning stage (>= iterative_rounds + 1)")
    iterative_rounds: int = setting(5, "global magnitude rounds of the iterative stage",
                                    bounds="> 0")
    stages: dict = field(default_factory=dict, metadata=meta("extra settings per stage name"))
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    transfer: TransferSettings = field(default_factory=TransferSettings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The study decides these per stage; a base or stage setting for them would be silently lost.
_STUDY_KEYS = ("name", "method", "model.init_from", "train.epochs", "pruning.schedule",
               "pruning.sparsity", "pruning.fraction", "pruning.every", "pruning.start_epoch")


# -- config ------------------------------------------------------------------------------------
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
        study = build(StudyConfig, data or {})
        _check(study.budget_epochs >= study.iterative_rounds + 1, "budget_epochs",
               study.budget_epochs, f"an int >= iterative_rounds + 1 = "
               f"{study.iterative_rounds + 1} (each iterative round is followed by fine-tuning)")
        for stage, extra in study.stages.items():
            _check(stage in STAGES, f"stages.{stage}", stage, f"a stage name in {list(STAGES)}")
            _check(isinstance(extra, dict), f"stages.{stage}", extra, "a mapping")
        for where, tree in [("base", study.base)] + [(f"stages.{s}", e)
                                                     for s, e in study.stages.items()]:
            taken = [k for k in flatten(tree) if k in _STUDY_KEYS]
            if taken:
                raise ConfigError(f"{where}.{taken[0]}: set per stage by the study (remove it; "
                                  f"the study sets {', '.join(_STUDY_KEYS)})")
        a = study.analysis
        _check(bool(a.sigmas) and all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                      and s > 0 for s in a.sigmas),
               "analysis.sigmas", a.sigmas, "a non-empty list of numbers > 0")
        _check(a.landscape_points >= 2, "analysis.landscape_points", a.landscape_points,
               "an int >= 2")
        t = study.transfer
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
