"""lobster.scale_by_lr in the trainer: λ·lr follows the learning-rate schedule, step by step."""

from __future__ import annotations

import torch

from neuronwise.experiment.cli import main
from neuronwise.experiment.rundir import load_checkpoint


def test_scale_by_lr_uses_the_scheduled_learning_rate(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("""
data: {name: digits, val_fraction: 0.2, batch_size: 64, limit_train: 200}
model: {name: mlp}
optim: {name: sgd, lr: 0.1}
schedule: {name: multistep, milestones: [1], factor: 0.1}
method: lobster
lobster: {lam: 0.5, scale_by_lr: true}
train: {epochs: 2, seed: 0}
""")
    run = tmp_path / "run"
    assert main(["run", str(config), "--run-dir", str(run)]) == 0
    state = load_checkpoint(run / "last.pt")
    # Epoch 2 trained at lr 0.01 (the milestone after epoch 1): the regularizer used λ·0.01.
    assert torch.isclose(torch.tensor(state["callbacks"]["lobster"]["lr"]), torch.tensor(0.01))
