"""A small pre-norm Vision Transformer for MNIST-sized inputs (28×28, one channel).

Patches of ``patch_size`` pixels are embedded by a strided ``Conv2d`` and given a learned position
embedding; ``depth`` pre-norm blocks x ← x + attn(LN(x)); x ← x + mlp(LN(x)) follow, then a final
LayerNorm, the mean over tokens and the ``classifier``. The attention is timm's layout
(:class:`neuronwise.transformer.Attention`: ``qkv`` Linear, ``F.scaled_dot_product_attention``,
``proj``) or, with ``attention="torch"``, ``nn.MultiheadAttention``. The MLP is fc1 → GELU → fc2.

Defaults (patch 7, width 128, 6 blocks, 4 heads, MLP ratio 4) on 1×28×28: 16 tokens,
1,199,626 parameters (10 classes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from neuronwise.transformer.modules import Attention

ATTENTIONS = ("sdpa", "torch")


class Mlp(nn.Module):
    """fc1 (dim → hidden), GELU, fc2 (hidden → dim): the FFN of a transformer block."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attention: str = "sdpa"):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"Invalid attention: {attention!r} (expected one of {ATTENTIONS})")
        self.torch_attention = attention == "torch"
        self.norm1 = nn.LayerNorm(dim)
        if self.torch_attention:
            self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        else:
            self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        if self.torch_attention:
            h = self.attn(h, h, h, need_weights=False)[0]
        else:
            h = self.attn(h)
        x = x + h
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer: patch embedding, ``depth`` :class:`Block`\\ s, mean pooling, classifier."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        patch_size: int = 7,
        dim: int = 128,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        attention: str = "sdpa",
    ):
        super().__init__()
        for field, value in (("patch_size", patch_size), ("dim", dim), ("depth", depth),
                             ("num_heads", num_heads)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {field}: {value!r} (expected a positive int)")
        if image_size % patch_size:
            raise ValueError(
                f"Invalid patch_size: {patch_size} (does not divide image_size {image_size})"
            )
        if dim % num_heads:
            raise ValueError(f"Invalid num_heads: {num_heads} (does not divide dim {dim})")
        if not isinstance(mlp_ratio, (int, float)) or isinstance(mlp_ratio, bool) or mlp_ratio <= 0:
            raise ValueError(f"Invalid mlp_ratio: {mlp_ratio!r} (expected a positive number)")
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.flatten = nn.Flatten(2)
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, tokens, dim), std=0.02))
        self.blocks = nn.Sequential(
            *(Block(dim, num_heads, mlp_ratio, attention) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(self.patch_embed(x)).transpose(1, 2) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.classifier(x.mean(1))
