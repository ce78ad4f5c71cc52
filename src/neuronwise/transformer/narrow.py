r"""Which heads of an attention, and which dims inside each head, contribute to its output.

H heads of d dims, in-projection rows [q | k | v] (weight W, bias b), output projection P. Head h
computes softmax(s · q_h k_hᵀ) v_h with s the stored scale, then P[:, h] maps it back. Per dim:

- **score dim** c of head h (a q row with its k row) enters the scores as s·q_c(i)·k_c(j). If the
  k row W_k[c] is zero, k_c(j) = b_k[c] for every key j, the term is constant along each softmax
  row and softmax ignores it; if the q row and q bias are both zero, q_c ≡ 0. Either way the dim
  goes, with s kept as it was (it is not recomputed from the new width).
- **value dim** e enters the output as P[:, e]·(Σ_j a_ij v_e(j)). It goes when P[:, e] is zero, or
  when the v row W_v[e] is zero: v_e ≡ b_v[e] and, each softmax row summing to 1, the output is
  the constant P[:, e]·b_v[e], folded into P's bias.

A head with no value dim left is dead (it outputs a constant); it goes whole, its score dims with
it. A head with no score dim left attends uniformly: it outputs P_h·(mean over keys of v_h), a
linear map of the token mean that needs no attention at all (``uniform``). The kept heads share one width d′ = max(score dims, value dims, 1) over them (one width lets
``F.scaled_dot_product_attention`` take its fast path; different q/k and v widths measured slower
here): each head's kept dims come first, then zero rows (zero weight and bias) up to d′. A zero
q and k row adds 0 to every score; a zero v row behind a zero P column adds 0 to the output. When
no head has fewer than d live dims, d′ = d and the heads are kept whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["HeadPlan", "gather_rows", "mean_branch", "plan_heads", "zero_rows"]


@dataclass(frozen=True)
class HeadPlan:
    """The new layout of one attention.

    ``heads``: the old indices of the heads kept; ``width``: their common new head dim. ``rows``: in-projection rows of the new module (q, then k, then v, each ``heads · width``),
    indices into the old rows, −1 for a zero row. ``columns``: output-projection columns of the new
    module, indices into the old columns, −1 for a zero column. ``folded``: old value dims (flat
    H·d) whose constant P[:, e]·b_v[e] moves into P's bias. ``uniform``: the kept heads without a
    score dim, whose softmax rows are uniform (each outputs the mean of its values over the keys).
    """

    heads: list[int]
    uniform: list[int]
    width: int
    rows: Tensor
    columns: Tensor
    folded: Tensor

    @property
    def padded(self) -> bool:
        """Whether the new weights hold zero rows or columns not taken from the old ones."""
        return bool((self.rows < 0).any() or (self.columns < 0).any())


def zero_rows(weight: Tensor) -> Tensor:
    """Per row of ``weight``: whether all its entries are zero."""
    return (weight.detach() == 0).flatten(1).all(1)


def plan_heads(layer_in: nn.Linear, proj: nn.Linear, heads: int, head_dim: int) -> HeadPlan:
    """The heads and dims of an attention that stay (module docstring), as a :class:`HeadPlan`."""
    d, inner = head_dim, heads * head_dim
    zero = zero_rows(layer_in.weight).cpu().view(3, heads, d)
    bias = layer_in.bias
    zero_bias = (bias.detach() == 0).cpu().view(3, heads, d) if bias is not None else (
        torch.ones_like(zero))
    unused = zero_rows(proj.weight.detach().t()).cpu().view(heads, d)
    value_live = ~zero[2] & ~unused
    score_live = ~zero[1] & ~(zero[0] & zero_bias[0])
    kept = [h for h in range(heads) if bool(value_live[h].any())]
    uniform = [h for h in kept if not bool(score_live[h].any())]
    narrow = any(int(value_live[h].sum()) < d or int(score_live[h].sum()) < d for h in kept)
    if kept and narrow:
        width = max(1, max(int(m[h].sum()) for h in kept for m in (score_live, value_live)))
    else:
        width = d
    if width == d:  # whole heads: every dim of a kept head stays
        score_live = value_live = torch.ones_like(unused)
    score, value = [], []
    for h in kept:
        for live, out in ((score_live[h], score), (value_live[h], value)):
            dims = (h * d + live.nonzero().flatten()).tolist()
            out.extend(dims + [-1] * (width - len(dims)))
    score_t, value_t = torch.tensor(score, dtype=torch.long), torch.tensor(value, dtype=torch.long)
    rows = torch.cat([_shift(score_t, 0), _shift(score_t, inner), _shift(value_t, 2 * inner)])
    kept_values = torch.zeros(inner, dtype=torch.bool)
    kept_values[value_t[value_t >= 0]] = True
    folded = zero[2].flatten() & ~unused.flatten() & ~kept_values
    return HeadPlan(kept, uniform, width, rows, value_t, folded.nonzero().flatten())


def _shift(index: Tensor, offset: int) -> Tensor:
    return torch.where(index >= 0, index + offset, index)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` along dim 0, a zero row where the index is −1."""
    padded = torch.cat([x.detach(), x.new_zeros((1,) + x.shape[1:])])
    index = torch.where(index >= 0, index, x.shape[0]).to(x.device)
    return padded.index_select(0, index).clone()


def mean_branch(
    layer_in: nn.Linear, proj: nn.Linear, head_dim: int, heads: list[int]
) -> tuple[Tensor, Tensor]:
    """(weight, bias) in float64 of the map x̄ ↦ Σ_h P_h (W_v,h x̄ + b_v,h) over uniform ``heads``.

    With E the value rows of those heads: weight = P[:, E] W_v[E], bias = P[:, E] b_v[E].
    """
    inner = layer_in.out_features // 3
    dims = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
    dims = dims.to(proj.weight.device)
    p = proj.weight.detach().double()[:, dims]
    weight = p @ layer_in.weight.detach().double()[2 * inner + dims]
    if layer_in.bias is None:
        return weight, torch.zeros(p.shape[0], dtype=torch.float64, device=p.device)
    return weight, p @ layer_in.bias.detach().double()[2 * inner + dims]
