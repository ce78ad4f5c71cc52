"""Counting conventions, checked against values computed by hand (METHODS.md §5, §7, §8)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from neuronwise import metrics, models


class Tiny(nn.Module):
    """conv 2→4 k3 (bias) on 2×4×4 → 4×2×2, BN2d, ReLU, flatten, LayerNorm(16), FC 16→3, a scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.ln = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 3)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.fc(self.ln(self.flatten(self.relu(self.bn(self.conv(x)))))) * self.scale


@pytest.fixture
def tiny() -> Tiny:
    """Every parameter 0.5, then conv channel 1 (18 weights), fc.weight[0, 0] and γ_2 zeroed."""
    model = Tiny()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(0.5)
        model.conv.weight[1] = 0
        model.fc.weight[0, 0] = 0
        model.bn.weight[2] = 0
    return model


X = torch.randn(1, 2, 4, 4)
# Hand counts for Tiny. paper: conv 72+4, fc 48+3; lobster-log: + BN 8; all: + LN 32 + scale 1.
PAPER, LOBSTER_LOG, ALL = 127, 135, 168
# Forward FLOPs: conv 16·(2·9+1), BN 2·16, LN 2·16, fc 16·3.
FLOPS = {"conv": 304, "bn": 32, "ln": 32, "fc": 48}


def _row_zeroed_linear() -> nn.Linear:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight[0] = 0
    return layer


def test_linear_with_a_zeroed_row():
    layer = _row_zeroed_linear()
    x = torch.randn(1, 3)
    assert metrics.count_parameters(layer) == 8
    assert metrics.count_nonzero(layer) == 5
    assert metrics.count_neurons(layer) == {"": (1, 2), "total": (1, 2)}
    assert metrics.forward_flops(layer, x) == {"": 6, "total": 6}
    assert metrics.macs(layer, x) == 6
    assert metrics.macs(layer, x, nonzero=True) == 3
    assert metrics.backward_flops(layer, x) == 12
    assert metrics.backward_flops(layer, x, frozen={"": 0.5}) == 6


@pytest.mark.parametrize(
    ("convention", "total", "nonzero"),
    [
        ("paper", PAPER, PAPER - 19),
        ("lobster-log", LOBSTER_LOG, LOBSTER_LOG - 20),
        ("all", ALL, ALL - 20),
    ],
)
def test_parameter_conventions(tiny, convention, total, nonzero):
    assert metrics.count_parameters(tiny, convention) == total
    assert metrics.count_nonzero(tiny, convention) == nonzero
    report = metrics.sparsity_report(tiny, convention)
    assert report["total"] == total and report["nonzero"] == nonzero
    assert report["remaining_percent"] == pytest.approx(100 * nonzero / total)
    assert report["pruned_percent"] == pytest.approx(100 - 100 * nonzero / total)
    assert report["compression_ratio"] == pytest.approx(total / nonzero)


def test_default_convention_is_paper(tiny):
    assert metrics.count_parameters(tiny) == PAPER
    assert metrics.count_nonzero(tiny) == PAPER - 19


def test_shared_parameter_counts_once():
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    model = nn.Sequential(first, second)
    assert metrics.count_parameters(model, "paper") == 9 + 3 + 3
    assert metrics.count_parameters(model, "all") == 9 + 3 + 3


def test_sparsity_report_edges():
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    report = metrics.sparsity_report(layer)
    assert report["remaining_percent"] == 0.0 and report["pruned_percent"] == 100.0
    assert report["compression_ratio"] == math.inf
    with pytest.raises(ValueError, match="ReLU has no parameters under convention 'paper'"):
        metrics.sparsity_report(nn.ReLU())


@pytest.mark.parametrize(
    "function", [metrics.count_parameters, metrics.count_nonzero, metrics.sparsity_report]
)
def test_unknown_parameter_convention(tiny, function):
    with pytest.raises(
        ValueError,
        match=r"Invalid convention: 'papers' \(expected one of \('paper', 'all', 'lobster-log'\)\)",
    ):
        function(tiny, "papers")


def test_neuron_conventions(tiny):
    assert metrics.count_neurons(tiny) == {"conv": (3, 4), "fc": (3, 3), "total": (6, 7)}
    # serene-log adds γ entries: γ_2 is zero.
    assert metrics.count_neurons(tiny, "serene-log") == {
        "conv": (3, 4),
        "bn": (3, 4),
        "fc": (3, 3),
        "total": (9, 11),
    }
    # neq counts channels, pruned or not; LayerNorm(16) holds 16.
    assert metrics.count_neurons(tiny, "neq") == {
        "conv": (4, 4),
        "bn": (4, 4),
        "ln": (16, 16),
        "fc": (3, 3),
        "total": (27, 27),
    }
    with pytest.raises(ValueError, match=r"Invalid convention: 'lobster'"):
        metrics.count_neurons(tiny, "lobster")


def test_neuron_alive_ignores_bias():
    layer = _row_zeroed_linear()
    with torch.no_grad():
        layer.bias.fill_(1.0)
    assert metrics.count_neurons(layer)["total"] == (1, 2)


def test_serene_log_conv_transpose_channels_match_a_forward_probe():
    layer = nn.ConvTranspose2d(4, 6, 2, groups=2, bias=False)
    with torch.no_grad():
        layer.weight[0:2, 1] = 0  # output channel 1 (group 0) dead
        layer.weight[2:4, 0] = 0  # output channel 3 (group 1) dead
        layer.weight[0, 2] = 0  # output channel 2 keeps input 1: alive
    assert metrics.count_neurons(layer, "serene-log")["total"] == (4, 6)
    # Reference: a channel is dead exactly when its output is zero for any input.
    output = layer(torch.randn(3, 4, 5, 5))
    alive = output.transpose(0, 1).reshape(6, -1).ne(0).any(dim=1)
    assert alive.tolist() == [True, False, True, False, True, True]
    assert metrics.count_neurons(layer)["total"] == (0, 0)


def test_neq_counts_resnet32_neurons():
    # METHODS.md §5: ResNet-32 has 2,282 NEq neurons = 1,136 conv + 1,136 BN + 10 classifier.
    model = models.create("resnet32", in_channels=3, image_size=32)
    assert metrics.count_neurons(model, "neq")["total"] == (2282, 2282)


def test_forward_flops_by_hand(tiny):
    assert metrics.forward_flops(tiny, X) == {**FLOPS, "total": 416}
    # Only the first sample counts.
    assert metrics.forward_flops(tiny, X.repeat(5, 1, 1, 1))["total"] == 416


def test_forward_flops_grouped_strided_conv_without_bias():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False)
    # Output 6×4×4 = 96 values, each (4/2)·3·3 = 18 multiply-adds.
    assert metrics.forward_flops(conv, torch.randn(1, 4, 8, 8))["total"] == 96 * 18
    assert metrics.macs(conv, torch.randn(1, 4, 8, 8)) == 96 * 18


def test_module_called_twice_counts_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(self.fc(x))

    assert metrics.forward_flops(Twice(), torch.randn(1, 3)) == {"fc": 18, "total": 18}


def test_macs_dense_and_nonzero(tiny):
    # Dense: conv 16·18 + fc 16·3. Non-zero: conv 4 positions × 54 weights + fc 1 × 47 weights.
    assert metrics.macs(tiny, X) == 288 + 48
    assert metrics.macs(tiny, X, nonzero=True) == 4 * 54 + 47


def test_measurement_restores_modes_and_removes_hooks(tiny):
    tiny.train()
    tiny.ln.eval()
    running_mean = tiny.bn.running_mean.clone()
    metrics.forward_flops(tiny, X)
    metrics.macs(tiny, X, nonzero=True)
    assert tiny.training and tiny.bn.training and not tiny.ln.training
    # Measured in eval mode: BatchNorm statistics did not move.
    assert torch.equal(tiny.bn.running_mean, running_mean)
    assert all(not m._forward_hooks for m in tiny.modules())


def test_measurement_cleans_up_when_forward_fails(tiny):
    tiny.train()
    with pytest.raises(RuntimeError):
        metrics.forward_flops(tiny, torch.randn(1, 3, 4, 4))
    assert all(m.training for m in tiny.modules())
    assert all(not m._forward_hooks for m in tiny.modules())


def test_example_input_is_validated(tiny):
    with pytest.raises(TypeError, match="Invalid example_input: list"):
        metrics.forward_flops(tiny, [X])
    with pytest.raises(ValueError, match="empty batch"):
        metrics.macs(tiny, X[:0])


def test_backward_flops_with_frozen_fractions(tiny):
    assert metrics.backward_flops(tiny, X) == 2 * 416
    # conv 3/4 trained, fc fully frozen, BN and LN trained.
    assert metrics.backward_flops(tiny, X, frozen={"conv": 0.25, "fc": 1.0}) == 2 * (228 + 32 + 32)
    assert metrics.backward_flops(tiny, X, frozen={name: 1.0 for name in FLOPS}) == 0


@pytest.mark.parametrize(
    ("frozen", "message"),
    [
        ({"relu": 0.5}, r"Invalid frozen layer: 'relu'"),
        ({"conv": 1.5}, r"Invalid frozen fraction for 'conv': 1.5 \(expected in \[0, 1\]\)"),
        ({"conv": -0.1}, r"Invalid frozen fraction for 'conv': -0.1"),
        ({"conv": math.nan}, r"Invalid frozen fraction for 'conv': nan"),
    ],
)
def test_backward_flops_rejects_bad_frozen(tiny, frozen, message):
    with pytest.raises(ValueError, match=message):
        metrics.backward_flops(tiny, X, frozen=frozen)


def test_backward_flops_resnet32_cifar():
    # METHODS.md §5: NEq's ResNet-32 CIFAR total, nothing frozen, batch 1.
    model = models.create("resnet32", in_channels=3, image_size=32)
    assert metrics.backward_flops(model, torch.randn(1, 3, 32, 32)) == 138_937_600


def test_summary_and_table(tiny):
    result = metrics.summary(tiny, X)
    assert result == {
        "params_paper": PAPER,
        "nonzero_params_paper": PAPER - 19,
        "params_all": ALL,
        "nonzero_params_all": ALL - 20,
        "neurons_alive": 6,
        "neurons_total": 7,
        "forward_flops": 416,
        "macs": 336,
        "nonzero_macs": 263,
    }
    lines = metrics.format_summary(result).splitlines()
    assert lines[0].split() == ["quantity", "value", "convention"]
    rows = [re.match(r"^(\S+(?: \S+)*) +(\S+)  (\S.*)$", line) for line in lines]
    assert len(rows) == 10 and all(rows)
    # Labels left-aligned, values right-aligned, conventions in one column.
    assert len({row.end(2) for row in rows}) == 1 and len({row.start(2) for row in rows}) > 1
    assert [row[1] for row in rows[1:3]] == ["parameters", "non-zero parameters"]
    assert (rows[1][2], rows[2][2]) == ("127", "108") and rows[1][3].startswith("paper: ")
    assert " 148  all: every parameter" in lines[4]
    assert " 416  thop: " in lines[7]
    big = metrics.format_summary({**result, "macs": 68_862_592})
    assert "68,862,592  Conv2d+Linear, no bias" in big
    with pytest.raises(ValueError, match=r"missing \['macs'\]"):
        metrics.format_summary({k: v for k, v in result.items() if k != "macs"})
