"""AlexNet for CIFAR-100, bias-free, as in the LOBSTER/SeReNe code (METHODS.md §7)."""

from __future__ import annotations

from torch import Tensor, nn


class AlexNetCifar(nn.Module):
    """AlexNet, CIFAR variant, no biases anywhere.

    conv 64 k3 s2 p1, ReLU, maxpool 2; conv 192 k3 p1, ReLU, maxpool 2; conv 384, conv 256,
    conv 256 (k3 p1, each + ReLU), maxpool 2; flatten (256·2·2 = 1024 on 32×32); Dropout 0.5,
    FC 4096, ReLU, Dropout 0.5, FC 4096, ReLU, ``classifier`` FC C. On 3×32×32 with C = 100:
    23,631,552 parameters, 9,444 neurons, 63.11 M MACs.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        side = ((image_size - 1) // 2 + 1) // 8
        if side < 1:
            raise ValueError(f"Invalid image_size: {image_size} (alexnet expects >= 15)")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 192, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(192, 384, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.head = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(256 * side * side, 4096, bias=False),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096, bias=False),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(4096, num_classes, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.head(self.flatten(self.features(x))))
