"""The shared helpers of neuronwise._utils."""

import pytest
import torch
from torch import nn

from neuronwise import metrics
from neuronwise._utils import (
    by_device_and_dtype,
    check_fraction,
    check_int,
    check_lam,
    evaluating,
    find_classifier,
    layer_neurons,
    split_batch,
)
from neuronwise.neq import NEq


def test_evaluating_restores_each_module_flag_even_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Sequential(nn.BatchNorm1d(2)))
    model[1].eval()  # a submodule in a mode different from the root's
    before = [m.training for m in model.modules()]
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
    with pytest.raises(RuntimeError), evaluating(model):
        raise RuntimeError
    assert [m.training for m in model.modules()] == before


def test_split_batch():
    x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    assert split_batch((x, y)) == (x, y)
    with pytest.raises(TypeError, match="Invalid batch: dict"):
        split_batch({"x": x})
    with pytest.raises(TypeError, match="of length 3"):
        split_batch([x, y, y])
    with pytest.raises(TypeError, match=r"\(Tensor, int\)"):
        split_batch((x, 1))


def test_find_classifier_is_the_last_module_of_the_types():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Linear(3, 4)), nn.Conv2d(1, 1, 1))
    assert find_classifier(model) == ("1.0", model[1][0])
    assert find_classifier(model, (nn.Linear, nn.Conv2d)) == ("2", model[2])
    assert find_classifier(nn.Sequential(nn.ReLU())) is None


def test_layer_neurons():
    assert layer_neurons(nn.Linear(3, 5)) == 5
    assert layer_neurons(nn.Conv2d(3, 7, 3)) == 7
    assert layer_neurons(nn.BatchNorm2d(4)) == 4
    assert layer_neurons(nn.LayerNorm((3, 4))) == 12  # one per normalized element
    assert layer_neurons(nn.ReLU()) == 0


def test_by_device_and_dtype_groups_parallel_lists():
    a, b, c = torch.zeros(1), torch.zeros(1, dtype=torch.float64), torch.ones(1)
    groups = list(by_device_and_dtype([a, b, c], ["a", "b", "c"]))
    assert [names for _, names in groups] == [["a", "c"], ["b"]]


def test_validators():
    assert check_int("every", 3, 1) == 3 and check_fraction("f", 1) == 1.0 and check_lam(0) == 0.0
    for bad in (True, 0, 1.5):
        with pytest.raises(ValueError, match="Invalid every"):
            check_int("every", bad, 1)
    with pytest.raises(ValueError, match="Invalid f: 1.5"):
        check_fraction("f", 1.5)
    with pytest.raises(ValueError, match="Invalid lam: inf"):
        check_lam(float("inf"))


def test_layernorm_neurons_are_counted_one_way_by_neq_and_metrics():
    model = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.LayerNorm((2, 3)),
                          nn.Flatten(), nn.Linear(6, 2))
    neq = NEq(model, torch.randn(3, 4))
    assert neq.frozen["2"].numel() == 6
    assert metrics.count_neurons(model, "neq")["2"] == (6, 6)
    assert neq.trained_neurons() == metrics.count_neurons(model, "neq")["total"][0]
