"""Fully connected and LeNet-5 networks for MNIST-sized inputs (METHODS.md §7).

ReLUs are ``nn.ReLU`` modules and never in place, so forward hooks (NEq, SeReNe, PSP-entropy) see
each layer's own output; flattening is an ``nn.Flatten`` module, so torch.fx sees it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class LeNet300(nn.Module):
    """LeNet-300-100: flatten, FC d→300, ReLU, FC 300→100, ReLU, FC 100→C, with biases.

    d = in_channels·image_size² (784 for MNIST). Paper params 266,610, neurons 410, MACs 266,200.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.classifier = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        x = self.relu2(self.fc2(x))
        return self.classifier(x)


class LeNet5(nn.Module):
    """LeNet-5, Caffe variant: conv 20 k5, maxpool 2, conv 50 k5, maxpool 2, FC 500, FC C.

    No padding, biases everywhere, ReLU after conv1, conv2 and fc1. On 1×28×28 the maps are
    24² → 12² → 8² → 4², so fc1 is 800→500; the flatten size follows ``image_size`` (≥ 16).
    Paper params 431,080, neurons 580, MACs 2,293,000 (1×28×28).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"Invalid image_size: {image_size} (lenet5 expects >= 16)")
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.relu3 = nn.ReLU()
        self.classifier = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.classifier(x)


class MLP(nn.Module):
    """Multilayer perceptron: flatten, then (FC, ReLU) per hidden width, then FC to C classes.

    Meant for scikit-learn's 8×8 digits (``image_size=8``: d = in_channels·image_size² = 64).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        hidden: Sequence[int] = (128, 64),
    ) -> None:
        super().__init__()
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise TypeError(f"Invalid hidden: {hidden!r} (expected a sequence of positive ints)")
        for width in hidden:
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(
                    f"Invalid hidden: {tuple(hidden)!r} (expected a sequence of positive ints)"
                )
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        width_in = in_channels * image_size * image_size
        for width in hidden:
            layers += [nn.Linear(width_in, width), nn.ReLU()]
            width_in = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.flatten(x)))
