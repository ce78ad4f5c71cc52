"""Model registry: ``create(name, ...)`` builds any architecture of METHODS.md §7 by name.

Every builder takes ``num_classes``, ``in_channels`` and ``image_size`` (square inputs), plus its
own keyword options; its defaults are the model's natural input (:func:`default_input`: the CIFAR
models 3 channels at 32 px, the LeNets and the MLP 1 channel at 28 px); every model names its final
``nn.Linear`` ``classifier``, uses ``nn.ReLU`` and ``nn.Flatten`` modules, PyTorch's default initialization, and is torch.fx-traceable.

>>> model = create("lenet5", num_classes=10)
>>> classifier_name(model)
'classifier'
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypeVar

from torch import nn

from neuronwise._utils import find_classifier
from neuronwise.models.alexnet import AlexNetCifar
from neuronwise.models.lenet import MLP, LeNet5, LeNet300
from neuronwise.models.resnet_cifar import (
    BasicBlock,
    ResNetCifar,
    ShortcutA,
    resnet20,
    resnet32,
    resnet56,
)
from neuronwise.models.vgg import VGG16Cifar
from neuronwise.models.vit import ViT

__all__ = [
    "MLP",
    "AlexNetCifar",
    "BasicBlock",
    "LeNet5",
    "LeNet300",
    "ResNetCifar",
    "ShortcutA",
    "VGG16Cifar",
    "ViT",
    "available",
    "classifier_name",
    "create",
    "default_input",
    "register",
]

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

_COMMON = ("num_classes", "in_channels", "image_size")
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding a builder ``fn(num_classes, in_channels, image_size, **options)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"Invalid model name: {name!r} (expected a non-empty string)")

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"Invalid model name: {name!r} (already registered)")
        missing = [p for p in _COMMON if p not in inspect.signature(builder).parameters]
        if missing:
            raise TypeError(f"Builder for {name!r} lacks the parameters {missing}")
        _REGISTRY[name] = builder
        return builder

    return decorator


def available() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def default_input(name: str) -> tuple[int, int]:
    """(in_channels, image_size) that ``create(name)`` uses when not given: the builder's own
    defaults, else 1 channel at 28 px."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model: {name!r} (available: {', '.join(available())})")
    parameters = inspect.signature(_REGISTRY[name]).parameters
    found = []
    for field, fallback in (("in_channels", 1), ("image_size", 28)):
        default = parameters[field].default
        found.append(fallback if default is inspect.Parameter.empty else default)
    return found[0], found[1]


def create(
    name: str,
    num_classes: int = 10,
    in_channels: int | None = None,
    image_size: int | None = None,
    **kwargs,
) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` are that model's own options.

    ``in_channels``/``image_size`` default to the model's natural input (:func:`default_input`).
    """
    default_channels, default_size = default_input(name)
    in_channels = default_channels if in_channels is None else in_channels
    image_size = default_size if image_size is None else image_size
    for field, value in zip(_COMMON, (num_classes, in_channels, image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {field}: {value!r} (expected a positive int)")
    builder = _REGISTRY[name]
    parameters = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    options = [p for p in parameters if p not in _COMMON]
    unknown = sorted(set(kwargs) - set(options))
    if unknown and not takes_any:
        expected = f"expected one of: {', '.join(options)}" if options else "it takes no options"
        raise ValueError(f"Invalid option for model {name!r}: {unknown[0]!r} ({expected})")
    return builder(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs
    )


def classifier_name(model: nn.Module) -> str:
    """Name of the classifier head: the last ``nn.Linear`` in ``named_modules()`` order."""
    classifier = find_classifier(model)
    if classifier is None:
        raise ValueError(f"Invalid model: {type(model).__name__} has no nn.Linear classifier")
    return classifier[0]


register("alexnet")(AlexNetCifar)
register("lenet300")(LeNet300)
register("lenet5")(LeNet5)
register("mlp")(MLP)
register("resnet20")(resnet20)
register("resnet32")(resnet32)
register("resnet56")(resnet56)
register("vgg16")(VGG16Cifar)
register("vit")(ViT)
