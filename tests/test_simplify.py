"""simplify: same function, fewer neurons; residual streams; export and optimizer state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from neuronwise.structure import (
    BiasMapConv2d,
    BorderBiasConv2d,
    export_onnx,
    load_simplified,
    remap_optimizer_state,
    save_simplified,
    simplify,
)


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.rand(n, generator=generator) * 2 - 1)


def kill_rows(layer: nn.Module, rows) -> None:
    with torch.no_grad():
        layer.weight[list(rows)] = 0.0


def assert_same_function(model, small, x):
    y, y_small = model(x), small(x)
    assert y_small.shape == y.shape
    assert (y - y_small).abs().max() <= 1e-5 * y.abs().max()
    # Argmax may only differ on near-ties, which the 1e-5 bound already covers.
    top2 = y.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4 * y.abs().max()
    assert torch.equal(y.argmax(1)[clear], y_small.argmax(1)[clear])


def n_params(model, only_weights=False):
    return sum(p.numel() for n, p in model.named_parameters() if not only_weights or "weight" in n)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


# ---------------------------------------------------------------- property tests


def make_mlp(generator, widths, batchnorm, bias, act):
    layers, inputs = [], widths[0]
    for width in widths[1:-1]:
        layers.append(nn.Linear(inputs, width, bias=bias))
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(act())
        inputs = width
    layers.append(nn.Linear(inputs, widths[-1]))
    model = nn.Sequential(*layers)
    randomize_batchnorm(model, generator)
    return model


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    widths=st.lists(st.integers(2, 8), min_size=3, max_size=5),
    batchnorm=st.booleans(),
    bias=st.booleans(),
    act=st.sampled_from([nn.ReLU, nn.Tanh, nn.Sigmoid, lambda: nn.ReLU(inplace=True)]),
    dead=st.floats(0.1, 0.9),
    fuse_bn=st.booleans(),
)
def test_mlp_with_dead_neurons_same_function(seed, widths, batchnorm, bias, act, dead, fuse_bn):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = make_mlp(g, widths, batchnorm, bias, act).eval()
    hidden = [m for m in model if isinstance(m, nn.Linear)][:-1]
    for i, layer in enumerate(hidden):
        rows = (torch.rand(layer.out_features, generator=g) < dead).nonzero().flatten().tolist()
        kill_rows(layer, rows + ([0] if i == 0 else []))
    before = snapshot(model)
    small = simplify(model, torch.zeros(1, widths[0]), fuse_bn=fuse_bn)
    assert_unchanged(model, before)
    assert_same_function(model, small, torch.randn(16, widths[0], generator=g))
    assert n_params(small) < n_params(model)


class RandomCNN(nn.Module):
    def __init__(self, channels, padding, batchnorm, pool):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(2, c1, 3, padding=padding)
        self.bn1 = nn.BatchNorm2d(c1) if batchnorm else nn.Identity()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=padding)
        self.bn2 = nn.BatchNorm2d(c2) if batchnorm else nn.Identity()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        side = 8 if padding else 4
        side = side // 2 if pool else side
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * side * side, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        return self.fc2(torch.relu(self.fc1(self.flatten(x))))


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    channels=st.tuples(st.integers(2, 6), st.integers(2, 6)),
    padding=st.sampled_from([0, 1]),
    batchnorm=st.booleans(),
    pool=st.booleans(),
    dead=st.floats(0.1, 0.9),
    fuse_bn=st.booleans(),
)
def test_cnn_with_dead_channels_same_function(
    seed, channels, padding, batchnorm, pool, dead, fuse_bn
):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = RandomCNN(channels, padding, batchnorm, pool)
    randomize_batchnorm(model, g)
    model.eval()
    for layer in (model.conv1, model.conv2, model.fc1):
        rows = torch.rand(layer.weight.shape[0], generator=g) < dead
        kill_rows(layer, rows.nonzero().flatten().tolist() + [0])
    before = snapshot(model)
    small = simplify(model, torch.zeros(1, 2, 8, 8), fuse_bn=fuse_bn)
    assert_unchanged(model, before)
    assert_same_function(model, small, torch.randn(8, 2, 8, 8, generator=g))
    assert n_params(small, only_weights=True) < n_params(model, only_weights=True)
    if not padding:  # without zero padding every folded constant is a plain bias
        assert n_params(small) < n_params(model)


# ---------------------------------------------------------------- structure


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 5)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 20)
        self.fc2 = nn.Linear(20, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


def test_flatten_drops_channel_blocks_and_classifier_is_pinned():
    model = LeNet().eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(0))
    kill_rows(model.conv2, [1, 3])
    kill_rows(model.fc2, [4])
    small = simplify(model, torch.zeros(1, 1, 28, 28))
    assert small.get_submodule("conv2").out_channels == 6
    assert small.get_submodule("fc1").in_features == 6 * 4 * 4
    assert small.get_submodule("fc2").out_features == 10
    assert not any(isinstance(m, nn.BatchNorm2d) for m in small.modules())
    assert_same_function(model, small, torch.randn(16, 1, 28, 28))


def test_zero_padding_gives_a_border_kernel_and_no_padding_a_bias():
    for padding, expected in ((1, BorderBiasConv2d), (0, nn.Conv2d)):
        model = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=padding)
        ).eval()
        kill_rows(model[0], [1])
        with torch.no_grad():
            model[0].bias[1] = 0.7  # the dead channel outputs relu(0.7) everywhere
        small = simplify(model, torch.zeros(1, 1, 6, 6))
        assert type(small.get_submodule("2")) is expected
        assert small.get_submodule("2").in_channels == 2
        # The last layer's outputs are the model output: pinned, so no removal there.
        assert_same_function(model, small, torch.randn(4, 1, 6, 6))
        # A folded kernel, not a map: any input size.
        assert_same_function(model, small, torch.randn(4, 1, 9, 7))
    # Zero-padded average pooling makes the constant itself non-uniform: a bias map.
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.AvgPool2d(3, 1, 1), nn.Conv2d(3, 2, 3, padding=1)
    ).eval()
    kill_rows(model[0], [1])
    small = simplify(model, torch.zeros(1, 1, 6, 6))
    assert type(small.get_submodule("2")) is BiasMapConv2d
    assert small.get_submodule("2").bias_map.shape == (2, 6, 6)
    assert_same_function(model, small, torch.randn(4, 1, 6, 6))


def test_pinned_modules_keep_dead_rows():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2))
    kill_rows(model[0], [0, 1])
    kill_rows(model[2], [2])
    small = simplify(model, torch.zeros(1, 4), pinned=[model[0]])
    assert small.get_submodule("0").out_features == 5
    assert small.get_submodule("2").out_features == 4
    assert simplify(model, torch.zeros(1, 4), pinned=["2"]).get_submodule("2").out_features == 5
    with pytest.raises(ValueError, match="Invalid pinned entry"):
        simplify(model, torch.zeros(1, 4), pinned=["nope"])


def test_unknown_operations_keep_their_channels():
    class Cumulative(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(8, 2)

        def forward(self, x):  # a cumulative sum mixes channels: not in simplify's vocabulary
            return self.head(torch.cat([self.a(x).cumsum(1), F.relu(self.b(x))], dim=1))

    model = Cumulative()
    kill_rows(model.a, [0])
    kill_rows(model.b, [1])
    small = simplify(model, torch.zeros(1, 3))
    assert small.get_submodule("a").out_features == 4
    assert small.get_submodule("b").out_features == 3  # the concatenation maps b's channels
    assert small.get_submodule("head").in_features == 7
    assert_same_function(model, small, torch.randn(5, 3))


# ---------------------------------------------------------------- residual streams


class Block(nn.Module):
    def __init__(self, inputs, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if stride != 1 or inputs != planes else 0

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad)) if self.pad else x
        return F.relu(out + shortcut)


class TinyResNet(nn.Module):
    """CIFAR-style ResNet (option-A shortcut), one block per stage."""

    def __init__(self, widths=(8, 16), classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks, inputs = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(Block(inputs, width, 1 if i == 0 else 2))
            inputs = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(inputs, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def zero_channel(conv, bn, k, shift=0.0):
    """Kill conv row k; the BN then outputs `shift` there (0 makes the channel exactly zero)."""
    kill_rows(conv, [k])
    with torch.no_grad():
        bn.running_mean[k] = 0.0
        bn.bias[k] = shift


def test_residual_stream_channel_dead_everywhere_is_removed():
    model = TinyResNet()
    randomize_batchnorm(model, torch.Generator().manual_seed(0))
    model.eval()
    b1, b2 = model.blocks
    zero_channel(model.conv, model.bn, 1)  # zero in every producer of stage-1 channel 1 ...
    zero_channel(b1.conv2, b1.bn2, 1)
    zero_channel(b2.conv2, b2.bn2, 1 + 4)  # ... which the shortcut pads into stage-2 channel 5
    zero_channel(b2.conv2, b2.bn2, 0)  # stage-2 channel 0: padded zeros + a zero conv2 row
    zero_channel(model.conv, model.bn, 2)  # partially dead: b1.conv2 row 2 is alive
    zero_channel(model.conv, model.bn, 3, shift=0.5)  # constant stream channels fold too
    zero_channel(b1.conv2, b1.bn2, 3, shift=0.5)
    zero_channel(b2.conv2, b2.bn2, 3 + 4, shift=0.5)
    zero_channel(b1.conv1, b1.bn1, 6, shift=0.5)  # block-internal: removed (constant folded)
    x = torch.randn(8, 3, 16, 16)

    small = simplify(model, torch.zeros(1, 3, 16, 16))
    assert small.get_submodule("conv").out_channels == 6
    assert small.get_submodule("blocks.0.conv1").in_channels == 6
    assert small.get_submodule("blocks.0.conv1").out_channels == 7
    assert small.get_submodule("blocks.0.conv2").out_channels == 6
    assert small.get_submodule("blocks.1.conv1").in_channels == 6
    assert small.get_submodule("blocks.1.conv2").out_channels == 13
    assert small.get_submodule("fc").in_features == 13
    assert_same_function(model, small, x)

    official = simplify(model, torch.zeros(1, 3, 16, 16), prune_residual_stream=False)
    assert official.get_submodule("conv").out_channels == 8
    assert official.get_submodule("blocks.0.conv1").out_channels == 7
    assert official.get_submodule("blocks.1.conv2").out_channels == 16
    assert_same_function(model, official, x)


def kill_random_channels(model, fraction, generator):
    """The official acceptance test: zero a random `fraction` of every Conv2d's output channels
    and of every BatchNorm2d's γ."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                n = m.weight.shape[0]
                m.weight[torch.randperm(n, generator=generator)[: int(fraction * n)]] = 0.0


@pytest.mark.parametrize("build", [LeNet, lambda: TinyResNet((8, 16, 32))], ids=["lenet", "resnet"])
def test_official_acceptance_80_percent_channels(build):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build()
    randomize_batchnorm(model, g)
    kill_random_channels(model, 0.8, g)
    model.eval()
    shape = (1, 28, 28) if isinstance(model, LeNet) else (3, 32, 32)
    small = simplify(model, torch.zeros(1, *shape))
    x = torch.randn(256, *shape, generator=g)
    y, y_small = model(x), small(x)
    assert torch.equal(y.argmax(1), y_small.argmax(1))
    assert (y - y_small).abs().max() <= 1e-5 * y.abs().max()
    assert n_params(small, only_weights=True) < 0.5 * n_params(model, only_weights=True)


@pytest.mark.parametrize("name, shape", [("lenet5", (1, 28, 28)), ("resnet20", (3, 32, 32))])
def test_registry_models_acceptance(name, shape):
    models = pytest.importorskip("neuronwise.models")
    if name not in models.available():
        pytest.skip(f"{name} not registered yet")
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = models.create(name, num_classes=10, in_channels=shape[0], image_size=shape[1])
    randomize_batchnorm(model, g)
    kill_random_channels(model, 0.8, g)
    model.eval()
    small = simplify(model, torch.zeros(1, *shape))
    x = torch.randn(256, *shape, generator=g)
    y, y_small = model(x), small(x)
    assert torch.equal(y.argmax(1), y_small.argmax(1))
    assert (y - y_small).abs().max() <= 1e-5 * y.abs().max()


def test_channels_before_an_nn_flatten_module_are_removed():
    # LeNet-5 flattens with an nn.Flatten module: conv2's dead channels and fc1's columns that read
    # them (4·4 = 16 each) must go, as with torch.flatten
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(generator=g)
        model[0].bias[[1, 4]] = 0.0
    kill_rows(model[0], [1, 4])
    model.eval()
    small = simplify(model, torch.zeros(1, 1, 6, 6))
    assert small.get_submodule("0").out_channels == 4
    assert small.get_submodule("3").in_features == 4 * 16
    assert_same_function(model, small, torch.randn(8, 1, 6, 6, generator=g))


# ---------------------------------------------------------------- export and optimizer state


def test_save_load_round_trip_without_neuronwise_classes(tmp_path):
    model = LeNet().eval()
    kill_rows(model.conv1, [0, 2])
    kill_rows(model.fc1, [5])
    small = simplify(model, torch.zeros(1, 1, 28, 28))
    path = tmp_path / "small.pt2"
    save_simplified(small, path)  # the example input's shape is known from simplify()
    loaded = load_simplified(path)
    plain = torch.export.load(path).module()
    x = torch.randn(5, 1, 28, 28)  # another batch size than the example
    torch.testing.assert_close(loaded(x), small(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plain(x), small(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="Invalid example_input: None"):
        save_simplified(model, tmp_path / "dense.pt2")


def test_onnx_output_equals_torch(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    ).eval()  # fmt: skip
    kill_rows(model[0], [1])
    small = simplify(model, torch.zeros(1, 1, 6, 6))
    assert isinstance(small.get_submodule("2"), BorderBiasConv2d)
    path = tmp_path / "small.onnx"
    export_onnx(small, torch.zeros(1, 1, 6, 6), path)
    session = ort.InferenceSession(str(path))
    x = torch.randn(3, 1, 6, 6)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    expected = small(x).detach()
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=1e-2),
], ids=["sgd", "adam"])  # fmt: skip
def test_remap_optimizer_state_follows_kept_rows(make_opt):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    opt = make_opt(model.parameters())
    F.cross_entropy(model(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1])).backward()
    opt.step()
    kill_rows(model[0], [1, 3])  # pruned after the step, as PruneOnPlateau does
    old_state = {name: copy.deepcopy(opt.state[p]) for name, p in model.named_parameters()}
    small, kept = simplify(model, torch.zeros(1, 3), return_kept=True)
    remap_optimizer_state(opt, model, small, kept)
    params = dict(small.named_parameters())
    assert opt.param_groups[0]["params"] == list(params.values())
    alive = torch.tensor([0, 2, 4])
    key = "momentum_buffer" if isinstance(opt, torch.optim.SGD) else "exp_avg"
    expected = {
        "0.weight": old_state["0.weight"][key][alive],
        "0.bias": old_state["0.bias"][key][alive],
        "2.weight": old_state["2.weight"][key][:, alive],
        "2.bias": old_state["2.bias"][key],
    }
    for name, value in expected.items():
        assert torch.equal(opt.state[params[name]][key], value)
    F.cross_entropy(small(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1])).backward()
    opt.step()  # the optimizer runs on the new parameters
