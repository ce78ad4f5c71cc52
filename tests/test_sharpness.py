"""Sharpness and loss-landscape slices: exact restoration, masks, scaling, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuronwise.sharpness import landscape_slice, sharpness


@pytest.fixture
def net():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight[:, :3] = 0.0  # pruned entries
        model[0].weight[5] = 0.0  # a fully pruned filter
    model.train()
    return model


@pytest.fixture
def loader():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    return [(x[:25], y[:25]), (x[25:], y[25:])]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_identical(model, before):
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_zero_noise_gives_zero_increase(net, loader):
    result = sharpness(net, loader, sigma=(0.0,), draws=3)
    assert result.mean == (0.0,) and result.std == (0.0,)
    with torch.no_grad():
        logits = net.eval()(torch.cat([b[0] for b in loader]))
    expected = nn.functional.cross_entropy(logits, torch.cat([b[1] for b in loader]))
    assert result.base_loss == pytest.approx(float(expected), rel=1e-6)


def test_model_restored_bit_identically(net, loader):
    before = snapshot(net)
    sharpness(net, loader, draws=2)
    landscape_slice(net, loader, alphas=[-1.0, 0.3])
    other = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    landscape_slice(net, loader, direction=other, alphas=[0.5, 2.0])
    assert_identical(net, before)
    assert net.training and net[1].training


def test_zeros_stay_zero_and_noise_scales_with_rms():
    # The loss is the squared perturbation itself: its expectation is Σ_tensors n_t·(σ·rms_t)².
    torch.manual_seed(4)
    model = nn.Linear(100, 60)
    with torch.no_grad():
        model.weight.mul_(5.0)
        model.weight[:, 50:] = 0.0
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    zeros = w0 == 0

    def loss_fn(m):
        assert (m.weight[zeros] == 0).all()
        return ((m.weight - w0) ** 2).sum() + ((m.bias - b0) ** 2).sum()

    sigma = 0.1
    result = sharpness(model, loss_fn, sigma=(sigma,), draws=10)
    rms_w = w0[~zeros].square().mean().sqrt()
    rms_b = b0.square().mean().sqrt()
    expected = (zeros.logical_not().sum() * rms_w**2 + 60 * rms_b**2) * sigma**2
    assert result.mean[0] == pytest.approx(float(expected), rel=0.05)

    dense = sharpness(
        model, lambda m: ((m.weight - w0) ** 2).sum(), sigma=(sigma,), only_nonzero=False
    )
    assert dense.mean[0] == pytest.approx(
        float(w0.square().mean() * w0.numel()) * sigma**2, rel=0.05
    )


def test_common_noise_across_sigmas():
    # Noise is ε·σ·rms with one ε per draw, so a quadratic loss scales exactly with σ².
    model = nn.Linear(5, 4)
    w0 = model.weight.detach().clone()
    result = sharpness(model, lambda m: ((m.weight - w0) ** 2).sum(), sigma=(0.1, 0.3), draws=2)
    torch.testing.assert_close(result.increases[1], 9 * result.increases[0], rtol=1e-5, atol=0)


def test_deterministic_for_a_seed(net, loader):
    first = sharpness(net, loader, draws=3, seed=7)
    again = sharpness(net, loader, draws=3, seed=7)
    other = sharpness(net, loader, draws=3, seed=8)
    assert torch.equal(first.increases, again.increases)
    assert not torch.equal(first.increases, other.increases)
    slice_a = landscape_slice(net, loader, seed=7)
    slice_b = landscape_slice(net, loader, seed=7)
    assert torch.equal(slice_a.losses, slice_b.losses)
    assert slice_a.alphas.numel() == 21


def test_landscape_between_a_model_and_itself_is_flat(net, loader):
    curve = landscape_slice(net, loader, direction=net)
    torch.testing.assert_close(curve.losses, curve.losses[:1].expand(21), rtol=1e-6, atol=0)
    assert curve.alphas[0] == -0.5 and curve.alphas[-1] == 1.5


def test_interpolation_reaches_both_endpoints(net, loader):
    other = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    other[1].running_mean.fill_(0.5)
    seen = []

    def loss_fn(m):
        seen.append((m[0].weight.clone(), m[1].running_mean.clone()))
        return 0.0

    net_w = net[0].weight.detach().clone()
    landscape_slice(net, loss_fn, direction=other, alphas=[0.0, 0.25, 1.0])
    assert torch.equal(seen[0][0], net_w)
    torch.testing.assert_close(seen[1][0], 0.75 * net_w + 0.25 * other[0].weight)
    assert torch.equal(seen[2][0], other[0].weight) and torch.equal(
        seen[2][1], other[1].running_mean
    )


def test_random_direction_is_filter_normalized(net):
    w0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    seen = []

    def loss_fn(m):
        seen.append({n: p.clone() for n, p in m.named_parameters()})
        return 0.0

    landscape_slice(net, loss_fn, alphas=[1.0])
    direction = {n: seen[0][n] - w0[n] for n in w0}
    for name, d in direction.items():
        if d.dim() == 1:
            assert torch.equal(d, torch.zeros_like(d)), name
            continue
        torch.testing.assert_close(d.norm(dim=1), w0[name].norm(dim=1), rtol=1e-5, atol=1e-6)
        assert (d[w0[name] == 0] == 0).all()
    assert torch.equal(direction["0.weight"][5], torch.zeros(6))


def test_bad_inputs(net, loader):
    with pytest.raises(ValueError, match="Invalid sigma"):
        sharpness(net, loader, sigma=(-0.1,))
    with pytest.raises(ValueError, match="Invalid draws: 0"):
        sharpness(net, loader, draws=0)
    with pytest.raises(TypeError, match="Invalid loss: int"):
        sharpness(net, 3)
    with pytest.raises(ValueError, match="Invalid direction: 'up'"):
        landscape_slice(net, loader, direction="up")
    with pytest.raises(ValueError, match="differ in shape"):
        landscape_slice(
            net,
            loader,
            direction=nn.Sequential(nn.Linear(6, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 3)),
        )
    with pytest.raises(TypeError, match="pair"):
        sharpness(net, [torch.zeros(2, 6)])
    before = snapshot(net)
    with pytest.raises(TypeError):
        sharpness(net, [(torch.zeros(2, 6), torch.zeros(2, dtype=torch.long), 1)])
    assert_identical(net, before)
