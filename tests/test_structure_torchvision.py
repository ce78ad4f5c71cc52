"""simplify on torchvision's own architectures, with half of every coupled channel group dead.

The models come from torchvision's model files (:mod:`neuronwise.integrations.torchvision`, which
works around its operator registration on CPU builds); without torchvision the tests skip.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_simplify import randomize_batchnorm
from torch import nn

from neuronwise.structure import channel_groups, simplify

try:
    from neuronwise.integrations.torchvision import models

    tv = models()
except ImportError as error:
    pytest.skip(f"torchvision not available: {error}", allow_module_level=True)

FAMILIES = [
    "resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
    "densenet121", "googlenet", "regnet_y_400mf", "shufflenet_v2_x0_5",
]  # fmt: skip
SMALL = ["resnet18", "mobilenet_v3_small", "googlenet", "regnet_y_400mf", "shufflenet_v2_x0_5"]


def build(name: str) -> nn.Module:
    extra = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    torch.manual_seed(0)
    model = getattr(tv, name)(**extra).eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(0))
    return model


def kill_half_of_every_group(model: nn.Module, x: torch.Tensor, constant: bool) -> Counter:
    """Zero the producer rows (and biases) of every other removable channel group; BN γ, β too
    unless ``constant`` (then the dead channels carry BN's constant). Returns rows per layer."""
    killed: Counter = Counter()
    free = [g for g in channel_groups(model, x) if g.blocked_by is None]
    with torch.no_grad():
        for group in free[::2]:
            for name, side, c in group.members:
                m = model.get_submodule(name)
                if side == "out" and (not isinstance(m, nn.BatchNorm2d) or not constant):
                    m.weight[c] = 0.0
                    if m.bias is not None:
                        m.bias[c] = 0.0
                    killed[name] += not isinstance(m, nn.BatchNorm2d)
    return killed


@pytest.mark.parametrize(
    "name, constant",
    [(n, False) for n in FAMILIES] + [(n, True) for n in SMALL],
)
def test_half_dead_groups_all_removed_same_function(name, constant):
    model = build(name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    killed = kill_half_of_every_group(model, x, constant)
    assert sum(killed.values()) > 0
    small = simplify(model, x)
    with torch.no_grad():
        y, y_small = model(x), small(x)
    assert (y - y_small).abs().max() <= 1e-5 * y.abs().max()
    for layer_name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            rows = small.get_submodule(layer_name).weight.shape[0]
            assert rows == m.weight.shape[0] - killed[layer_name], layer_name
