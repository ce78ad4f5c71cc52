"""Model registry and architectures: shapes, METHODS.md §7 counts, tracing, copying, validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from neuronwise import metrics, models

CIFAR = {"in_channels": 3, "image_size": 32}

# METHODS.md §7 table: (name, options, paper params, all params, neurons, MACs). MACs are exact
# integers for the LeNets and millions to 2 decimals for the others, as the table gives them.
TABLE = [
    ("lenet300", {}, 266_610, 266_610, 410, 266_200),
    ("lenet5", {}, 431_080, 431_080, 580, 2_293_000),
    ("resnet20", CIFAR, 268_346, 269_722, 698, 40.55),
    ("resnet32", CIFAR, 461_882, 464_154, 1_146, 68.86),
    ("resnet56", CIFAR, 848_954, 853_018, 2_042, 125.49),
    ("vgg16", CIFAR, 14_719_818, 14_728_266, 4_234, 313.20),
    ("vgg16", {**CIFAR, "variant": "2L"}, 14_982_474, 14_991_946, 4_746, 313.46),
    ("alexnet", {**CIFAR, "num_classes": 100}, 23_631_552, 23_631_552, 9_444, 63.11),
]

# Every registered model on a small natural input: (name, options).
NATURAL = [
    ("lenet300", {}),
    ("lenet5", {}),
    ("resnet20", CIFAR),
    ("resnet32", {"image_size": 12}),
    ("resnet56", {"image_size": 16}),
    ("vgg16", CIFAR),
    ("vgg16", {"variant": "2L"}),
    ("alexnet", {**CIFAR, "num_classes": 100}),
    ("mlp", {"image_size": 8}),
]


def _input(name: str, options: dict, batch: int = 2) -> torch.Tensor:
    channels, side = models.default_input(name)
    side = options.get("image_size", side)
    return torch.randn(batch, options.get("in_channels", channels), side, side)


def _ids(cases):
    return [
        f"{case[0]}-{case[1].get('variant', '')}{case[1].get('image_size', '')}" for case in cases
    ]


@pytest.mark.parametrize(
    ("name", "options", "paper", "every", "neurons", "mac"), TABLE, ids=_ids(TABLE)
)
def test_counts_match_methods_table(name, options, paper, every, neurons, mac):
    model = models.create(name, **options)
    assert metrics.count_parameters(model, "paper") == paper
    assert metrics.count_parameters(model, "all") == every
    assert metrics.count_neurons(model)["total"] == (neurons, neurons)
    measured = metrics.macs(model, _input(name, options, batch=1))
    if isinstance(mac, int):
        assert measured == mac
    else:
        assert round(measured / 1e6, 2) == mac


@pytest.mark.parametrize(
    ("name", "blocks", "bn_channels"),
    [("resnet20", 3, 688), ("resnet32", 5, 1136), ("resnet56", 9, 2032)],
)
def test_resnet_depth_and_batchnorm_channels(name, blocks, bn_channels):
    model = models.create(name, **CIFAR)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [blocks] * 3
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert sum(bn.num_features for bn in bns) == bn_channels
    assert all(conv.bias is None for conv in model.modules() if isinstance(conv, nn.Conv2d))


@pytest.mark.parametrize(("name", "options"), NATURAL, ids=_ids(NATURAL))
def test_forward_shape_trace_and_deepcopy(name, options):
    model = models.create(name, **options).eval()
    x = _input(name, options)
    y = model(x)
    assert y.shape == (2, options.get("num_classes", 10))

    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), y, rtol=0, atol=0)
    # ReLUs are modules, never functional or in place, so hooks see every layer's own output.
    functional = {F.relu, torch.relu, torch.relu_}
    assert not [n for n in traced.graph.nodes if n.op == "call_function" and n.target in functional]
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(relu.inplace for relu in relus)

    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), y, rtol=0, atol=0)
    with torch.no_grad():
        clone.classifier.weight.zero_()
    assert model.classifier.weight.abs().sum() > 0


@pytest.mark.parametrize(("name", "options"), NATURAL, ids=_ids(NATURAL))
def test_classifier_is_last_linear_and_default_init(name, options):
    model = models.create(name, **options)
    assert models.classifier_name(model) == "classifier"
    assert model.classifier.out_features == options.get("num_classes", 10)
    for module in model.modules():
        # PyTorch default: kaiming_uniform(a=√5), i.e. |w| ≤ 1/√fan_in; BN γ = 1, β = 0.
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            assert module.weight.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))


@pytest.mark.parametrize(
    ("name", "options", "shape"),
    [
        ("lenet300", {"in_channels": 3, "image_size": 32}, (3, 32, 32)),
        ("lenet5", {"in_channels": 3, "image_size": 32}, (3, 32, 32)),
        ("resnet20", {"in_channels": 1, "image_size": 28}, (1, 28, 28)),
        ("vgg16", {"variant": "2L", "in_channels": 1, "image_size": 28}, (1, 28, 28)),
        ("alexnet", {"in_channels": 1, "image_size": 28}, (1, 28, 28)),
        ("mlp", {"hidden": [5]}, (1, 28, 28)),
    ],
)
def test_other_input_sizes(name, options, shape):
    model = models.create(name, num_classes=7, **options).eval()
    assert model(torch.randn(3, *shape)).shape == (3, 7)


def test_lenet_shapes_follow_input_size():
    assert models.create("lenet300", in_channels=3, image_size=32).fc1.in_features == 3 * 32 * 32
    assert models.create("lenet5").fc1.in_features == 50 * 4 * 4
    assert models.create("lenet5", image_size=32).fc1.in_features == 50 * 5 * 5
    mlp = models.create("mlp", image_size=8)
    widths = [(m.in_features, m.out_features) for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert widths == [(64, 128), (128, 64), (64, 10)]


def test_resnet_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(1, 16, 8, 8)
    y = models.ShortcutA(32)(x)
    assert y.shape == (1, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()
    model = models.create("resnet20")
    assert model.layer1[0].shortcut is None
    assert isinstance(model.layer2[0].shortcut, models.ShortcutA)
    assert model.layer2[0].conv1.stride == (2, 2)


def test_resnet_block_adds_shortcut_before_last_relu():
    block = models.BasicBlock(4, 4).eval()
    with torch.no_grad():
        block.conv2.weight.zero_()
    x = torch.randn(2, 4, 5, 5)
    # conv2 zeroed: the branch is BN's shift β − γμ/σ = 0 at init, so the block is relu(x + 0);
    # a ReLU applied before the add would give x instead.
    torch.testing.assert_close(block(x), torch.relu(x))


def test_vgg_variants():
    one = models.create("vgg16", **CIFAR)
    two = models.create("vgg16", **CIFAR, variant="2L")
    assert not any(isinstance(m, nn.Dropout) for m in one.modules())
    assert {bn.eps for bn in one.modules() if isinstance(bn, nn.BatchNorm2d)} == {1e-5}
    assert {bn.eps for bn in two.modules() if isinstance(bn, nn.BatchNorm2d)} == {1e-3}
    pools = [m for m in two.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5 and all(pool.ceil_mode for pool in pools)
    feature_dropouts = [m.p for m in two.features if isinstance(m, nn.Dropout)]
    assert feature_dropouts == [0.3] + [0.4] * 7
    assert [type(m) for m in two.head] == [
        nn.Dropout,
        nn.Linear,
        nn.BatchNorm1d,
        nn.ReLU,
        nn.Dropout,
    ]
    assert two.head[0].p == two.head[4].p == 0.5
    assert all(conv.bias is not None for conv in one.modules() if isinstance(conv, nn.Conv2d))


def test_alexnet_has_no_biases():
    model = models.create("alexnet", **CIFAR, num_classes=100)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(layers) == 8 and all(layer.bias is None for layer in layers)
    assert model.head[1].in_features == 1024


def test_registry_lists_and_rejects():
    assert models.available() == sorted(
        ["lenet300", "lenet5", "resnet20", "resnet32", "resnet56", "vgg16", "alexnet", "mlp", "vit"]
    )
    with pytest.raises(ValueError, match=r"Unknown model: 'lenet7' \(available: alexnet, lenet300"):
        models.create("lenet7")
    with pytest.raises(
        ValueError, match=r"Invalid option for model 'lenet5': 'depth' \(it takes no options\)"
    ):
        models.create("lenet5", depth=3)
    with pytest.raises(ValueError, match=r"'varaint' \(expected one of: variant\)"):
        models.create("vgg16", varaint="2L")
    for field, value in [
        ("num_classes", 0),
        ("in_channels", -1),
        ("image_size", 2.0),
        ("num_classes", True),
    ]:
        with pytest.raises(
            ValueError, match=rf"Invalid {field}: {value!r} \(expected a positive int\)"
        ):
            models.create("lenet300", **{field: value})


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("lenet5", {"image_size": 15}, r"Invalid image_size: 15 \(lenet5 expects >= 16\)"),
        ("alexnet", {"image_size": 14}, r"Invalid image_size: 14 \(alexnet expects >= 15\)"),
        ("vgg16", {"image_size": 28}, r"Invalid image_size: 28 \(vgg16 '1L' expects >= 32\)"),
        ("vgg16", {"variant": "3L"}, r"Invalid variant: '3L'"),
        ("mlp", {"hidden": (4, 0)}, r"Invalid hidden: \(4, 0\)"),
    ],
)
def test_model_options_are_validated(name, options, message):
    with pytest.raises(ValueError, match=message):
        models.create(name, **options)


def test_smallest_valid_inputs_and_hidden_type():
    models.create("lenet5", image_size=16)
    models.create("alexnet", image_size=15)
    models.create("vgg16", image_size=32)
    with pytest.raises(TypeError, match="Invalid hidden: '64'"):
        models.create("mlp", hidden="64")


@pytest.fixture
def scratch_registration():
    name = "test-scratch-net"
    yield name
    models._REGISTRY.pop(name, None)


def test_register_adds_a_builder(scratch_registration):
    @models.register(scratch_registration)
    def build(num_classes, in_channels, image_size, width=4):
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size**2, width),
            nn.Linear(width, num_classes),
        )

    assert scratch_registration in models.available()
    model = models.create(scratch_registration, num_classes=3, image_size=2, width=5)
    assert model(torch.randn(1, 1, 2, 2)).shape == (1, 3)
    assert models.classifier_name(model) == "2"
    with pytest.raises(ValueError, match="already registered"):
        models.register(scratch_registration)(build)
    with pytest.raises(TypeError, match=r"lacks the parameters \['in_channels', 'image_size'\]"):
        models.register("test-scratch-other")(lambda num_classes: nn.Linear(1, num_classes))


def test_classifier_name_needs_a_linear():
    with pytest.raises(ValueError, match="Conv2d has no nn.Linear classifier"):
        models.classifier_name(nn.Conv2d(1, 1, 1))
    nested = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
    assert models.classifier_name(nested) == "1.0"


@pytest.mark.parametrize(
    ("name", "shape"),
    [("resnet20", (3, 32, 32)), ("vgg16", (3, 32, 32)), ("alexnet", (3, 32, 32)),
     ("lenet5", (1, 28, 28)), ("lenet300", (1, 28, 28)), ("mlp", (1, 28, 28))],
)
def test_defaults_are_each_models_natural_input(name, shape):
    assert models.default_input(name) == (shape[0], shape[1])
    model = models.create(name).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 10)
    with pytest.raises(ValueError, match="Unknown model: 'resnet7'"):
        models.default_input("resnet7")
