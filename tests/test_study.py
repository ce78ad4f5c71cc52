"""The one-shot vs gradual study on the embedded digits data: stages from one dense model, the
same sparsity, exact resume of an interrupted stage, skipping, the report, config errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from neuronwise import data as nwdata
from neuronwise.experiment.analysis import analyze_model, entropy_summary
from neuronwise.experiment.cli import main
from neuronwise.experiment.config import ConfigError
from neuronwise.experiment.rundir import RunDirError
from neuronwise.experiment.study import (
    STAGES,
    lobster_set_sparsity,
    run_study,
    stage_config,
    study_from_dict,
)
from neuronwise.experiment.tools import load_run_model
from neuronwise.experiment.trainer import Trainer

TINY = {
    "name": "tiny",
    "base": {"data": {"name": "digits", "batch_size": 64},
             "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
             "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "train": {"seed": 0}},
    "dense_epochs": 2,
    "budget_epochs": 3,
    "iterative_rounds": 2,
    # PWE 0: the plateau pruner prunes after every epoch, so gradual reaches a real sparsity.
    "stages": {"gradual": {"lobster": {"lam": 1e-3}, "pruning": {"patience": 0}}},
    "analysis": {"draws": 2, "landscape_points": 3},
    "transfer": {"dataset": "digits", "epochs": 2},  # digits → digits stands in for MNIST ↔ Fashion
}


class Interrupted(Exception):
    """Raised by a test to stop a stage mid-run, as a crash would."""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A study interrupted after the first one-shot epoch (its checkpoint written), then rerun."""
    folder = tmp_path_factory.mktemp("study") / "tiny"
    config = study_from_dict(TINY)
    lines: list[str] = []

    def crash_after_first_oneshot_epoch(line: str) -> None:
        lines.append(line)
        if line.startswith("[oneshot] epoch    1"):
            raise Interrupted

    with pytest.raises(Interrupted):
        run_study(config, folder, log=crash_after_first_oneshot_epoch)
    report = run_study(config, folder, log=lines.append, command="neuronwise study tiny.yaml")
    return config, folder, report, lines


def zeros(model) -> int:
    return lobster_set_sparsity(model)[0]


def test_pruned_stages_start_from_dense_and_share_the_reached_sparsity(study):
    config, folder, _, _ = study
    models = {stage: load_run_model(folder / stage)[1] for stage in STAGES}
    count, total = lobster_set_sparsity(models["gradual"])
    assert 0 < count < total and zeros(models["dense"]) == 0
    assert zeros(models["oneshot"]) == zeros(models["iterative"]) == count
    sparsity = count / total
    dense_checkpoint = str((folder / "dense" / "last.pt").resolve())
    for stage in ("gradual", "oneshot", "iterative"):
        stored = (folder / stage / "config.yaml").read_text()
        assert f"init_from: {dense_checkpoint}" in stored, stage
        assert [r["epoch"] for r in _metrics(folder / stage)] == [1, 2, 3]
    oneshot = stage_config(config, "oneshot", folder, sparsity)
    assert oneshot.pruning.schedule == "oneshot" and oneshot.pruning.sparsity == sparsity
    assert oneshot.method == "none" and stage_config(config, "gradual", folder).method == "lobster"
    # Iterative: R = 2 rounds of f = 1 - (1 - s)^(1/2), every ⌊3 / 3⌋ = 1 epoch, then fine-tuning.
    fraction = 1 - (1 - sparsity) ** 0.5
    targets = [r.get("target_sparsity") for r in _metrics(folder / "iterative")]
    assert targets[0] == pytest.approx(fraction) and targets[1] == pytest.approx(sparsity)
    assert targets[2] is None


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_stage_resumes_exactly(study, tmp_path):
    config, folder, _, lines = study
    assert "[dense] finished (2 epochs): skipped" in lines
    assert "[oneshot] resuming after epoch 1 of 3" in lines
    count, total = lobster_set_sparsity(load_run_model(folder / "gradual")[1])
    reference = tmp_path / "oneshot"
    Trainer(stage_config(config, "oneshot", folder, count / total), str(reference),
            log=lambda line: None).fit()
    resumed = torch.load(folder / "oneshot" / "last.pt", weights_only=True)["model"]
    straight = torch.load(reference / "last.pt", weights_only=True)["model"]
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)


def test_report_numbers_match_plain_evaluation(study):
    _, folder, report, _ = study
    assert report == folder / "study.md"
    summary = json.loads((folder / "study.json").read_text())
    test = nwdata.load("digits", split="test")
    for stage in STAGES:
        row = summary["stages"][stage]
        model = load_run_model(folder / stage)[1]
        with torch.no_grad():
            logits = model(test.images)
        error = 100.0 - 100.0 * (logits.argmax(1) == test.labels).double().mean().item()
        assert row["test_error_percent"] == pytest.approx(error)
        assert row["test_loss"] == pytest.approx(F.cross_entropy(logits, test.labels).item(),
                                                 rel=1e-6)
        count, total = lobster_set_sparsity(model)
        assert (row["zeros"], row["total"]) == (count, total)
        assert row["sparsity_percent"] == pytest.approx(100.0 * count / total)
        assert list(row["psp_entropy_bits"]) == ["features.0", "classifier"]
        entropy = analyze_model(model, DataLoader(TensorDataset(test.images, test.labels),
                                                  batch_size=128)).entropy
        assert row["psp_entropy_bits"]["classifier"]["live_mean"] == pytest.approx(
            entropy_summary(entropy)["classifier"]["live_mean"])
        assert len(row["sharpness"]["mean_increase"]) == 3
        assert 0.0 <= row["transfer"]["test_accuracy"] <= 100.0
        assert row["transfer"]["features"] == 32 and row["transfer"]["test_samples"] == 360
    assert summary["target_sparsity_percent"] == summary["stages"]["gradual"]["sparsity_percent"]
    text = report.read_text()
    assert text.startswith("# One-shot vs gradual pruning: tiny")
    assert "`neuronwise study tiny.yaml`" in text
    for stage in STAGES:
        assert f"| {stage} | " in text
    for png in ("entropy_means.png", "entropy_hist.png", "classwise.png", "sharpness.png",
                "landscape.png", "to_dense.png", "transfer.png"):
        assert (folder / png).read_bytes()[:4] == b"\x89PNG", png
        assert f"]({png})" in text


def test_rerun_skips_training_and_reuses_or_redoes_the_analysis(study):
    config, folder, _, _ = study

    def snapshot():
        return {p: p.read_bytes() for s in STAGES for p in (folder / s).glob("*.pt")}

    before = snapshot()
    lines: list[str] = []
    run_study(config, folder, log=lines.append)
    assert snapshot() == before
    assert not any("analysing" in line or "epoch " in line for line in lines)
    # New analysis settings: the analyses are redone, the training is not.
    changed = dataclasses.replace(config, analysis=dataclasses.replace(config.analysis, draws=3))
    lines.clear()
    run_study(changed, folder, log=lines.append)
    assert sum("analysing" in line for line in lines) == 4
    assert not any("] epoch " in line for line in lines)
    summary = json.loads((folder / "study.json").read_text())
    assert summary["stages"]["oneshot"]["sharpness"]["draws"] == 3
    # How the machine computes may change: no error, no training.
    faster = {**TINY["base"], "train": {"seed": 0, "threads": 1, "channels_last": True}}
    lines.clear()
    run_study(dataclasses.replace(changed, base=faster), folder, log=lines.append)
    assert not any("] epoch " in line for line in lines)
    with pytest.raises(RunDirError, match="belongs to another study config .*budget_epochs"):
        run_study(dataclasses.replace(config, budget_epochs=4), folder)


@pytest.mark.parametrize("change, message", [
    ({"budget_epoch": 3}, "unknown key 'budget_epoch' (did you mean 'budget_epochs'?)"),
    ({"base": {**TINY["base"], "method": "lobster"}}, "base.method: set per stage by the study"),
    ({"stages": {"oneshot": {"pruning": {"sparsity": 0.5}}}},
     "stages.oneshot.pruning.sparsity: set per stage by the study"),
    ({"stages": {"gradual": {"lobster": {"lamb": 1}}}},
     "stage gradual: unknown key 'lobster.lamb'"),
    ({"stages": {"finetune": {}}}, "stages.finetune: expected a stage name"),
    ({"iterative_rounds": 3}, "budget_epochs: expected an int >= iterative_rounds + 1 = 4"),
    ({"transfer": {"dataset": "cifar10"}}, "transfer.dataset: expected a dataset with the input"),
    ({"transfer": {"dataset": "svhn"}}, "transfer.dataset: expected null or one of"),
    ({"analysis": {"sigmas": []}}, "analysis.sigmas: expected a non-empty list"),
    ({"dense_epochs": "10"}, "dense_epochs: expected an integer"),
])
def test_study_config_errors(change, message):
    with pytest.raises(ConfigError) as error:
        study_from_dict({**TINY, **change}, source="tiny.yaml")
    assert str(error.value).startswith("tiny.yaml: ") and message in str(error.value)


def test_study_command_reports_bad_config_in_one_line(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text("name: x\nbudget_epochs: 0\n")
    assert main(["study", str(path), "--study-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "budget_epochs" in err
    assert not (tmp_path / "s").exists()
