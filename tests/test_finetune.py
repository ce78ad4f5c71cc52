"""`method: finetune`: a pruned checkpoint trains on with exactly its zeros kept."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from neuronwise.experiment.cli import main

BASE = ("data: {name: digits, val_fraction: 0.1, batch_size: 64}\n"
        "optim: {name: sgd, lr: 0.1, momentum: 0.9}\n")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "last.pt", weights_only=True)["model"]
    return {k: v for k, v in state.items() if k.endswith(("weight", "bias"))}


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_time_s")}
            for line in lines]


def _pruned_and_finetune_config(tmp_path: Path, sparsity: float, seed: int,
                                epochs: int) -> tuple[Path, Path]:
    """A one-epoch run pruned one-shot to ``sparsity``, and a finetune config starting from it."""
    pruned_config = tmp_path / "pruned.yaml"
    pruned_config.write_text(BASE + "model: {name: mlp}\n"
                             f"pruning: {{schedule: oneshot, sparsity: {sparsity}, start_epoch: 0}}\n"
                             f"train: {{epochs: 1, seed: {seed}}}\n")
    pruned = tmp_path / "pruned"
    assert main(["run", str(pruned_config), "--run-dir", str(pruned)]) == 0
    config = tmp_path / "finetune.yaml"
    config.write_text(BASE + f"model: {{name: mlp, init_from: {pruned / 'last.pt'}}}\n"
                      f"method: finetune\ntrain: {{epochs: {epochs}, seed: 0}}\n")
    return pruned, config


def test_finetune_keeps_the_zeros_of_its_start_and_trains_the_rest(tmp_path):
    pruned, config = _pruned_and_finetune_config(tmp_path, 0.6, seed=0, epochs=2)
    start = _weights(pruned)
    zeros = {k: v == 0 for k, v in start.items()}
    assert sum(int(z.sum()) for z in zeros.values()) > 0.5 * sum(v.numel() for v in start.values())

    tuned = tmp_path / "tuned"
    assert main(["run", str(config), "--run-dir", str(tuned)]) == 0
    end = _weights(tuned)
    for name, value in end.items():
        assert torch.equal(value == 0, zeros[name]), name  # the same zeros, through momentum
        assert not torch.equal(value, start[name]), name  # the rest trained

    # Without the method, momentum revives the pruned entries at once.
    free = tmp_path / "free"
    config.write_text(config.read_text().replace("method: finetune", "method: none"))
    assert main(["run", str(config), "--run-dir", str(free)]) == 0
    assert sum(int((v == 0).sum()) for v in _weights(free).values()) < sum(
        int(z.sum()) for z in zeros.values())


def test_finetune_resumes_exactly(tmp_path):
    _, config = _pruned_and_finetune_config(tmp_path, 0.5, seed=1, epochs=3)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["run", str(config), "--run-dir", str(straight)]) == 0
    assert main(["run", str(config), "--run-dir", str(resumed), "--set", "train.epochs=2"]) == 0
    assert main(["run", "--run-dir", str(resumed), "--resume", "--set", "train.epochs=3"]) == 0
    assert _records(resumed) == _records(straight)
