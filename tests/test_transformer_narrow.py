"""Narrowing inside heads: dead score and value dims go, the scale stays, the function stays;
heads without a score dim become a Linear of the token mean (timm-style attention)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_transformer_simplify import (
    ATTENTIONS,
    Block,
    assert_close,
    assert_vit_saves_loads_and_exports,
    n_params,
    projections,
    randomize,
)
from torch import nn

import neuronwise as nw
from neuronwise.transformer import Attention, ConstantBranch, MeanAttention, MultiheadAttention
from neuronwise.transformer.narrow import plan_heads
from neuronwise.transformer.simplify import simplify_transformer

FATES = ["live", "q", "q+bias", "k", "v", "proj"]


@torch.no_grad()
def kill_dim(block: Block, head: int, dim: int, fate: str) -> None:
    """Zero one dim of one head: its q row (with or without its bias), k row, v row or P column."""
    w_in, b_in, proj = projections(block)
    heads = block.attn.num_heads
    d, inner = w_in.shape[0] // (3 * heads), w_in.shape[0] // 3
    row = head * d + dim
    if fate in ("q", "q+bias"):
        w_in[row] = 0
        if fate == "q+bias" and b_in is not None:
            b_in[row] = 0
    elif fate == "k":
        w_in[inner + row] = 0
    elif fate == "v":
        w_in[2 * inner + row] = 0
    elif fate == "proj":
        proj.weight[:, row] = 0


def expected_width(fates: list[list[str]], d: int) -> int:
    """d′ of the module docstring of neuronwise.transformer.narrow, from the fates alone."""
    value = [sum(f not in ("v", "proj") for f in head) for head in fates]
    score = [sum(f not in ("k", "q+bias") for f in head) for head in fates]
    kept = [h for h in range(len(fates)) if value[h] > 0]
    if not kept or all(value[h] == d and score[h] == d for h in kept):
        return d
    return max(1, max(max(value[h], score[h]) for h in kept))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    attention=st.sampled_from(ATTENTIONS),
    heads=st.integers(1, 3),
    head_dim=st.integers(2, 5),
    fates=st.lists(st.lists(st.sampled_from(FATES), min_size=5, max_size=5), min_size=3,
                   max_size=3),
)
def test_dead_dims_inside_heads_go_and_the_function_stays(seed, attention, heads, head_dim, fates):
    g = torch.Generator().manual_seed(seed)
    dim = heads * head_dim
    model = nn.Sequential(Block(dim, heads, 6, attention, False), nn.Linear(dim, 3))
    randomize(model, g)
    block = model[0]
    fates = [f[:head_dim] for f in fates[:heads]]
    for h, head in enumerate(fates):
        for c, fate in enumerate(head):
            kill_dim(block, h, c, fate)
    scale = block.attn.scale if hasattr(block.attn, "scale") else head_dim**-0.5
    example = torch.zeros(1, 5, dim)
    small = simplify_transformer(model, example)

    x = torch.randn(7, 5, dim, generator=g)
    assert_close(model.eval()(x), small(x))
    alive = [h for h in fates if any(f not in ("v", "proj") for f in h)]
    uniform = [h for h in alive if all(f in ("k", "q+bias") for f in h)]  # no score dim
    if attention in ("ours", "timm"):  # uniform heads become a Linear of the token mean
        alive = [h for h in alive if h not in uniform]
    attn = small[0].attn
    if alive:
        assert isinstance(attn, (Attention, MultiheadAttention, nn.MultiheadAttention))
        assert attn.num_heads == len(alive)
        width = expected_width(alive, head_dim)
        assert attn.head_dim == width
        if width < head_dim or len(alive) < heads:
            assert n_params(small) < n_params(model)
            assert attn.scale == pytest.approx(scale)  # the old scale, not width**-0.5
    if uniform and attention in ("ours", "timm"):
        assert isinstance(attn.mean if alive else attn, (nn.Linear, MeanAttention))
    # The general pass takes the result as it is: no manual step in between.
    assert_close(model(x), nw.simplify(small, example)(x))


def test_a_zero_k_row_goes_even_with_a_key_bias_but_a_zero_q_row_needs_its_bias_zero():
    layer_in, proj = nn.Linear(4, 12), nn.Linear(4, 4)  # 1 head of 4 dims
    with torch.no_grad():
        layer_in.weight[4 + 0] = 0  # k row of dim 0: goes (its bias only shifts softmax rows)
        layer_in.weight[1] = 0  # q row of dim 1 with a non-zero bias: stays
        layer_in.weight[2] = 0  # q row of dim 2 with a zero bias: goes
        layer_in.bias[2] = 0
        proj.weight[:, 3] = 0  # value dim 3 unused
    plan = plan_heads(layer_in, proj, 1, 4)
    assert plan.width == 3
    assert plan.rows.tolist() == [1, 3, -1, 5, 7, -1, 8, 9, 10]  # score dims 1, 3; value 0, 1, 2
    assert plan.columns.tolist() == [0, 1, 2]
    assert plan.folded.tolist() == []


def narrowed_vit(attention: str) -> nn.Module:
    torch.manual_seed(0)
    model = nw.models.create("vit", depth=2, dim=32, attention=attention).eval()
    with torch.no_grad():
        for block in model.blocks:
            w_in, b_in, _ = projections(block)
            b_in.normal_()
            w_in[8:32] = 0  # q rows and biases: heads 1-3 keep no score dim
            b_in[8:32] = 0
            w_in[32 + 2 : 32 + 8] = 0  # head 0 keeps 2 k rows
            w_in[64 + 3 : 64 + 8] = 0  # head 0: 3 value rows; the others' bias folds
            w_in[64 + 8 + 1 : 64 + 32] = 0  # heads 1-3 keep value row 0 of head 1
    return model


@pytest.mark.parametrize("attention", ["sdpa", "torch"])
def test_narrowed_vit_saves_loads_and_exports(tmp_path, attention):
    model = narrowed_vit(attention)
    with torch.no_grad():
        projections(model.blocks[1])[0][32:40] = 0  # block 1: no head keeps a score dim
    example = torch.zeros(1, 1, 28, 28)
    middle = simplify_transformer(model, example)
    assert isinstance(middle.blocks[1].attn, MeanAttention) == (attention == "sdpa")
    attn = middle.blocks[0].attn
    # head 0: max(2 score dims, 3 value dims); head 1 (no score dim) attends uniformly: in the
    # timm layout it becomes the token-mean Linear, torch's layout keeps it as a padded head.
    heads = 1 if attention == "sdpa" else 2
    assert attn.num_heads == heads and attn.head_dim == 3
    assert attn.scale == pytest.approx(8**-0.5)
    layer_in = attn.qkv if attention == "sdpa" else attn.in_proj
    assert layer_in.weight.shape == (heads * 9, 32)  # heads · 3 dims · (q, k, v)
    assert isinstance(getattr(attn, "mean", None), nn.Linear) == (attention == "sdpa")
    small = nw.simplify(middle, example)
    assert_vit_saves_loads_and_exports(model, small, tmp_path)


def test_q_rows_that_keep_their_bias_keep_the_head_wide():
    model = narrowed_vit("sdpa")
    with torch.no_grad():
        model.blocks[0].attn.qkv.bias[8:16] = 1.0  # head 1's q is its bias: 8 live score dims
    example = torch.zeros(1, 1, 28, 28)
    small = simplify_transformer(model, example)
    assert small.blocks[0].attn.num_heads == 2 and small.blocks[0].attn.head_dim == 8
    assert small.blocks[1].attn.head_dim == 3
    x = torch.randn(3, 1, 28, 28)
    assert_close(model(x), small(x))


def test_narrowing_is_kept_by_a_second_pass():
    model = narrowed_vit("sdpa")
    example = torch.zeros(1, 1, 28, 28)
    once = simplify_transformer(model, example)
    assert once.blocks[0].attn.head_dim == 3  # max(2 score dims, 3 value dims)
    twice = simplify_transformer(copy.deepcopy(once), example)
    assert twice.blocks[0].attn.head_dim == 3
    x = torch.randn(3, 1, 28, 28)
    assert_close(model(x), twice(x))


class NormUsedTwice(Block):
    """norm2's output feeds the FFN and the residual: it must stay when the FFN is constant."""

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        return x + self.mlp(h) + h


@pytest.mark.parametrize("block_type", [Block, NormUsedTwice])
def test_a_norm_that_feeds_only_a_constant_branch_goes(block_type):
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(block_type(8, 2, 6, "ours", False), nn.Linear(8, 3))
    randomize(model, g)
    with torch.no_grad():
        model[0].mlp.fc1.weight.zero_()  # the FFN becomes a constant branch
    small = simplify_transformer(model, torch.zeros(1, 4, 8))
    assert isinstance(small[0].mlp, ConstantBranch)
    assert isinstance(small[0].norm2, nn.Identity) == (block_type is Block)
    assert isinstance(small[0].norm1, nn.LayerNorm)  # feeds the live attention
    x = torch.randn(5, 4, 8, generator=g)
    assert_close(model.eval()(x), small(x))
