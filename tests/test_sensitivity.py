"""Neuron sensitivity against brute-force per-sample, per-class autograd loops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuronwise.sensitivity import NeuronActivations, neuron_sensitivity


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 5)
        self.fc2 = nn.Linear(5, classes)

    def forward(self, x):
        x = F.max_pool2d(torch.tanh(self.conv(x)), 2)
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def per_sample_class_grads(model, x):
    """g[name][n, c] = ∂y_{n,c}/∂z_n for every hooked z, one backward per (sample, class)."""
    acts = NeuronActivations(model)
    y = model(x)
    zs = dict(acts.outputs)
    grads = {name: torch.zeros(y.shape[0], y.shape[1], *z.shape[1:]) for name, z in zs.items()}
    for n in range(y.shape[0]):
        for c in range(y.shape[1]):
            g = torch.autograd.grad(y[n, c], list(zs.values()), retain_graph=True)
            for name, gi in zip(zs, g):
                grads[name][n, c] = gi[n]
    acts.remove()
    return grads


def channel_mean(t):
    """Mean over samples and positions of (N, K, *S)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1).mean(dim=1)


@pytest.fixture
def model_and_input():
    model = SmallCNN()
    return model, torch.randn(4, 2, 8, 8)


def test_lower_bound_matches_brute_force(model_and_input):
    model, x = model_and_input
    grads = per_sample_class_grads(model, x)
    with NeuronActivations(model) as acts:
        s = neuron_sensitivity(model(x), acts, "lower-bound")
    assert set(s) == {"conv", "fc1", "fc2"}
    for name, g in grads.items():
        expected = channel_mean(g.sum(dim=1).abs()) / 3
        torch.testing.assert_close(s[name], expected, rtol=1e-5, atol=1e-7)


def test_full_matches_brute_force_and_batch_mean(model_and_input):
    model, x = model_and_input
    grads = per_sample_class_grads(model, x)
    with NeuronActivations(model) as acts:
        logits = model(x)
        s = neuron_sensitivity(logits, acts, "full")
        s_mean = neuron_sensitivity(logits, acts, "full", batch_mean=True)
    for name, g in grads.items():
        expected = channel_mean(g.abs().sum(dim=1)) / 3
        torch.testing.assert_close(s[name], expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(s_mean[name], expected / x.shape[0], rtol=1e-5, atol=1e-8)
    # The lower bound really is one: |Σ_c g| ≤ Σ_c |g|.
    with NeuronActivations(model) as acts:
        lower = neuron_sensitivity(model(x), acts, "lower-bound")
    for name in s:
        assert torch.all(lower[name] <= s[name] + 1e-7)


def test_lower_bound_hand_computed_linear_net():
    # y = W2 (W1 x): ∂Σ_c y_c/∂z1_k = Σ_c W2[c, k] for every sample.
    net = nn.Sequential(nn.Linear(2, 3, bias=False), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -0.5]]))
    with NeuronActivations(net) as acts:
        s = neuron_sensitivity(net(torch.randn(5, 2)), acts, num_classes=4)
    torch.testing.assert_close(s["0"], torch.tensor([4.0, 1.0, 0.0]) / 4)
    torch.testing.assert_close(s["1"], torch.full((2,), 0.25))


def test_local_is_sign_of_mean_preactivation():
    net = nn.Linear(1, 3, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0], [-1.0], [0.0]]))
    x = torch.tensor([[2.0], [-1.0]])  # mean z = [0.5, -0.5, 0]
    with NeuronActivations(net) as acts:
        net(x)
        s = neuron_sensitivity(None, acts, "local")
    assert torch.equal(s[""], torch.tensor([1.0, 0.0, 0.0]))


def test_parameter_grads_untouched_and_loss_grads_plain(model_and_input):
    model, x = model_and_input
    target = torch.tensor([0, 1, 2, 0])
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), target).backward()
    with NeuronActivations(model) as acts:
        logits = model(x)
        neuron_sensitivity(logits, acts, "full")
        neuron_sensitivity(logits, acts, "lower-bound")
        assert all(p.grad is None for p in model.parameters())
        F.cross_entropy(logits, target).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_activations_hooks_record_only_grad_forwards_and_remove_cleanly():
    model = SmallCNN()
    acts = NeuronActivations(model, modules=(nn.Linear,))
    with torch.no_grad():
        model(torch.randn(1, 2, 8, 8))
    assert acts.outputs == {}
    model(torch.randn(1, 2, 8, 8))
    assert set(acts.outputs) == {"fc1", "fc2"}
    acts.remove()
    assert acts.outputs == {}
    assert all(not m._forward_hooks for m in model.modules())


def test_linear_on_sequences_uses_last_dimension():
    net = nn.Linear(3, 2)
    x = torch.randn(4, 5, 3)
    with NeuronActivations(net) as acts:
        z = net(x)
        s = neuron_sensitivity(None, acts, "local")
    assert torch.equal(s[""], (z.detach().mean(dim=(0, 1)) > 0).float())


def test_validation_messages(model_and_input):
    model, x = model_and_input
    with NeuronActivations(model) as acts:
        with pytest.raises(ValueError, match="Invalid variant: 'loss'"):
            neuron_sensitivity(model(x), acts, "loss")
        with pytest.raises(ValueError, match=r"Invalid logits: shape None"):
            neuron_sensitivity(None, acts)
    with pytest.raises(ValueError, match="nothing recorded"):
        neuron_sensitivity(torch.zeros(1, 3), {})
    with pytest.raises(ValueError, match="no module of type"):
        NeuronActivations(nn.ReLU())
