"""The attention modules and constant stand-ins that the transformer simplify pass builds.

:class:`Attention` is timm's layout (one ``qkv`` Linear, heads split by reshape,
``F.scaled_dot_product_attention``, output ``proj``) with its width written as
``num_heads · head_dim`` rather than read from the input, so that it stays correct with fewer heads.
:class:`MultiheadAttention` computes what ``nn.MultiheadAttention`` computes (same parameter names,
same call) for any number of heads. :class:`ConstantBranch` replaces a residual branch whose output
no longer depends on its input; :class:`AddConstant` replaces a whole block that only adds a constant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AddConstant", "Attention", "ConstantBranch", "MeanAttention", "MultiheadAttention"]


class Attention(nn.Module):
    r"""Multi-head self-attention over tokens (B, N, C), timm layout.

    ``qkv`` rows are [q of heads 0..H−1 | k of heads 0..H−1 | v of heads 0..H−1], ``head_dim`` rows
    per head; head h computes softmax(q_h k_hᵀ · scale) v_h and ``proj`` maps the H·head_dim
    concatenation back to ``dim``. ``scale`` is stored, not derived, so it survives pruning.
    ``mean`` (None unless simplify sets it): a Linear of the token mean added to the output, the
    heads that attend uniformly (:class:`MeanAttention`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"Invalid num_heads: {num_heads} (does not divide dim {dim})")
            head_dim = dim // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = float(scale) if scale is not None else head_dim**-0.5
        self.attn_drop = float(attn_drop)
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.mean: nn.Linear | None = None

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale,
        )
        out = self.proj(out.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim))
        if self.mean is not None:
            out = out + self.mean(x.mean(1, keepdim=True))
        return self.proj_drop(out)


class MeanAttention(nn.Module):
    r"""Heads that attend uniformly: x (B, N, C) ↦ ``mean``(mean over the N tokens of x), the same
    at every token.

    A head whose scores are constant along each softmax row outputs P_h·(1/N Σ_j v_h(j)) =
    P_h W_h x̄ + P_h b_h, with x̄ the token mean: one Linear of x̄ (weight P_h W_h, bias P_h b_h,
    summed over such heads), computed once per sample instead of once per token.
    """

    def __init__(self, mean: nn.Linear):
        super().__init__()
        self.mean = mean

    def forward(self, x: Tensor) -> Tensor:
        out = self.mean(x.mean(1, keepdim=True))
        return out.expand(x.shape[0], x.shape[1], out.shape[-1])


class MultiheadAttention(nn.Module):
    r"""``nn.MultiheadAttention`` (packed in-projection, no ``bias_k``/``bias_v``/zero attention)
    with ``num_heads`` heads of ``head_dim`` each, where ``num_heads · head_dim`` may differ from
    ``embed_dim``.

    ``scale`` multiplies the scores (default ``head_dim**-0.5``, torch's); it is stored, not derived,
    so it survives narrowing the heads. The same call, returning ``(output, weights)``; the packed in-projection is the Linear
    ``in_proj`` (rows [q | k | v], torch's ``in_proj_weight``/``in_proj_bias``), applied once when
    query, key and value are one tensor. ``attn_mask`` must broadcast to (B, 1, L, S) (a (L, S) mask
    does); boolean masks mark positions that may *not* attend, as in torch. The returned weights are
    those of the heads kept, averaged over them (or per head): after pruning they differ from the
    original's, which average over all heads.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
        scale: float | None = None,
    ):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.scale = float(scale) if scale is not None else head_dim**-0.5
        self.dropout, self.batch_first = float(dropout), batch_first
        inner = num_heads * head_dim
        self.in_proj = nn.Linear(embed_dim, 3 * inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    def _split(self, x: Tensor, parts: int) -> Tensor:
        """(B, T, parts·H·d) → (parts, B, H, T, d)."""
        x = x.reshape(x.shape[0], x.shape[1], parts, self.num_heads, self.head_dim)
        return x.permute(2, 0, 3, 1, 4)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if query is key and key is value:
            qkv = self._split(self.in_proj(query), 3)
            return qkv[0], qkv[1], qkv[2]
        inner = self.num_heads * self.head_dim
        weight, bias = self.in_proj.weight, self.in_proj.bias
        out = []
        for part, x in enumerate((query, key, value)):
            rows = slice(part * inner, (part + 1) * inner)
            y = F.linear(x, weight[rows], None if bias is None else bias[rows])
            out.append(self._split(y, 1)[0])
        return out[0], out[1], out[2]

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not self.batch_first:
            same = query is key and key is value
            query = query.transpose(0, 1)
            key, value = (query, query) if same else (key.transpose(0, 1), value.transpose(0, 1))
        q, k, v = self._project(query, key, value)
        mask = _additive_mask(attn_mask, key_padding_mask, q)
        if is_causal and mask is None:
            causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
            mask = torch.zeros_like(causal, dtype=q.dtype).masked_fill(~causal, float("-inf"))
        dropout = self.dropout if self.training else 0.0
        scale = self.scale
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) * scale
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(-1)
            out = F.dropout(weights, dropout, self.training) @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout, scale=scale)
        out = out.transpose(1, 2).reshape(q.shape[0], q.shape[2], self.num_heads * self.head_dim)
        out = self.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _additive_mask(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, q: Tensor
) -> Tensor | None:
    """One float mask added to the scores: −inf where torch's boolean masks say True."""
    mask = None
    for part, shape in ((attn_mask, None), (key_padding_mask, "padding")):
        if part is None:
            continue
        if part.dtype == torch.bool:
            part = torch.zeros_like(part, dtype=q.dtype).masked_fill(part, float("-inf"))
        if shape == "padding":
            part = part[:, None, None, :]
        mask = part if mask is None else mask + part
    return mask


class ConstantBranch(nn.Module):
    """A branch whose output is the constant ``value`` (last dimension) at every position.

    ``value`` has shape (1, …, 1, C), of the output's rank; the output has the input's leading
    dimensions. With ``pair=True`` it is returned as ``(output, None)``, the shape of an
    ``nn.MultiheadAttention`` call.
    """

    def __init__(self, value: Tensor, pair: bool = False):
        super().__init__()
        self.value = nn.Parameter(value.detach().clone())
        self.pair = pair

    def forward(self, x: Tensor, *args, **kwargs):
        out = self.value.expand(x.shape[:-1] + self.value.shape[-1:])
        return (out, None) if self.pair else out


class AddConstant(nn.Module):
    """x ↦ x + ``bias``: a residual block whose branches are all constant.

    ``bias`` has shape (1, …, 1, C), of x's rank, and broadcasts over all but the last dimension.
    """

    def __init__(self, bias: Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias
