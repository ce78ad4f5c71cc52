"""Structured L1 pruning: hand-computed scores, per-layer and global selection, masks, simplify."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import neuronwise as nw
from neuronwise.pruning import ParameterMask
from neuronwise.simplify import simplify
from neuronwise.structured import l1_structured_prune, neuron_l1_norms


def mlp() -> nn.Sequential:
    """3 → 4 → 3 → 2 with hand-set weights; row L1 norms fc1 [4, 2, 1, 1], fc2 [30, 3, 27]."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(
            torch.tensor([[1.0, -2.0, 1.0], [0.5, 0.5, -1.0], [0.0, 0.0, 1.0], [-0.5, 0.0, 0.5]])
        )
        model[2].weight.copy_(
            torch.tensor([[10.0, -10.0, 5.0, 5.0], [1.0, 1.0, -0.5, 0.5], [9.0, 9.0, 0.0, -9.0]])
        )
        model[4].weight.copy_(torch.tensor([[0.1, 0.2, 0.3], [0.01, 0.02, 0.03]]))
        for layer in (model[0], model[2], model[4]):
            layer.bias.fill_(0.25)
    return model


def alive_rows(layer: nn.Module) -> list[int]:
    rows = layer.weight.reshape(layer.weight.shape[0], -1)
    return (rows != 0).any(dim=1).nonzero().flatten().tolist()


def test_scores_are_row_l1_norms_without_bias_and_skip_the_classifier():
    scores = neuron_l1_norms(mlp())
    assert list(scores) == ["0", "2"]  # the last Linear (classifier) is not scored
    assert scores["0"].tolist() == [4.0, 2.0, 1.0, 1.0]
    assert scores["2"].tolist() == [30.0, 3.0, 27.0]
    assert scores["0"].dtype == torch.float64


def test_conv_scores_sum_over_input_channels_and_kernel():
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(24.0).sub(12).view(3, 2, 2, 2))
    # channel k holds 8k − 12 … 8k − 5: |·| sums 12+…+5 = 68, 4+3+2+1+0+1+2+3 = 16, 4+…+11 = 60
    assert neuron_l1_norms(model)["0"].tolist() == [68.0, 16.0, 60.0]
    assert l1_structured_prune(model, 1 / 3) == {"0": 2}
    assert alive_rows(model[0]) == [0, 2]


def test_layer_scope_prunes_the_lowest_fraction_of_each_layer_with_biases():
    model = mlp()
    classifier = model[4].weight.clone()
    alive = l1_structured_prune(model, 0.5)
    # fc1: round(0.5·4) = 2 of scores [4, 2, 1, 1] (tie 1 = 1 by index); fc2: round(1.5) = 2
    assert alive == {"0": 2, "2": 1}
    assert alive_rows(model[0]) == [0, 1] and alive_rows(model[2]) == [0]
    assert model[0].bias.tolist() == [0.25, 0.25, 0.0, 0.0]
    assert model[2].bias.tolist() == [0.25, 0.0, 0.0]
    assert torch.equal(model[4].weight, classifier)


def test_global_scope_ranks_scores_normalized_by_the_layer_mean():
    model = mlp()
    # normalized: fc1 [4, 2, 1, 1]/2 = [2, 1, .5, .5]; fc2 [30, 3, 27]/20 = [1.5, .15, 1.35].
    # round(3/7·7) = 3 lowest: fc2 #1, fc1 #2, fc1 #3. Raw norms would take fc1 #1, #2, #3.
    assert l1_structured_prune(model, 3 / 7, scope="global") == {"0": 2, "2": 2}
    assert alive_rows(model[0]) == [0, 1] and alive_rows(model[2]) == [0, 2]


def test_global_scope_keeps_each_layers_best_neuron():
    model = mlp()
    assert l1_structured_prune(model, 0.99, scope="global") == {"0": 1, "2": 1}
    assert alive_rows(model[0]) == [0] and alive_rows(model[2]) == [0]


def test_layer_scope_keeps_one_neuron_per_layer():
    model = mlp()
    assert l1_structured_prune(model, 0.9) == {"0": 1, "2": 1}


def test_dead_neurons_count_towards_the_target_and_stay_dead():
    model = mlp()
    with torch.no_grad():
        model[0].weight[0] = 0  # the largest-norm neuron, already dead
    assert l1_structured_prune(model, 0.25) == {"0": 3, "2": 2}
    assert alive_rows(model[0]) == [1, 2, 3]  # only the dead one: 1 of round(0.25·4) = 1
    assert l1_structured_prune(model, 0.5) == {"0": 2, "2": 1}
    assert alive_rows(model[0]) == [1, 3]  # then the lowest alive one (#2, first of the tie)


def test_ignore_replaces_the_default_classifier():
    model = mlp()
    scores = neuron_l1_norms(model, ignore=[model[0]])
    assert list(scores) == ["2", "4"]
    assert l1_structured_prune(model, 0.5, ignore=model[0]) == {"2": 1, "4": 1}
    assert alive_rows(model[0]) == [0, 1, 2, 3]


def test_mask_keeps_pruned_neurons_at_zero_while_fine_tuning():
    model = mlp()
    mask = ParameterMask(model, (nn.Linear,), granularity="neurons")
    l1_structured_prune(model, 0.5, mask=mask)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    mask.attach(optimizer)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert alive_rows(model[0]) == [0, 1] and alive_rows(model[2]) == [0]
    assert model[0].bias[2:].abs().sum() == 0 and model[2].bias[1:].abs().sum() == 0


@settings(max_examples=20, deadline=None)
@given(fraction=st.floats(0, 0.95), scope=st.sampled_from(["layer", "global"]),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_simplify_removes_exactly_the_pruned_neurons(fraction, scope, seed):
    torch.manual_seed(seed)
    model = nw.models.create("lenet300").eval()
    alive = l1_structured_prune(model, fraction, scope=scope)
    total = 400
    dead = total - sum(alive.values())
    if scope == "layer":
        assert alive == {"fc1": 300 - min(round(fraction * 300), 299),
                         "fc2": 100 - min(round(fraction * 100), 99)}  # fmt: skip
    else:
        assert dead == min(round(fraction * total), total - 2)
    example = torch.zeros(1, 1, 28, 28)
    small = simplify(model, example)
    sizes = {n: m.out_features for n, m in small.named_modules() if isinstance(m, nn.Linear)}
    assert sizes == {"fc1": alive["fc1"], "fc2": alive["fc2"], "classifier": 10}
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        y = model(x)
        assert (small(x) - y).abs().max() <= 1e-5 * y.abs().max()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"fraction": 1.0}, ValueError, "Invalid fraction: 1.0"),
        ({"fraction": -0.1}, ValueError, "Invalid fraction: -0.1"),
        ({"fraction": True}, TypeError, "Invalid fraction: True"),
        ({"fraction": 0.5, "scope": "row"}, ValueError, "Invalid scope: 'row'"),
        ({"fraction": 0.5, "ignore": [1]}, TypeError, "Invalid ignore: element of type int"),
        ({"fraction": 0.5, "mask": "m"}, TypeError, "Invalid mask: str"),
    ],
)
def test_invalid_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        l1_structured_prune(mlp(), **kwargs)


def test_model_without_prunable_layers_is_rejected():
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        neuron_l1_norms(nn.Sequential(nn.ReLU()))
    model = mlp()
    with pytest.raises(ValueError, match="every Linear/Conv2d layer is ignored"):
        l1_structured_prune(model, 0.5, ignore=[model[0], model[2], model[4]])


class ResidualNet(nn.Module):
    """stem 2→6 (+BN) → [conv 6→4, BN, ReLU, conv 4→6, BN] + shortcut → pool → fc 6→3."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv1, self.bn1 = nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def dead_rows(layer):
    return [k for k in range(layer.weight.shape[0]) if not layer.weight[k].any()]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_groups_scope_prunes_residual_channels_in_every_producer(seed):
    torch.manual_seed(seed)
    model = ResidualNet().eval()
    x = torch.zeros(1, 2, 8, 8)
    layered = ResidualNet().eval()
    layered.load_state_dict(model.state_dict())
    # 10 prunable groups: 6 stream channels (stem + conv2 rows), 4 inside the block.
    alive = l1_structured_prune(model, 0.5, scope="groups", example_input=x)
    stream, inner = dead_rows(model.stem), dead_rows(model.conv1)
    assert dead_rows(model.conv2) == stream  # the stream channel is dead in both producers
    assert len(stream) + len(inner) == 5
    assert alive == {"stem": 6 - len(stream), "conv1": 4 - len(inner), "conv2": 6 - len(stream)}
    small = simplify(model, x)
    assert small.get_submodule("stem").out_channels == 6 - len(stream)
    assert small.get_submodule("conv1").out_channels == 4 - len(inner)
    inputs = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(inputs)
        assert (small(inputs) - y).abs().max() <= 1e-5 * y.abs().max()
    # Layer by layer, a stream channel dead in one producer only is not removable.
    l1_structured_prune(layered, 0.5, scope="layer")
    both = set(dead_rows(layered.stem)) & set(dead_rows(layered.conv2))
    assert simplify(layered, x).get_submodule("stem").out_channels == 6 - len(both)
    with pytest.raises(ValueError, match="scope='groups' needs an input batch"):
        l1_structured_prune(model, 0.5, scope="groups")
