"""The ViT of the model registry: counts, both attention layouts, tracing, validation."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from neuronwise import models


def test_default_counts():
    model = models.create("vit")
    dim, hidden, tokens, depth = 128, 512, 16, 6
    per_block = 2 * 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim)
    per_block += (dim * hidden + hidden) + (hidden * dim + dim)
    expected = (49 * dim + dim) + tokens * dim + depth * per_block + 2 * dim + (dim * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected == 1_199_626
    assert len(model.blocks) == depth and model.pos_embed.shape == (1, tokens, dim)


def test_sdpa_and_torch_attention_compute_the_same_function():
    torch.manual_seed(0)
    ours = models.create("vit", depth=2, dim=32).eval()
    theirs = models.create("vit", depth=2, dim=32, attention="torch").eval()
    state = {}
    for name, value in ours.state_dict().items():
        state[name.replace("attn.qkv.weight", "attn.in_proj_weight")
                  .replace("attn.qkv.bias", "attn.in_proj_bias")
                  .replace("attn.proj.", "attn.out_proj.")] = value  # fmt: skip
    theirs.load_state_dict(state)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)
    assert isinstance(theirs.blocks[0].attn, nn.MultiheadAttention)


@pytest.mark.parametrize("attention", ["sdpa", "torch"])
def test_traces_and_other_sizes(attention):
    model = models.create("vit", attention=attention, image_size=32, patch_size=4, in_channels=3)
    x = torch.randn(2, 3, 32, 32)
    y = model.eval()(x)
    assert y.shape == (2, 10)
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), y, rtol=0, atol=0)
    assert models.classifier_name(model) == "classifier"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"patch_size": 5}, r"Invalid patch_size: 5 \(does not divide image_size 28\)"),
        ({"num_heads": 3}, r"Invalid num_heads: 3 \(does not divide dim 128\)"),
        ({"attention": "flash"}, r"Invalid attention: 'flash'"),
        ({"depth": 0}, r"Invalid depth: 0 \(expected a positive int\)"),
        ({"mlp_ratio": -1}, r"Invalid mlp_ratio: -1"),
    ],
)
def test_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        models.create("vit", **options)
