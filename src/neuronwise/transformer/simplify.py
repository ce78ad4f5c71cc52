r"""Removal of dead attention heads, FFN units and blocks: a smaller transformer, same function.

This pass works on modules (not on a traced graph) and runs before the general
:func:`neuronwise.simplify`, which then sees an ordinary, narrower network. Neurons are those of
:mod:`neuronwise.transformer.groups`.

**Attention** — timm's layout (a module with ``qkv``/``proj`` Linears and ``num_heads``, such as
:class:`~neuronwise.transformer.Attention`) or ``nn.MultiheadAttention`` (packed in-projection). With
H heads of d dims, rows [q | k | v] of the in-projection W_in and output projection P:
head h is dead when its value rows W_v[h] are all zero, or when its columns P[:, h] are. A head whose
value rows are zero outputs its value bias b_v[h] at every position (each softmax row sums to 1), so

.. math:: b_P \leftarrow b_P + P[:, h]\, b_v[h]

and its q, k, v rows and P columns go. The module is rebuilt with the kept heads
(:class:`~neuronwise.transformer.Attention` or :class:`~neuronwise.transformer.MultiheadAttention`),
its head count and widths rewritten; with no head left it becomes a
:class:`~neuronwise.transformer.ConstantBranch` of value b_P. Inside the kept heads, dead score and
value dims go too and the heads share one narrower width, the scale kept
(:mod:`neuronwise.transformer.narrow`); in the timm layout the heads left without a score dim
attend uniformly and become one Linear of the token mean (``Attention.mean``, or
:class:`~neuronwise.transformer.MeanAttention` when no other head is left).

**FFN** — ``fc1 → act → fc2`` (a module with those children, or an ``nn.Sequential``
Linear, elementwise activation, Linear, with dropouts). Unit j is dead when row j of fc1 is zero
(it then outputs act(b1_j), folded as b2 ← b2 + act(b1_j)·W2[:, j]) or column j of fc2 is. The
Linears are resized in place; with no unit left the FFN becomes a constant branch.

**Blocks** — a module with a constant branch whose output is x + c for a constant c (a residual
block all of whose branches are constant) becomes :class:`~neuronwise.transformer.AddConstant`.
In a block that keeps a live branch, a normalization that feeds only constant branches (which read
its output's shape alone) becomes ``nn.Identity``.

Every replacement is checked in float64 against the module it replaces, on that module's input
recorded from ``example_input`` and on a random input of the same shape; a module that does not
match (an attention variant this pass does not know, a forward with extra terms) is left as it
was. The guarantee is in eval mode (dropout off) and covers an ``nn.MultiheadAttention``'s output,
not the attention weights it returns with ``need_weights=True``: those are averaged over the heads
kept (``None`` when none is left).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from neuronwise._utils import check_model_and_example, unwrap
from neuronwise.transformer.checks import record_calls, run64, same_function
from neuronwise.transformer.groups import AttentionHeads, attention_heads, ffn_layers
from neuronwise.transformer.modules import (
    AddConstant,
    Attention,
    ConstantBranch,
    MeanAttention,
    MultiheadAttention,
)
from neuronwise.transformer.narrow import gather_rows, mean_branch, plan_heads, zero_rows

__all__ = ["compose_kept", "convert_attention", "simplify_transformer"]

Kept = dict[str, tuple[str, tuple[Tensor, ...] | None]]


def simplify_transformer(
    model: nn.Module, example_input: Tensor, return_kept: bool = False, pinned: Any = ()
) -> nn.Module | tuple[nn.Module, Kept]:
    """A copy of ``model`` (eval mode) without its dead heads, FFN units and constant blocks.

    Args:
        model: the network; deep-copied, never modified. Modules this pass does not recognise are
            copied unchanged, so any model is accepted (one without transformer parts comes back
            equal to a copy).
        example_input: one input batch (only its shape matters beyond the recorded check).
        return_kept: also return ``kept``, new parameter name → (old parameter name, kept indices
            per dimension: ``()`` when unchanged, ``None`` when new or changed in value), the
            format of :func:`neuronwise.simplify` (compose both with :func:`compose_kept`).
        pinned: names of modules whose neurons are kept: a module that is pinned, or holds or
            lies inside a pinned one, is left as it is.
    """
    check_model_and_example(model, example_input)
    model = copy.deepcopy(unwrap(model)).eval()
    calls = record_calls(model, example_input[:1].detach())
    pinned = set(pinned)
    for name in list(calls):
        if any(name == p or p.startswith(name + ".") or name.startswith(p + ".") for p in pinned):
            del calls[name]
    kept: Kept = {}
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or name not in calls or any(name.startswith(r + ".") for r in replaced):
            continue
        new = _attention_pass(name, module, calls[name], kept)
        if new is None:
            new = _ffn_pass(name, module, calls[name], kept)
        if new is not None and new is not module:
            _set_submodule(model, name, new)
            replaced.append(name)
    for name, module in list(model.named_modules()):
        if name and name in calls and not any(name.startswith(r + ".") for r in replaced):
            new = _block_pass(name, module, calls[name], kept)
            if new is None:
                new = _unused_norms_pass(module, calls[name])
            if new is not None:
                _set_submodule(model, name, new)
                replaced.append(name)
    for name, _ in model.named_parameters():
        kept.setdefault(name, (name, ()))
    return (model, kept) if return_kept else model


def convert_attention(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each recognised ``nn.MultiheadAttention`` replaced by the
    equivalent :class:`~neuronwise.transformer.MultiheadAttention`.

    torch's module computes its in-projection from a bare parameter, with no module that forward
    hooks could see; ours has ``in_proj`` and ``out_proj`` Linears, so SeReNe, NEq and PSP-entropy
    see each head. The function is the same (``in_proj_weight`` becomes ``in_proj.weight``).
    """
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        heads = attention_heads(name, module) if name else None
        if heads is not None and isinstance(module, nn.MultiheadAttention):
            _set_submodule(model, name, _as_attention(module, heads))
    return model


def compose_kept(first: Kept, second: Kept) -> Kept:
    """``kept`` of two passes in a row: ``first`` (old → middle) then ``second`` (middle → new)."""
    composed: Kept = {}
    for name, (middle, index) in second.items():
        source, before = first.get(middle, (middle, ()))
        if index is None or before is None:
            composed[name] = (source, None)
        elif not before:
            composed[name] = (source, index)
        elif not index:
            composed[name] = (source, before)
        else:
            composed[name] = (source, tuple(b[i.to(b.device)] for b, i in zip(before, index)))
    return composed


# ----------------------------------------------------------------------------- helpers


def _accept(
    old: nn.Module, new: nn.Module, call: tuple[tuple, dict], kept: Kept, entries: Kept
) -> nn.Module | None:
    """``new`` with its ``kept`` entries recorded if it computes what ``old`` does, else None."""
    if not same_function(old, new, call):
        return None
    kept.update(entries)
    return new


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, child = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _broadcast(x: Tensor, width: int) -> tuple[int, ...]:
    """(1, …, 1, width) of ``x``'s rank: a constant's shape that broadcasts against ``x``."""
    return (1,) * (x.dim() - 1) + (width,)


def _index(keep: list[int], device: torch.device) -> Tensor:
    return torch.tensor(keep, dtype=torch.long, device=device)


def _sliced_linear(layer: nn.Linear, rows: Tensor, cols: Tensor) -> nn.Linear:
    """A new Linear with ``layer``'s weight rows ``rows`` and columns ``cols`` (and bias rows)."""
    new = nn.Linear(
        cols.numel(), rows.numel(), layer.bias is not None,
        device=layer.weight.device, dtype=layer.weight.dtype,
    )  # fmt: skip
    new.weight = nn.Parameter(layer.weight.detach().index_select(0, rows).index_select(1, cols))
    if layer.bias is not None:
        new.bias = nn.Parameter(layer.bias.detach().index_select(0, rows).clone())
    return new


# ----------------------------------------------------------------------------- attention


def _as_attention(module: nn.Module, heads: AttentionHeads) -> Attention | MultiheadAttention:
    """Our module equivalent to the recognised attention ``module``, with all its heads."""
    if isinstance(module, MultiheadAttention):
        return copy.deepcopy(module)
    if isinstance(module, nn.MultiheadAttention):
        new = MultiheadAttention(
            module.embed_dim, heads.num_heads, heads.head_dim, module.in_proj_bias is not None,
            module.dropout, module.batch_first,
        )  # fmt: skip
        new.to(module.in_proj_weight)
        new.in_proj.weight = nn.Parameter(module.in_proj_weight.detach().clone())
        if module.in_proj_bias is not None:
            new.in_proj.bias = nn.Parameter(module.in_proj_bias.detach().clone())
        new.out_proj.load_state_dict(module.out_proj.state_dict())
        return new
    qkv, proj = module.qkv, module.proj
    drop = getattr(module, "attn_drop", 0.0)
    new = Attention(
        qkv.in_features, heads.num_heads, heads.head_dim, qkv.bias is not None,
        float(getattr(module, "scale", heads.head_dim**-0.5)),
        drop.p if isinstance(drop, nn.Dropout) else float(drop),
    )  # fmt: skip
    if isinstance(getattr(module, "proj_drop", None), nn.Module):
        new.proj_drop = copy.deepcopy(module.proj_drop)
    new.to(qkv.weight)
    new.qkv.load_state_dict(qkv.state_dict())
    new.proj.load_state_dict(proj.state_dict())
    return new


def _attention_pass(
    name: str, module: nn.Module, call: tuple[tuple, dict], kept: Kept
) -> nn.Module | None:
    info = attention_heads(name, module)
    if info is None:
        return None
    new = _as_attention(module, info)
    if not same_function(module, new, call):
        return None
    torch_layout = isinstance(new, MultiheadAttention)
    in_name, out_name = ("in_proj", "out_proj") if torch_layout else ("qkv", "proj")
    layer_in, proj = getattr(new, in_name), getattr(new, out_name)
    plan = plan_heads(layer_in, proj, new.num_heads, new.head_dim)
    mean = None
    if plan.uniform and not torch_layout:  # token-mean branch; the heads' P columns then unused
        weight, mean_bias = mean_branch(layer_in, proj, new.head_dim, plan.uniform)
        mean = nn.Linear(weight.shape[1], weight.shape[0]).to(proj.weight)
        mean.weight = nn.Parameter(weight.to(proj.weight.dtype))
        new = copy.deepcopy(new)
        layer_in, proj = new.qkv, new.proj
        with torch.no_grad():
            for h in plan.uniform:
                proj.weight[:, h * new.head_dim : (h + 1) * new.head_dim] = 0
        plan = plan_heads(layer_in, proj, new.num_heads, new.head_dim)
    if len(plan.heads) == new.num_heads and plan.width == new.head_dim:
        # A foreign timm-style module becomes ours: same names, and traceable by torch.fx.
        ours = (Attention, MultiheadAttention, nn.MultiheadAttention)
        return module if isinstance(module, ours) else new
    p64 = proj.weight.detach().double()
    bias = torch.zeros(proj.out_features, dtype=torch.float64, device=p64.device)
    if proj.bias is not None:
        bias = bias + proj.bias.detach().double()
    if layer_in.bias is not None and plan.folded.numel():
        inner = new.num_heads * new.head_dim
        v_bias = layer_in.bias.detach().double()[2 * inner :]
        folded = plan.folded.to(p64.device)
        bias = bias + p64[:, folded] @ v_bias[folded]
    prefix = f"{name}." if name else ""
    out_names = [f"{prefix}{out_name}.{p}" for p in ("weight", "bias")]
    source = info.out_weight if info.out_bias is None else info.out_bias
    folded = proj.bias is None or not torch.equal(bias, proj.bias.detach().double())
    entries: Kept = {}
    if mean is not None:
        entries = {prefix + "mean.weight": (info.in_weight, None), prefix + "mean.bias": (source, None)}
    if not plan.heads and mean is not None:
        mean.bias = nn.Parameter((bias + mean_bias).to(proj.weight.dtype))
        return _accept(module, MeanAttention(mean), call, kept, entries)
    if not plan.heads:
        value = bias.to(proj.weight.dtype)
        result = ConstantBranch(value.view(_broadcast(call[0][0], value.numel())), torch_layout)
        return _accept(module, result, call, kept, {prefix + "value": (source, None)})
    device = p64.device
    rows, cols = plan.rows.to(device), plan.columns.to(device)
    all_in = _index(list(range(layer_in.in_features)), device)
    all_out = _index(list(range(proj.out_features)), device)
    result = copy.deepcopy(new)
    result.num_heads, result.head_dim = len(plan.heads), plan.width
    new_in = nn.Linear(layer_in.in_features, rows.numel(), layer_in.bias is not None)
    new_in.to(layer_in.weight)
    new_in.weight = nn.Parameter(gather_rows(layer_in.weight, rows))
    if layer_in.bias is not None:
        new_in.bias = nn.Parameter(gather_rows(layer_in.bias, rows))
    new_out = nn.Linear(cols.numel(), proj.out_features).to(proj.weight)
    new_out.weight = nn.Parameter(gather_rows(proj.weight.t(), cols).t().contiguous())
    new_out.bias = nn.Parameter(bias.to(proj.weight.dtype))
    setattr(result, in_name, new_in)
    setattr(result, out_name, new_out)
    if mean is not None:
        mean.bias = nn.Parameter(mean_bias.to(proj.weight.dtype))
        result.mean = mean
    padded = plan.padded
    entries |= {
        f"{prefix}{in_name}.weight": (info.in_weight, None if padded else (rows, all_in)),
        out_names[0]: (info.out_weight, None if padded else (all_out, cols)),
        out_names[1]: (source, None) if folded else (source, ()),
    }
    if info.in_bias is not None:
        entries[f"{prefix}{in_name}.bias"] = (info.in_bias, None if padded else (rows,))
    return _accept(module, result, call, kept, entries)


# ----------------------------------------------------------------------------- FFN


def _ffn_pass(
    name: str, module: nn.Module, call: tuple[tuple, dict], kept: Kept
) -> nn.Module | None:
    layers = ffn_layers(module)
    if layers is None:
        return None
    fc1_name, fc2_name, act = layers
    fc1, fc2 = getattr(module, fc1_name), getattr(module, fc2_name)
    w2 = fc2.weight.detach().double()
    b1 = torch.zeros(fc1.out_features, dtype=torch.float64, device=w2.device)
    if fc1.bias is not None:
        b1 = b1 + fc1.bias.detach().double()
    silent, unused = zero_rows(fc1.weight), zero_rows(fc2.weight.detach().t())
    dead = silent | unused
    if not dead.any():
        return None
    bias = torch.zeros(fc2.out_features, dtype=torch.float64, device=w2.device)
    if fc2.bias is not None:
        bias = bias + fc2.bias.detach().double()
    folding = silent & ~unused
    if folding.any():
        bias = bias + w2[:, folding] @ copy.deepcopy(act).double()(b1[folding])
    prefix = f"{name}." if name else ""
    names2 = (f"{prefix}{fc2_name}.weight", f"{prefix}{fc2_name}.bias")
    source = names2[0] if fc2.bias is None else names2[1]
    folded = bool(folding.any()) or fc2.bias is None
    keep = _index((~dead).nonzero().flatten().tolist(), fc1.weight.device)
    if keep.numel() == 0:
        value = bias.to(fc2.weight.dtype)
        result = ConstantBranch(value.view(_broadcast(call[0][0], value.numel())))
        return _accept(module, result, call, kept, {prefix + "value": (source, None)})
    all_in = _index(list(range(fc1.in_features)), keep.device)
    all_out = _index(list(range(fc2.out_features)), keep.device)
    result = copy.deepcopy(module)
    new1, new2 = _sliced_linear(fc1, keep, all_in), _sliced_linear(fc2, all_out, keep)
    new2.bias = nn.Parameter(bias.to(fc2.weight.dtype))
    names1 = (f"{prefix}{fc1_name}.weight", f"{prefix}{fc1_name}.bias")
    entries: Kept = {names1[0]: (names1[0], (keep, all_in))}
    if fc1.bias is not None:
        entries[names1[1]] = (names1[1], (keep,))
    entries[names2[0]] = (names2[0], (all_out, keep))
    entries[names2[1]] = (source, None) if folded else (source, ())
    setattr(result, fc1_name, new1)
    setattr(result, fc2_name, new2)
    return _accept(module, result, call, kept, entries)


# ----------------------------------------------------------------------------- blocks


def _block_pass(
    name: str, module: nn.Module, call: tuple[tuple, dict], kept: Kept
) -> nn.Module | None:
    """``AddConstant(c)`` if every branch of ``module`` is constant and it computes x ↦ x + c.

    Branches are the children holding parameters, normalization layers aside; all must already be
    :class:`ConstantBranch` (dead by structure), so a live branch that merely looks constant on the
    checked inputs never goes.
    """
    branches = [m for m in module.children()
                if not isinstance(m, (nn.LayerNorm, nn.BatchNorm1d, nn.GroupNorm))
                and next(m.parameters(), None) is not None]
    if not any(isinstance(m, ConstantBranch) for m in module.children()) or not all(
            isinstance(m, ConstantBranch) for m in branches):
        return None
    args, kwargs = call
    if len(args) != 1 or kwargs or not isinstance(args[0], Tensor):
        return None
    x = args[0]
    out = run64(module, call)
    if len(out) != 1 or out[0] is None or out[0].shape != x.shape:
        return None
    constant = (out[0] - x.double()).reshape(-1, x.shape[-1])[0].view(_broadcast(x, x.shape[-1]))
    result = AddConstant(constant.to(x.dtype))
    if not same_function(module, result, call):
        return None
    prefix = f"{name}." if name else ""
    names = [prefix + n for n, _ in module.named_parameters()]
    sources = [kept.pop(n, (n, ()))[0] for n in names]
    kept[prefix + "bias"] = (sources[0], None)
    return result


def _unused_norms_pass(module: nn.Module, call: tuple[tuple, dict]) -> nn.Module | None:
    """``module`` with each normalization child that feeds only constant branches replaced by
    ``nn.Identity``, or None if there is none.

    A :class:`ConstantBranch` reads only its input's shape, which a LayerNorm keeps: in a block
    whose FFN is constant but whose attention lives, the FFN's LayerNorm is computed for nothing.
    Each candidate goes only if the block then computes what it did (checked like every rebuild:
    a normalization whose output is used elsewhere fails the check on random inputs).
    """
    if not any(isinstance(m, ConstantBranch) for m in module.children()):
        return None
    result = None
    for child, norm in list(module.named_children()):
        if not isinstance(norm, (nn.LayerNorm, nn.BatchNorm1d, nn.GroupNorm)):
            continue
        candidate = copy.deepcopy(result if result is not None else module)
        setattr(candidate, child, nn.Identity())
        if same_function(module, candidate, call):
            result = candidate
    return result
