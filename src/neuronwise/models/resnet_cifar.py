"""CIFAR ResNets with 6n+2 layers and the option-A shortcut (He et al. 2016; METHODS.md §7)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by 2, then zero-pad ``planes // 4`` channels each side.

    Equals ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))`` of the official
    code; a named module (not a lambda) so the model deep-copies, pickles and fx-traces.
    """

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """conv k3 → BN → ReLU → conv k3 → BN, plus the shortcut, then ReLU; convs without bias."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ShortcutA(planes) if stride != 1 or in_planes != planes else None
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        identity = x if self.shortcut is None else self.shortcut(x)
        # Out of place: BN outputs stay intact for forward hooks, and fx records an ``add``.
        return self.relu2(out + identity)


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for CIFAR: conv 16 k3, BN, ReLU; 3 stages of n blocks (16/32/64 channels).

    Stages 2 and 3 start with stride 2; global average pooling; ``classifier`` Linear 64→C with
    bias. Depth 20/32/56 (n = 3/5/9): paper params 268,346 / 461,882 / 848,954, BN channels
    688 / 1,136 / 2,032. Any square input works (28×28 gives 28² → 14² → 7² maps), so
    ``image_size`` only completes the registry's common signature.
    """

    def __init__(
        self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, image_size: int = 32
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"Invalid depth: {depth!r} (expected 6n+2 with n >= 1)")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, blocks, stride=1)
        self.layer2 = self._stage(16, 32, blocks, stride=2)
        self.layer3 = self._stage(32, 64, blocks, stride=2)
        # Adaptive pooling to 1×1 equals the official avg_pool2d over the whole (square) map and
        # needs no shape read at run time, so fx can trace it.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.classifier(self.flatten(self.pool(x)))


def resnet20(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> ResNetCifar:
    return ResNetCifar(20, num_classes, in_channels, image_size)


def resnet32(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> ResNetCifar:
    return ResNetCifar(32, num_classes, in_channels, image_size)


def resnet56(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> ResNetCifar:
    return ResNetCifar(56, num_classes, in_channels, image_size)
