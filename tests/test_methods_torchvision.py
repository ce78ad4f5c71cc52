"""The four methods run on torchvision's families (shared ReLU modules, BN, depthwise and grouped
convs, concatenations, squeeze-and-excitation): one step each, checked against what it must do."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neuronwise as nw

try:
    from neuronwise.integrations.torchvision import models

    tv = models()
except ImportError as error:
    pytest.skip(f"torchvision not available: {error}", allow_module_level=True)

FAMILIES = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "googlenet"]


def build(name):
    extra = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    torch.manual_seed(0)
    return getattr(tv, name)(num_classes=10, **extra)


def layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@pytest.mark.parametrize("name", FAMILIES)
def test_serene_lobster_neq_psp_one_step(name):
    model = build(name)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for make in (lambda: nw.SeReNe(model, lam=1e-2), lambda: nw.Lobster(model, lam=1e-2)):
        regularizer = make()
        optimizer.zero_grad()
        out = model(x)
        if isinstance(regularizer, nw.SeReNe):
            regularizer.compute(out)
        F.cross_entropy(out, y).backward()
        optimizer.step()
        before = copy.deepcopy(model.state_dict())
        regularizer.step()  # decays the insensitive parameters: something moves, nothing grows
        after = model.state_dict()
        moved = [k for k in before if not torch.equal(before[k], after[k])]
        assert moved
        assert all(after[k].abs().max() <= before[k].abs().max() for k in moved)
        if isinstance(regularizer, nw.SeReNe):
            regularizer.remove()
    neq = nw.NEq(model, x, eps=1e-3)
    neq.attach(optimizer)
    neq.start()
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        neq.step()
    assert 0.0 <= neq.frozen_fraction() <= 1.0
    neq.remove()
    entropy = nw.psp_entropy(model, [(x, y)], num_classes=10)
    assert set(entropy) == set(layers(model))  # one entry per layer, shared ReLUs or not
