"""PSP-entropy: hand-computed bits, clamping, batching invariance, a numpy reference, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import neuronwise.entropy as entropy_module
from neuronwise.entropy import PSPEntropy, psp_entropy


def h(p: float) -> float:
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


H_CLAMP = h(1e-4)  # a unit always on (or off) for one class


def signs_model() -> nn.Sequential:
    # z0 = x0, z1 = x1, z2 = x0 + x1: signs are readable from the inputs.
    layer = nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        layer.bias.zero_()
    return nn.Sequential(layer)


SIGNS_X = torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0]])
SIGNS_Y = torch.tensor([0, 0, 1, 1])


def test_hand_computed_bits():
    result = psp_entropy(signs_model(), [(SIGNS_X, SIGNS_Y)], num_classes=2)
    layer = result["0"]
    # class 0: z = (1,-1,0), (1,1,2); class 1: z = (-1,1,0), (-1,-1,-2); z = 0 counts as off.
    expected_p_on = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(layer.p_on, expected_p_on, rtol=0, atol=0)
    expected = torch.tensor([2 * H_CLAMP, 2.0, 1.0 + H_CLAMP], dtype=torch.float64)
    torch.testing.assert_close(layer.per_unit, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(layer.per_class.sum(dim=1), expected, rtol=1e-12, atol=0)
    assert layer.mean == pytest.approx((3 * H_CLAMP + 3.0) / 3, rel=1e-12)
    assert layer.class_counts.tolist() == [2, 2]
    assert layer.unit_shape == (3,)


def test_always_on_unit_uses_the_clamp_exactly():
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, -1.0, 0.0]))  # always on, always off, always 0 (off)
    x = torch.randn(30, 4)
    y = torch.arange(30) % 3
    layer = psp_entropy(model, [(x, y)])[""]
    assert H_CLAMP == pytest.approx(0.00147303352832816, rel=1e-12)
    torch.testing.assert_close(
        layer.per_unit, torch.full((3,), 3 * H_CLAMP, dtype=torch.float64), rtol=1e-12, atol=0
    )


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


@pytest.fixture
def cnn_data():
    torch.manual_seed(1)
    model = TinyCNN()
    x = torch.randn(60, 1, 7, 7)
    y = torch.randint(0, 5, (60,))
    return model, x, y


def batches(x, y, size, order=None):
    if order is not None:
        x, y = x[order], y[order]
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def test_invariant_to_batch_size_and_order(cnn_data):
    model, x, y = cnn_data
    reference = psp_entropy(model, batches(x, y, 60))
    for size, order in [(1, None), (7, None), (13, torch.randperm(60))]:
        other = psp_entropy(model, batches(x, y, size, order))
        for name, layer in reference.items():
            assert torch.equal(other[name].per_unit, layer.per_unit)
            assert torch.equal(other[name].class_counts, layer.class_counts)


def test_matches_brute_force_numpy_reference(cnn_data):
    model, x, y = cnn_data
    model.eval()
    outputs = {}
    hooks = [
        getattr(model, n).register_forward_hook(
            lambda m, a, out, n=n: outputs.__setitem__(n, out.detach().flatten(1).numpy())
        )
        for n in ("conv1", "conv2", "fc")
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    labels = y.numpy()

    result = psp_entropy(model, batches(x, y, 16))
    assert list(result) == ["conv1", "conv2", "fc"]
    for name, z in outputs.items():
        total = np.zeros(z.shape[1])
        for c in range(5):
            on = (z[labels == c] > 0).mean(axis=0)
            p = np.clip(on, 1e-4, 0.9999)
            q = np.clip(1 - on, 1e-4, 0.9999)
            total += -(p * np.log2(p) + q * np.log2(q))
        np.testing.assert_allclose(result[name].per_unit.numpy(), total, rtol=1e-12)
        assert result[name].per_class.shape == (z.shape[1], 5)
    assert result["conv1"].unit_shape == (3, 5, 5)


def test_counts_do_not_grow_with_batches(cnn_data):
    model, x, y = cnn_data
    metric = PSPEntropy(model)

    def sizes():
        layers = metric.state_dict()["layers"]
        return {n: (e["on"].shape, e["samples"].shape) for n, e in layers.items()}

    metric.update(x[:4], y[:4])
    after_one = sizes()
    for _ in range(49):
        metric.update(x[:4], y[:4])
    assert sizes() == after_one
    assert after_one["conv1"] == ((5, 75), (5,))
    assert metric.compute()["fc"].class_counts.sum() == 200


def test_missing_class_is_skipped():
    two = psp_entropy(signs_model(), [(SIGNS_X, SIGNS_Y)], num_classes=2)["0"]
    three = psp_entropy(signs_model(), [(SIGNS_X, SIGNS_Y)], num_classes=3)["0"]
    assert torch.equal(three.per_unit, two.per_unit)
    assert three.class_counts.tolist() == [2, 2, 0]
    assert torch.isnan(three.per_class[:, 2]).all() and torch.isnan(three.p_on[:, 2]).all()
    assert torch.equal(three.per_class[:, :2], two.per_class)


def test_restores_mode_and_leaves_no_hooks(cnn_data):
    model, x, y = cnn_data
    model.train()
    model.fc.eval()
    stats = model.bn.running_mean.clone()
    psp_entropy(model, batches(x, y, 30))
    assert model.training and model.conv1.training and not model.fc.training
    assert torch.equal(model.bn.running_mean, stats)  # ran in eval mode
    assert all(not m._forward_hooks for m in model.modules())


def test_selected_layers_and_state_dict_round_trip(cnn_data):
    model, x, y = cnn_data
    metric = PSPEntropy(model, layers=["conv2"], num_classes=5)
    metric.update(x, y)
    restored = PSPEntropy(model, layers=["conv2"], num_classes=5)
    restored.load_state_dict(metric.state_dict())
    assert list(restored.compute()) == ["conv2"]
    assert torch.equal(restored.compute()["conv2"].per_unit, metric.compute()["conv2"].per_unit)
    metric.reset()
    with pytest.raises(RuntimeError, match="conv2"):
        metric.compute()


def test_counts_go_through_all_reduce_sum(cnn_data, monkeypatch):
    # Stands in for a second rank that saw the same data: every count doubles.
    model, x, y = cnn_data
    monkeypatch.setattr(entropy_module, "all_reduce_sum", lambda t: t.mul_(2))
    metric = PSPEntropy(model)
    metric.update(x, y)
    result = metric.compute()
    assert torch.equal(result["fc"].class_counts, 2 * torch.bincount(y, minlength=5))
    # p_on is a ratio of two doubled counts; the stored counts were not doubled in place.
    assert metric.state_dict()["layers"]["fc"]["samples"].sum() == 60


def test_bad_inputs(cnn_data):
    model, x, y = cnn_data
    with pytest.raises(ValueError, match=r"valid: \['conv1', 'conv2', 'fc'\]"):
        PSPEntropy(model, layers=["conv3"])
    with pytest.raises(ValueError, match="'bn'"):
        PSPEntropy(model, layers=["bn"])
    with pytest.raises(ValueError, match="Invalid num_classes: 0"):
        PSPEntropy(model, num_classes=0)
    with pytest.raises(ValueError, match="no Linear"):
        PSPEntropy(nn.Conv2d(1, 2, 3))
    with pytest.raises(TypeError, match="Tensor"):
        psp_entropy(model, [x])
    with pytest.raises(TypeError, match="length 3"):
        psp_entropy(model, [(x, y, y)])
    with pytest.raises(ValueError, match=r"range \[0, 5\]"):
        psp_entropy(model, [(x[:2], torch.tensor([0, 5]))])
    with pytest.raises(ValueError, match="1-D integer"):
        psp_entropy(model, [(x[:2], torch.zeros(2, 5))])
    assert all(not m._forward_hooks for m in model.modules())


def test_counts_stay_exact_under_autocast():
    # 601 is not a bfloat16 number: a count rounded through bf16 would come back as 600 or 602.
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, -1.0]))
    x = torch.randn(601, 2)
    y = torch.zeros(601, dtype=torch.long)
    metric = PSPEntropy(model, num_classes=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        metric.update(x, y)
    counts = metric.state_dict()["layers"][""]
    assert counts["on"][0].tolist() == [601, 0]
    assert counts["samples"].tolist() == [601, 0]
