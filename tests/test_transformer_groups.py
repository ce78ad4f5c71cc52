"""Neurons of a transformer (FFN units, heads) and the methods on them: masks, SeReNe, NEq, PSP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neuronwise as nw
from neuronwise.masks import ParameterMask
from neuronwise.transformer import convert_attention
from neuronwise.transformer.groups import AttentionHeads, FeedForwardUnits, neuron_groups


def small_vit(attention: str = "sdpa", depth: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nw.models.create(
        "vit", dim=16, depth=depth, num_heads=4, mlp_ratio=2, attention=attention
    )


@pytest.mark.parametrize("attention", ["sdpa", "torch"])
def test_groups_of_the_vit(attention):
    groups = neuron_groups(nw.models.create("vit", attention=attention))
    heads = [g for g in groups if isinstance(g, AttentionHeads)]
    units = [g for g in groups if isinstance(g, FeedForwardUnits)]
    assert len(heads) == len(units) == 6
    assert all(g.num_heads == 4 and g.head_dim == 32 for g in heads)
    assert all(g.units == 512 and g.fc1.endswith("mlp.fc1") for g in units)
    if attention == "torch":
        assert heads[0].in_weight == "blocks.0.attn.in_proj_weight" and heads[0].in_module is None
    else:
        assert heads[0].in_module == "blocks.0.attn.qkv"
    expected = [*range(32, 64), *range(160, 192), *range(288, 320)]
    assert heads[0].rows([1]).tolist() == expected
    assert heads[0].columns([1]).tolist() == list(range(32, 64))
    assert neuron_groups(nw.models.create("lenet5")) == []


@pytest.mark.parametrize("attention", ["sdpa", "torch"])
def test_neuron_mask_masks_a_head_whose_value_rows_are_zero(attention):
    model = small_vit(attention)
    heads = neuron_groups(model)[0]
    weight = model.get_parameter(heads.in_weight)
    bias = model.get_parameter(heads.in_bias)
    with torch.no_grad():
        bias.normal_()
        weight[heads.per_head(torch.arange(48))[2, 2]] = 0  # value rows of head 2
    modules = (nn.Linear, nn.MultiheadAttention)
    mask = ParameterMask(model, modules, granularity="neurons", zeros_at_start="masked")
    mask.apply()
    gone = heads.rows([2])
    kept = heads.rows([0, 1, 3])
    assert torch.all(weight[gone] == 0) and torch.all(bias[gone] == 0)
    assert torch.all(weight[kept] != 0) and torch.all(bias[kept] != 0)
    assert mask.violations() == 0


@pytest.mark.parametrize("attention", ["sdpa", "torch"])
def test_neuron_mask_masks_a_head_whose_projection_columns_are_zero(attention):
    model = small_vit(attention)
    heads = neuron_groups(model)[0]
    weight, bias = model.get_parameter(heads.in_weight), model.get_parameter(heads.in_bias)
    out = model.get_parameter(heads.out_weight)
    with torch.no_grad():
        bias.normal_()
        out[:, 4:8] = 0  # head 1's columns
    mask = ParameterMask(model, (nn.Linear, nn.MultiheadAttention), granularity="neurons",
                         zeros_at_start="masked")
    with torch.no_grad():
        for p in (weight, bias, out):
            p.add_(1.0)  # what a training step could do to entries the mask does not hold
    mask.apply()
    gone, kept = heads.rows([1]), heads.rows([0, 2, 3])
    assert torch.all(weight[gone] == 0) and torch.all(bias[gone] == 0)
    assert torch.all(out[:, 4:8] == 0)
    assert torch.all(weight[kept] != 0) and torch.all(bias[kept] != 0)
    assert torch.all(out[:, :4] != 0) and torch.all(out[:, 8:] != 0)


def test_serene_decays_each_head_with_its_own_sensitivity():
    model = small_vit().train()
    lam = 0.5
    reg = nw.SeReNe(model, lam=lam)
    x = torch.randn(8, 1, 28, 28)
    outputs = {}
    handle = model.blocks[0].attn.qkv.register_forward_hook(lambda m, a, out: outputs.update(z=out))
    logits = model(x)
    handle.remove()
    (grad,) = torch.autograd.grad(logits.sum(), outputs["z"], retain_graph=True)
    per_row = grad.abs().mean(dim=(0, 1)) / 10  # α = 1/C, mean over samples and tokens
    heads = neuron_groups(model)[0]
    expected = (1 - lam * torch.relu(1 - per_row.view(3, 4, 4)[2].mean(1))).repeat(3)
    reg.compute(logits)
    qkv = model.blocks[0].attn.qkv.weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg.step()
    factor = qkv.detach() / before["blocks.0.attn.qkv.weight"]
    per_head = factor.view(3, 4, 4, -1)
    assert torch.allclose(per_head, per_head[:, :, :1, :1].expand_as(per_head))  # one per head
    torch.testing.assert_close(heads.per_head(factor[:, 0])[:, :, 0].flatten(), expected)
    # the head's output-projection columns go with it; the residual stream's rows are not neurons
    proj = model.blocks[0].attn.proj.weight.detach() / before["blocks.0.attn.proj.weight"]
    torch.testing.assert_close(proj, expected[:4].repeat_interleave(4).expand(16, 16))
    fc1 = model.blocks[0].mlp.fc1.weight.detach() / before["blocks.0.mlp.fc1.weight"]
    fc2 = model.blocks[0].mlp.fc2.weight.detach() / before["blocks.0.mlp.fc2.weight"]
    assert not torch.allclose(fc1, torch.ones_like(fc1))
    torch.testing.assert_close(fc2, fc1[:, 0].expand(16, 32))  # unit j: fc1 row j, fc2 column j


def test_neq_measures_and_freezes_whole_heads():
    model = small_vit().eval()
    val = torch.randn(6, 1, 28, 28)
    neq = nw.NEq(model, val, selection="topk", trained_fraction=0.5)
    name = "blocks.0.attn.qkv"
    assert neq.similarity[name].shape == (4,)
    heads = neuron_groups(model)[0]
    with torch.no_grad():  # change heads 0 and 1 only (their value rows)
        model.blocks[0].attn.qkv.weight[heads.per_head(torch.arange(48))[2, :2].flatten()] *= -1
    neq.step()
    phi = neq.similarity[name]
    assert torch.allclose(phi[2:], torch.ones_like(phi[2:])) and torch.all(phi[:2] < 0.999)
    assert neq.frozen[name].tolist() == [False, False, True, True]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    neq.attach(opt)
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    model.train()
    nn.functional.cross_entropy(model(val), torch.arange(6) % 10).backward()
    opt.step()
    after = model.blocks[0].attn.qkv.weight.detach()
    frozen, trained = heads.rows([2, 3]), heads.rows([0, 1])
    assert torch.equal(after[frozen], before[frozen])
    assert not torch.equal(after[trained], before[trained])


def test_psp_entropy_counts_ffn_units_over_tokens():
    model = small_vit().eval()
    x, y = torch.randn(12, 1, 28, 28), torch.arange(12) % 3
    outputs = {}
    handle = model.blocks[0].mlp.fc1.register_forward_hook(lambda m, a, out: outputs.update(z=out))
    result = nw.psp_entropy(model, [(x, y)], num_classes=3)
    handle.remove()
    stats = result["blocks.0.mlp.fc1"]
    z = outputs["z"]  # (12, 16 tokens, 32 units)
    assert stats.unit_shape == (32,) and stats.per_unit.shape == (32,)
    assert stats.class_counts.tolist() == [4 * 16] * 3
    for c in range(3):
        expected = (z[y == c] > 0).double().mean(dim=(0, 1))
        torch.testing.assert_close(stats.p_on[:, c], expected)
    assert result["blocks.0.attn.qkv"].unit_shape == (16, 48)  # other Linears: unchanged


def test_converted_multihead_attention_is_the_same_function_and_hookable():
    model = small_vit("torch", depth=2).eval()
    converted = convert_attention(model)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-6)
    heads = [g for g in neuron_groups(converted) if isinstance(g, AttentionHeads)]
    assert [g.in_module for g in heads] == ["blocks.0.attn.in_proj", "blocks.1.attn.in_proj"]
    reg = nw.SeReNe(converted.train(), lam=0.1)
    reg.compute(converted(x))
    before = converted.blocks[0].attn.in_proj.weight.detach().clone()
    before_out = converted.blocks[0].attn.out_proj.weight.detach().clone()
    reg.step()
    factor = (converted.blocks[0].attn.in_proj.weight / before).view(3, 4, 4, -1)
    assert torch.allclose(factor, factor[:, :, :1, :1].expand_as(factor))  # decayed per head
    assert not torch.allclose(factor, torch.ones_like(factor))
    out = (converted.blocks[0].attn.out_proj.weight / before_out).view(16, 4, 4)
    torch.testing.assert_close(out, factor[0, :, :1, :1].view(1, 4, 1).expand(16, 4, 4))


def test_serene_leaves_packed_multihead_attention_alone():
    model = small_vit("torch").train()
    reg = nw.SeReNe(model, lam=0.5)
    reg.compute(model(torch.randn(4, 1, 28, 28)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg.step()
    for name in ("blocks.0.attn.in_proj_weight", "blocks.0.attn.out_proj.weight"):
        assert torch.equal(model.get_parameter(name), before[name])  # no hooked in-projection
    assert not torch.equal(model.get_parameter("blocks.0.mlp.fc2.weight"),
                           before["blocks.0.mlp.fc2.weight"])
