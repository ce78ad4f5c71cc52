"""NEq's real backward savings: active-row gradients, the switch-over rule, avoidable FLOPs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuronwise import models
from neuronwise.neq import NEq
from neuronwise.neq.backward import (
    ActiveRowsGrad,
    ActiveRowsHook,
    avoidable_backward_flops,
    split_pays,
)

# ---------------------------------------------------------------- avoidable FLOPs


def conv_bn_linear() -> nn.Sequential:
    # Forward ops (§5, batch 1, 5×5 input): conv 1→2 k3 → 2×3×3 = 18 outputs, 18·(9+1) = 180;
    # BN 2·18 = 36; Linear 18·3 = 54.
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(18, 3))


@pytest.mark.parametrize(
    "frozen, avoidable",
    [
        ({}, 0),
        # Half the conv's weight gradient; BN's input gradient is still needed (conv trains), so
        # its parameter sums are too, and so is the Linear's input gradient.
        ({"0": 0.5, "1": 1.0}, 90),
        # Nothing upstream of BN trains: BN's parameter (36) and input (36) gradients go, and half
        # of its parameters are frozen anyway; the Linear's input gradient is still needed.
        ({"0": 1.0, "1": 0.5}, 180 + 36 + 18),
        # Only the classifier trains: everything but its weight gradient (54) is avoidable.
        ({"0": 1.0, "1": 1.0}, 180 + 72 + 54),
    ],
)
def test_avoidable_backward_flops_by_hand(frozen, avoidable):
    model = conv_bn_linear()
    # Dense backward: conv weight 180 (its input needs no gradient), BN 2·36, Linear 2·54.
    result = avoidable_backward_flops(model, torch.randn(1, 1, 5, 5), frozen)
    assert result == {"dense": 180 + 72 + 108, "avoidable": avoidable}


def test_avoidable_backward_flops_residual_net_and_model_untouched():
    model = models.create("resnet20", num_classes=10, in_channels=3, image_size=32)
    model.train()
    model.layer1[0].bn1.eval()
    model.conv1.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    hooked = [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) and name != "classifier"
    ]
    result = avoidable_backward_flops(model, torch.randn(2, 3, 32, 32), dict.fromkeys(hooked, 1.0))
    # Everything but the classifier's weight gradient, 64·10 multiply-adds.
    assert result["dense"] - result["avoidable"] == 640
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes


def test_avoidable_backward_flops_rejects_bad_frozen():
    model = conv_bn_linear()
    x = torch.randn(1, 1, 5, 5)
    with pytest.raises(ValueError, match="Invalid frozen layer: 'nope'"):
        avoidable_backward_flops(model, x, {"nope": 0.5})
    with pytest.raises(ValueError, match="Invalid frozen fraction for '0'"):
        avoidable_backward_flops(model, x, {"0": 1.5})


# ---------------------------------------------------------------- switch-over rule


def pays(module, active, shape, needs_input=True):
    x = torch.randn(shape, device=module.weight.device).requires_grad_(needs_input)
    with torch.no_grad():
        output = module(x)
    return split_pays(module, active, x, output)


def test_split_pays_linear_cost_model():
    layer = nn.Linear(800, 500)
    # P·K·A + 16·K·R + 24·(K·A + P·A) + 2**22 < 0.9·P·K·R. 200 active: 18.5 M vs 0.9·12.8 M at
    # P = 32, 30.9 M vs 0.9·40 M at P = 100; 400 active at P = 100: 51 M.
    assert not pays(layer, 200, (32, 800))
    assert pays(layer, 200, (100, 800))
    assert not pays(layer, 400, (100, 800))
    assert pays(layer, 50, (4, 25, 800))  # positions count as samples
    # No first-layer exception for Linear: 1 of 500 rows at 2 samples does not pay.
    assert not pays(layer, 1, (2, 800), needs_input=False)


@pytest.mark.parametrize("capability, block", [("AVX512", 16), ("AVX2", 8)])
def test_split_pays_conv_blocks_and_first_layer(monkeypatch, capability, block):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    conv = nn.Conv2d(20, 50, 5)  # K = 500, P = 32·8·8 = 2048
    assert pays(conv, 16, (32, 20, 12, 12)) and not pays(conv, 49, (32, 20, 12, 12))
    # 8 of 16 rows fill one of two blocks of 8, but the one block of 16 all rows fill.
    assert pays(nn.Conv2d(64, 16, 3, padding=1), 8, (32, 64, 8, 8)) == (block == 8)
    # A first Conv2d (no input gradient) splits with up to a quarter of its rows active.
    first = nn.Conv2d(3, 16, 3)
    assert pays(first, 4, (2, 3, 8, 8), needs_input=False)
    assert not pays(first, 5, (2, 3, 8, 8), needs_input=False)
    assert not pays(first, 4, (2, 3, 8, 8))


def test_split_pays_never_for_channels_last_conv_outputs():
    conv = nn.Conv2d(20, 50, 5)
    assert pays(conv, 16, (32, 20, 12, 12))
    conv.to(memory_format=torch.channels_last)  # its output is NHWC too
    assert not pays(conv, 16, (32, 20, 12, 12))
    first = nn.Conv2d(3, 16, 3).to(memory_format=torch.channels_last)
    assert not pays(first, 4, (2, 3, 8, 8), needs_input=False)


def test_split_pays_other_devices_share():
    with torch.device("meta"):
        conv = nn.Conv2d(4, 16, 3)
    assert pays(conv, 8, (2, 4, 8, 8)) and not pays(conv, 9, (2, 4, 8, 8))


# ---------------------------------------------------------------- active-row backward


LAYERS = {
    "conv": lambda: (nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2), (2, 3, 9, 9)),
    "conv-no-bias": lambda: (nn.Conv2d(3, 6, (3, 1), padding=(1, 0), bias=False), (2, 3, 5, 5)),
    "linear-3d": lambda: (nn.Linear(5, 6), (2, 4, 5)),
}


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("needs_input", [True, False])
@pytest.mark.parametrize("kind", LAYERS)
def test_active_rows_grad_equals_masked_autograd(kind, needs_input, split):
    torch.manual_seed(0)
    layer, shape = LAYERS[kind]()
    x = torch.randn(shape).requires_grad_(needs_input)
    active = torch.tensor([1, 4, 5])
    frozen = torch.ones(6, dtype=torch.bool)
    frozen[active] = False
    reference = copy.deepcopy(layer)
    out = reference(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected_x = x.grad.clone() if needs_input else None
    x.grad = None
    conv = None
    if isinstance(layer, nn.Conv2d):
        conv = (list(layer.stride), list(layer.padding), list(layer.dilation))
    out = ActiveRowsGrad.apply(layer(x).detach(), x, layer.weight, layer.bias, active, conv, split)
    out.backward(grad)
    if needs_input:
        torch.testing.assert_close(x.grad, expected_x)
    for p, r in ((layer.weight, reference.weight), (layer.bias, reference.bias)):
        if p is None:
            continue
        torch.testing.assert_close(p.grad[active], r.grad[active])
        assert not p.grad[frozen].any()


def test_hook_without_mask_leaves_unsplit_layers_to_autograd():
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    x = torch.randn(3, 8)
    active = torch.arange(5)  # 5 of 6 rows at 3 samples: the split does not pay
    hook = ActiveRowsHook(active, mask_unsplit=False)
    out = layer(x)
    assert hook(layer, (x,), out) is None
    masked = ActiveRowsHook(active)(layer, (x,), layer(x))
    assert masked.grad_fn is not None and "ActiveRowsGrad" in type(masked.grad_fn).__name__
    masked.sum().backward()
    assert not layer.weight.grad[5].any() and layer.weight.grad[:5].abs().sum() > 0


def test_neq_half_frozen_lenet5_splits_and_equals_masked_reference():
    """50 % frozen at batch 32: conv2 splits; conv1 and fc1 keep autograd's backward (not worth it)."""
    torch.manual_seed(0)
    base = models.create("lenet5", num_classes=10, in_channels=1, image_size=28)
    probe = torch.randn(4, 1, 28, 28)
    runs = []
    for skip in (True, False):
        model = copy.deepcopy(base)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        neq = NEq(model, probe, selection="random", trained_fraction=0.5, skip_frozen_grads=skip)
        neq.attach(optimizer)
        runs.append((model, optimizer, neq))
    g = torch.Generator().manual_seed(1)
    for epoch in range(3):
        x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
        for model, optimizer, neq in runs:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if neq.skip_frozen_grads and epoch > 0:
                # conv2 split: its frozen rows got no gradient; conv1's are masked by the optimizer.
                for name, split in (("conv2", True), ("conv1", False), ("fc1", False)):
                    grad = model.get_submodule(name).weight.grad
                    assert bool(grad[neq.frozen[name]].any()) != split
                    assert grad[~neq.frozen[name]].abs().sum() > 0
            optimizer.step()
            neq.step()
        for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
