"""Structured baselines in the pipeline: the magnitude schedules with granularity neurons (row-L1
and Torch-Pruning's group L1, as neuron masks), checked against hand counts and Torch-Pruning."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn

import neuronwise as nw
from neuronwise.experiment import config as cfg
from neuronwise.experiment import methods
from neuronwise.experiment.cli import main
from neuronwise.experiment.methods import MethodContext
from neuronwise.extras import MissingExtraError
from neuronwise.structured_tp import tp_group_l1_prune


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(),
                         nn.Linear(8, 3))


def _callback(model: nn.Module, **pruning) -> methods.MethodCallback:
    config = cfg.from_dict({"pruning": {"granularity": "neurons", **pruning}})
    (callback,) = methods.build_callbacks(config)
    callback.setup(MethodContext(model, [torch.optim.SGD(model.parameters(), lr=0.1)],
                                 torch.device("cpu"), torch.zeros(1, 20), lambda: 1.0))
    return callback


def _dead_rows(layer: nn.Linear) -> set[int]:
    return set((layer.weight == 0).all(dim=1).nonzero().flatten().tolist())


def test_an_l1_structured_round_zeroes_exactly_the_lowest_l1_rows_of_each_layer():
    model = _mlp()
    norms = {i: model[i].weight.detach().abs().sum(dim=1) for i in (1, 3)}
    callback = _callback(model, schedule="iterative", fraction=0.25, every=1, sparsity=0.9)
    record = {"epoch": 1}
    callback.on_epoch_end(record)
    assert record["target_sparsity"] == pytest.approx(0.25)
    # round(0.25·12) = 3 and round(0.25·8) = 2 lowest rows; the classifier is not pruned
    assert _dead_rows(model[1]) == set(torch.argsort(norms[1])[:3].tolist())
    assert _dead_rows(model[3]) == set(torch.argsort(norms[3])[:2].tolist())
    assert _dead_rows(model[5]) == set()
    assert all(model[i].bias[sorted(_dead_rows(model[i]))].eq(0).all() for i in (1, 3))
    # the 'paper' count (Linear weights and biases): dead rows and biases are gone, nothing else
    nonzero = 9 * 20 + 9 + 6 * 12 + 6 + 3 * 8 + 3
    assert nw.metrics.sparsity_report(model)["nonzero"] == nonzero
    # the neuron mask holds them at zero through training steps
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    callback.after_optimizer_step()
    assert _dead_rows(model[1]) == set(torch.argsort(norms[1])[:3].tolist())
    # the second round: 1 − 0.75² = 43.75 % of the neurons, the dead ones counted
    record = {"epoch": 2}
    callback.on_epoch_end(record)
    assert record["target_sparsity"] == pytest.approx(0.4375)
    assert (len(_dead_rows(model[1])), len(_dead_rows(model[3]))) == (5, 4)  # round(5.25), round(3.5)


def test_oneshot_neurons_prunes_half_of_every_hidden_layer_before_training():
    model = _mlp()
    norms = {i: model[i].weight.detach().abs().sum(dim=1) for i in (1, 3)}
    callback = _callback(model, schedule="oneshot", sparsity=0.5, start_epoch=0)
    callback.on_fit_start()
    assert _dead_rows(model[1]) == set(torch.argsort(norms[1])[:6].tolist())
    assert _dead_rows(model[3]) == set(torch.argsort(norms[3])[:4].tolist())
    assert callback.mask.granularity == "neurons" and callback.state_dict()["done"]


def _physical_copy(model: nn.Sequential) -> nn.Sequential:
    """The masked MLP with its dead neurons cut out (rows and the consumers' columns)."""
    small = copy.deepcopy(model)
    columns = torch.arange(20)
    for i in (1, 3, 5):
        rows = (model[i].weight != 0).any(dim=1).nonzero().flatten() if i != 5 else torch.arange(3)
        layer = nn.Linear(len(columns), len(rows))
        with torch.no_grad():
            layer.weight.copy_(model[i].weight[rows][:, columns])
            layer.bias.copy_(model[i].bias[rows])
        small[i] = layer
        columns = rows
    return small


def test_tp_group_l1_masks_the_neurons_that_torch_pruning_removes_step_after_step():
    tp = pytest.importorskip("torch_pruning")
    model = _mlp()
    example = torch.randn(2, 20)
    reference = copy.deepcopy(model)
    pruner = tp.pruner.BasePruner(
        reference, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=0.6, iterative_steps=2, ignored_layers=[reference[5]])
    mask = nw.ParameterMask(model, (nn.Linear,), granularity="neurons")
    for fraction in (0.3, 0.6):  # Torch-Pruning's linear per-step ratios 0.6·1/2, 0.6·2/2
        pruner.step()
        alive = tp_group_l1_prune(model, fraction, example, mask=mask)
        small = _physical_copy(model)
        for i in (1, 3, 5):
            assert torch.equal(small[i].weight, reference[i].weight), (fraction, i)
        assert alive == {"1": reference[1].out_features, "3": reference[3].out_features}
        # "fine-tuning" in between: both models move the same way
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0 + 0.3 * torch.rand_like(p))
            mask.apply()
            for p, q in zip(reference.parameters(), _physical_copy(model).parameters()):
                p.copy_(q)
    assert (len(_dead_rows(model[1])), len(_dead_rows(model[3]))) == (12 - int(12 * 0.4),
                                                                       8 - int(8 * 0.4))


def test_config_errors_and_a_missing_torch_pruning_are_one_clear_line(monkeypatch):
    with pytest.raises(cfg.ConfigError, match=r"pruning.neuron_ranking: expected one of "
                                              r"\['l1-layer', 'l1-global', 'l1-groups', "
                                              r"'tp-group-l1'\], got 'l2'"):
        cfg.from_dict({"pruning": {"neuron_ranking": "l2"}})
    config = cfg.from_dict({"pruning": {"schedule": "iterative", "granularity": "neurons",
                                        "importance": "taylor"}})
    with pytest.raises(ValueError, match="ranked by neuron_ranking"):
        methods.build_callbacks(config)
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    config = cfg.from_dict({"pruning": {"schedule": "gradual", "granularity": "neurons",
                                        "neuron_ranking": "tp-group-l1"}})
    with pytest.raises(MissingExtraError, match=r'pip install "neuronwise\[baselines\]"'):
        methods.build_callbacks(config)


def test_a_per_entry_regularizer_mask_is_refused():
    config = cfg.from_dict({"method": "lobster", "pruning": {"schedule": "iterative",
                                                             "granularity": "neurons"}})
    regularizer, schedule = methods.build_callbacks(config)
    model = _mlp()
    context = MethodContext(model, [torch.optim.SGD(model.parameters(), lr=0.1)],
                            torch.device("cpu"), torch.zeros(1, 20), lambda: 1.0)
    regularizer.setup(context)
    with pytest.raises(ValueError, match="differs from the 'params' mask"):
        schedule.setup(context)


RUN = """
data: {name: digits, val_fraction: 0.2, batch_size: 64, limit_train: 300}
model: {name: mlp}
optim: {name: sgd, lr: 0.1}
pruning: {schedule: SCHEDULE, granularity: neurons, neuron_ranking: RANKING, fraction: 0.3,
          every: 1, start_epoch: 1, end_epoch: 4, sparsity: 0.8}
train: {epochs: 4, seed: 0}
"""


def _metrics(run) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if not k.endswith("_time_s")} for line in lines]


@pytest.mark.parametrize("schedule, ranking", [("iterative", "l1-layer"),
                                               ("gradual", "tp-group-l1")])
def test_a_run_resumed_mid_way_records_the_same_metrics(tmp_path, capsys, schedule, ranking):
    if ranking == "tp-group-l1":
        pytest.importorskip("torch_pruning")
    path = tmp_path / "run.yaml"
    path.write_text(RUN.replace("SCHEDULE", schedule).replace("RANKING", ranking))
    assert main(["run", str(path), "--run-dir", str(tmp_path / "whole")]) == 0
    assert main(["run", str(path), "--run-dir", str(tmp_path / "split"),
                 "--set", "train.epochs=2"]) == 0
    assert main(["run", "--run-dir", str(tmp_path / "split"), "--resume",
                 "--set", "train.epochs=4"]) == 0
    capsys.readouterr()
    whole = _metrics(tmp_path / "whole")
    assert whole == _metrics(tmp_path / "split")
    # the schedule pruned whole neurons: the alive count fell, every pruning epoch recorded
    assert whole[-1]["neurons_alive"] < whole[0]["neurons_alive"]
    assert sum("target_sparsity" in line for line in whole) >= 2


def test_tp_group_l1_follows_torch_pruning_through_convolutions_and_the_flatten():
    tp = pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    model = nw.models.create("lenet5", num_classes=10, in_channels=1, image_size=28)
    example = torch.zeros(1, 1, 28, 28)
    reference = copy.deepcopy(model)
    tp.pruner.BasePruner(
        reference, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=0.3, ignored_layers=[reference.classifier]).step()
    alive = tp_group_l1_prune(model, 0.3, example)
    assert alive == {"conv1": 14, "conv2": 35, "fc1": 350}  # int(N·0.7) of 20, 50, 500
    for name in alive:  # the kept channels, identified by their (distinct) biases
        layer = model.get_submodule(name)
        live = (layer.weight.flatten(1) != 0).any(dim=1)
        assert torch.equal(layer.bias[live], reference.get_submodule(name).bias)
