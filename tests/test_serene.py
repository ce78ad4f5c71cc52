"""SeReNe: hand-computed update, masks, foreach equivalence, state round trip."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuronwise.pruning import ParameterMask, PruneOnPlateau
from neuronwise.serene import SeReNe


def linear_net():
    """y = W2 (W1 x + b1) + b2 with hand-chosen W2, so S1_k = |Σ_c W2[c, k]| / 2 exactly."""
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.25, -4.0]]))
        net[0].bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
        net[1].weight.copy_(torch.tensor([[0.5, 1.0, 0.25], [0.5, -0.8, -0.25]]))
        net[1].bias.copy_(torch.tensor([-0.1, 0.1]))
    return net


def test_update_hand_computed_and_biases_untouched():
    net = linear_net()
    w0, w1 = net[0].weight.clone(), net[1].weight.clone()
    b0, b1 = net[0].bias.clone(), net[1].bias.clone()
    reg = SeReNe(net, lam=0.1)
    sensitivity = reg.compute(net(torch.randn(4, 2)))
    # Column sums of W2 are [1.0, 0.2, 0.0]; α = 1/2; logits' own sensitivity is 1/2.
    torch.testing.assert_close(sensitivity["0"], torch.tensor([0.5, 0.1, 0.0]))
    reg.step()
    factor0 = 1 - 0.1 * torch.tensor([0.5, 0.9, 1.0])
    torch.testing.assert_close(net[0].weight, w0 * factor0[:, None])
    torch.testing.assert_close(net[1].weight, w1 * (1 - 0.1 * 0.5))
    assert torch.equal(net[0].bias, b0) and torch.equal(net[1].bias, b1)


def test_conv_rows_decay_together():
    conv = nn.Conv2d(1, 2, 3)
    net = nn.Sequential(conv, nn.Flatten(), nn.Linear(2 * 2 * 2, 1))
    with torch.no_grad():
        net[2].weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]))
    w = conv.weight.clone()
    reg = SeReNe(net, lam=0.5)
    reg.compute(net(torch.randn(3, 1, 4, 4)))
    reg.step()
    # Channel 0 reaches the output with derivative 1 at every position (S = 1), channel 1 not at all.
    torch.testing.assert_close(conv.weight[0], w[0])
    torch.testing.assert_close(conv.weight[1], w[1] * 0.5)


@pytest.mark.parametrize("variant", ["lower-bound", "full", "local"])
def test_pruned_parameters_stay_zero_and_grads_are_plain(variant):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))  # tanh passes gradient at 0
    with torch.no_grad():
        net[0].weight[2].zero_()
        net[0].bias[2] = 0.0
        net[2].weight[0, 1] = 0.0
    reference = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    reg = SeReNe(net, lam=1e-2, variant=variant, zeros_at_start="masked")
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for _ in range(3):
        opt.zero_grad()
        logits = net(x)
        reg.compute(logits)
        F.cross_entropy(logits, y).backward()
        reference.zero_grad()
        reference.load_state_dict(net.state_dict())
        F.cross_entropy(reference(x), y).backward()
        for p, q in zip(net.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
        opt.step()
        assert net[0].weight[2].abs().sum() > 0  # the optimizer moved them ...
        reg.step()
        assert torch.all(net[0].weight[2] == 0) and net[0].bias[2] == 0  # ... the mask did not
        assert net[2].weight[0, 1] == 0


def test_mask_shared_with_pruner_keeps_new_zeros():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    reg = SeReNe(net, lam=1e-3)

    def evaluate():
        with torch.no_grad():
            return F.cross_entropy(net(x), y).item()

    pruner = PruneOnPlateau(
        net, evaluate, patience=0, tolerance=0.5, modules=(nn.Linear, nn.Conv2d), mask=reg.mask
    )
    pruner.step(evaluate())
    pruned = [p == 0 for p in net.parameters()]
    assert sum(int(z.sum()) for z in pruned) > 0
    for _ in range(2):
        opt.zero_grad()
        logits = net(x)
        reg.compute(logits)
        F.cross_entropy(logits, y).backward()
        opt.step()
        reg.step()
    for p, z in zip(net.parameters(), pruned):
        assert torch.all(p[z] == 0)


def test_neuron_mask_zeroes_whole_rows():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight[1] = 0.0
    mask = ParameterMask(net, (nn.Linear, nn.Conv2d), "neurons", zeros_at_start="masked")
    reg = SeReNe(net, lam=0.0, mask=mask)
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[0].bias.add_(1.0)
    reg.compute(net(torch.randn(2, 3)))
    reg.step()
    assert torch.all(net[0].weight[1] == 0) and net[0].bias[1] == 0
    assert torch.all(net[0].weight[0] != 0)
    with pytest.raises(TypeError, match="Invalid mask"):
        SeReNe(net, lam=0.1, mask="rows")


def test_foreach_matches_loop():
    torch.manual_seed(2)
    nets = [
        nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)) for _ in "ab"
    ]
    nets[1].load_state_dict(nets[0].state_dict())
    with torch.no_grad():
        nets[0][0].weight[1, 0, 0, 0] = 0.0
        nets[1][0].weight[1, 0, 0, 0] = 0.0
    x = torch.randn(5, 1, 4, 4)
    for net, foreach in zip(nets, (True, False)):
        reg = SeReNe(net, lam=0.3, foreach=foreach)
        reg.compute(net(x))
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01)
        reg.step()
    for p, q in zip(*(net.parameters() for net in nets)):
        assert torch.equal(p, q)


def test_accumulation_averages_sensitivities():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 3))
    weights = [net[0].weight.clone(), net[2].weight.clone()]
    reg = SeReNe(net, lam=0.2)
    s_a = reg.compute(net(torch.randn(3, 2)))
    s_b = reg.compute(net(torch.randn(5, 2)))
    assert not torch.allclose(s_a["0"], s_b["0"])  # ReLU makes them input-dependent
    reg.step()
    for w, name, layer in zip(weights, ("0", "2"), (net[0], net[2])):
        factor = 1 - 0.2 * torch.relu(1 - (s_a[name] + s_b[name]) / 2)
        torch.testing.assert_close(layer.weight, w * factor[:, None])


def test_state_dict_round_trip():
    net = linear_net()
    twin = copy.deepcopy(net)
    reg = SeReNe(net, lam=0.05, variant="full")
    reg.compute(net(torch.randn(4, 2)))
    state = reg.state_dict()
    restored = SeReNe(twin, lam=1.0)
    restored.load_state_dict(state)
    assert restored.lam == 0.05 and restored.variant == "full"
    reg.step()
    restored.step()
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="missing keys"):
        restored.load_state_dict({"lam": 0.1})
    with pytest.raises(ValueError, match="modules \\['nope'\\] are not regularized here"):
        restored.load_state_dict({**state, "sums": {"nope": torch.zeros(1)}})


def test_validation_and_misuse():
    net = linear_net()
    with pytest.raises(ValueError, match=r"Invalid lam: -1.0 \(expected >= 0\)"):
        SeReNe(net, lam=-1.0)
    with pytest.raises(ValueError, match="Invalid variant: 'loss'"):
        SeReNe(net, lam=0.1, variant="loss")
    with pytest.raises(ValueError, match="Invalid foreach"):
        SeReNe(net, lam=0.1, foreach="yes")
    reg = SeReNe(net, lam=0.1)
    with pytest.raises(RuntimeError, match="call reg.compute"):
        reg.step()
    with pytest.raises(RuntimeError, match="no recorded activations"):
        reg.compute(torch.zeros(1, 2))
    reg.remove()
    assert all(not m._forward_hooks for m in net.modules())
