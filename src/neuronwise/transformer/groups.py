r"""Neurons of a transformer, defined once: FFN hidden units and attention heads.

- **FFN unit** j of ``fc1 → act → fc2``: row j of fc1 (weight and bias) with column j of fc2.
- **Head** h of an attention with H heads of d dims and in-projection rows [q | k | v]: rows
  {p·H·d + h·d + i : p ∈ {q, k, v}, i < d} of the in-projection (weight and bias) with columns
  h·d … h·d + d − 1 of the output projection. A head is *dead* when its value rows are all zero
  (it then outputs its constant value bias) or its output-projection columns are.

Recognised layouts: timm-style attention (a module with ``qkv`` and ``proj`` Linears and an int
``num_heads``, no other parameters; :class:`~neuronwise.transformer.Attention` is one),
``nn.MultiheadAttention`` with a packed in-projection and no ``bias_k``/``bias_v``, our
:class:`~neuronwise.transformer.MultiheadAttention`; FFNs as a module with ``fc1``/``act``/``fc2``
(no other parameters) or an ``nn.Sequential`` Linear, elementwise activation, Linear with
dropouts around. Recognition is by structure; :func:`neuronwise.transformer.simplify_transformer`
also checks the function before it rebuilds anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from neuronwise._utils import unwrap
from neuronwise.transformer.modules import MultiheadAttention

__all__ = ["ELEMENTWISE", "AttentionHeads", "FeedForwardUnits", "neuron_groups"]

ELEMENTWISE = (
    nn.GELU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
)  # fmt: skip
_PASSTHROUGH = (nn.Dropout, nn.Identity)


@dataclass(frozen=True)
class AttentionHeads:
    """The heads of one attention module; names are qualified as in ``model.named_parameters()``.

    ``in_module`` is the in-projection Linear's name, or None for ``nn.MultiheadAttention``'s
    packed ``in_proj_weight`` (no module to hook).
    """

    module: str
    in_weight: str
    in_bias: str | None
    in_module: str | None
    out_weight: str
    out_bias: str | None
    out_module: str
    num_heads: int
    head_dim: int

    def rows(self, heads: Tensor | list[int] | None = None) -> Tensor:
        """In-projection row indices of ``heads`` (default all), q rows first, then k, then v."""
        heads = torch.arange(self.num_heads) if heads is None else torch.as_tensor(heads)
        inner = self.num_heads * self.head_dim
        within = heads[:, None] * self.head_dim + torch.arange(self.head_dim)
        return (torch.arange(3)[:, None, None] * inner + within).flatten()

    def columns(self, heads: Tensor | list[int] | None = None) -> Tensor:
        """Output-projection column indices of ``heads`` (default all)."""
        heads = torch.arange(self.num_heads) if heads is None else torch.as_tensor(heads)
        return (heads[:, None] * self.head_dim + torch.arange(self.head_dim)).flatten()

    def per_head(self, rows: Tensor) -> Tensor:
        """A per-row quantity of the in-projection (3·H·d, …) viewed as (3, H, d, …)."""
        return rows.view(3, self.num_heads, self.head_dim, *rows.shape[1:])

    def value_mean(self, rows: Tensor) -> Tensor:
        """Per head (H,): the mean of a per-row quantity (3·H·d,) over the head's value rows."""
        return self.per_head(rows)[2].mean(dim=1)

    def to_rows(self, heads: Tensor) -> Tensor:
        """A per-head quantity (H,) repeated on each of the head's q, k and v rows (3·H·d,)."""
        return heads.view(1, -1, 1).expand(3, self.num_heads, self.head_dim).reshape(-1)


@dataclass(frozen=True)
class FeedForwardUnits:
    """The hidden units of one FFN: rows of ``fc1``, columns of ``fc2`` (module names)."""

    module: str
    fc1: str
    fc2: str
    units: int


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def attention_heads(name: str, module: nn.Module) -> AttentionHeads | None:
    """``module``'s heads if it is a recognised attention, else None."""
    q = lambda n: _qualified(name, n)
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            return None
        bias = module.in_proj_bias is not None
        return AttentionHeads(
            name, q("in_proj_weight"), q("in_proj_bias") if bias else None, None,
            q("out_proj.weight"), q("out_proj.bias") if bias else None, q("out_proj"),
            module.num_heads, module.head_dim,
        )  # fmt: skip
    in_name, out_name = (
        ("in_proj", "out_proj") if isinstance(module, MultiheadAttention) else ("qkv", "proj")
    )
    qkv, proj = getattr(module, in_name, None), getattr(module, out_name, None)
    heads = getattr(module, "num_heads", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int)):
        return None
    if heads < 1 or qkv.out_features % (3 * heads) or proj.out_features != qkv.in_features:
        return None
    head_dim = qkv.out_features // (3 * heads)
    own = {id(p) for p in (*qkv.parameters(), *proj.parameters())}
    if proj.in_features != heads * head_dim or any(id(p) not in own for p in module.parameters()):
        return None
    return AttentionHeads(
        name, q(f"{in_name}.weight"), q(f"{in_name}.bias") if qkv.bias is not None else None,
        q(in_name), q(f"{out_name}.weight"), q(f"{out_name}.bias") if proj.bias is not None else None,
        q(out_name), heads, head_dim,
    )  # fmt: skip


def ffn_layers(module: nn.Module) -> tuple[str, str, nn.Module] | None:
    """(fc1 child name, fc2 child name, activation) if ``module`` is a recognised FFN, else None."""
    if isinstance(module, nn.Sequential):
        children = list(module.named_children())
        linears = [i for i, (_, m) in enumerate(children) if isinstance(m, nn.Linear)]
        if len(linears) != 2 or linears[0] != 0:
            return None
        between = [m for _, m in children[1 : linears[1]] if not isinstance(m, _PASSTHROUGH)]
        after = [m for _, m in children[linears[1] + 1 :]]
        if len(between) > 1 or any(not isinstance(m, ELEMENTWISE) for m in between):
            return None
        if any(not isinstance(m, _PASSTHROUGH) for m in after):
            return None
        act = between[0] if between else nn.Identity()
        return children[0][0], children[linears[1]][0], act
    fc1, fc2, act = (getattr(module, a, None) for a in ("fc1", "fc2", "act"))
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
        return None
    if not isinstance(act, ELEMENTWISE) or fc1.out_features != fc2.in_features:
        return None
    own = {id(p) for p in (*fc1.parameters(), *fc2.parameters())}
    if any(id(p) not in own for p in module.parameters()):
        return None
    return "fc1", "fc2", act


def neuron_groups(model: nn.Module) -> list[AttentionHeads | FeedForwardUnits]:
    """Every recognised attention (its heads) and FFN (its units), in ``named_modules()`` order.

    A module inside a recognised one is not looked at again (an FFN's Sequential is one group).
    """
    groups: list[AttentionHeads | FeedForwardUnits] = []
    inside: list[str] = []
    for name, module in unwrap(model).named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        heads = attention_heads(name, module)
        if heads is not None:
            groups.append(heads)
            inside.append(name)
            continue
        layers = ffn_layers(module)
        if layers is not None and name:
            fc1, fc2, _ = layers
            units = getattr(module, fc1).out_features
            groups.append(
                FeedForwardUnits(name, _qualified(name, fc1), _qualified(name, fc2), units)
            )
            inside.append(name)
    return groups
