"""VGG-16 for CIFAR-10 in the two variants of the LOBSTER/SeReNe code (METHODS.md §7)."""

from __future__ import annotations

from torch import Tensor, nn

# Output channels of the 13 convolutions; "M" is a 2×2 max-pool with stride 2.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VARIANTS = ("1L", "2L")


class VGG16Cifar(nn.Module):
    """VGG-16 with BatchNorm: 13 × (conv k3 p1 with bias, BN2d, ReLU), 5 max-pools, then a head.

    ``variant="1L"``: floor pools, BN eps 1e-5, ``classifier`` Linear 512→C (paper params
    14,719,818, neurons 4,234, MACs 313.20 M on 3×32×32).
    ``variant="2L"``: BN eps 1e-3; Dropout 0.3 after the first conv block and 0.4 after every other
    block not followed by a pool; ceil-mode pools; head Dropout 0.5, FC 512→512, BN1d, ReLU,
    Dropout 0.5, ``classifier`` FC 512→C (paper params 14,982,474, neurons 4,746, 313.46 M MACs).
    The first FC takes 512·s² inputs, s the final map side (1 for 32×32).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        variant: str = "1L",
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"Invalid variant: {variant!r} (expected one of {VARIANTS})")
        ceil = variant == "2L"
        side = image_size
        for _ in range(_VGG16.count("M")):
            side = -(-side // 2) if ceil else side // 2
        if side < 1:
            raise ValueError(f"Invalid image_size: {image_size} (vgg16 '1L' expects >= 32)")

        layers: list[nn.Module] = []
        width_in = in_channels
        for index, item in enumerate(_VGG16):
            if item == "M":
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=ceil))
                continue
            layers += [
                nn.Conv2d(width_in, item, 3, padding=1),
                nn.BatchNorm2d(item, eps=1e-3 if ceil else 1e-5),
                nn.ReLU(),
            ]
            if ceil and _VGG16[index + 1] != "M":
                layers.append(nn.Dropout(0.3 if index == 0 else 0.4))
            width_in = item
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        features = 512 * side * side
        if ceil:
            self.head: nn.Sequential | None = nn.Sequential(
                nn.Dropout(0.5),
                nn.Linear(features, 512),
                nn.BatchNorm1d(512),
                nn.ReLU(),
                nn.Dropout(0.5),
            )
            features = 512
        else:
            self.head = None
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(self.features(x))
        if self.head is not None:
            x = self.head(x)
        return self.classifier(x)
