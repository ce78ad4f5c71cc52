"""structure: the graph vocabulary of simplify (property tests), why-kept, coupled channel groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_simplify import randomize_batchnorm
from torch import nn

import neuronwise as nw
from neuronwise.structure import channel_groups, explain, simplify

CONSTRUCTS = ["residual", "depthwise", "grouped", "cat", "shuffle", "se", "droppath"]
STREAM, HIDDEN = 4, 4


def conv_bn(cin, cout, k=3, groups=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups), nn.BatchNorm2d(cout)
    )


class DropPath(nn.Module):
    """Stochastic depth as timm writes it: the identity at inference."""

    def forward(self, x):
        if not self.training:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) > 0.5
        return x * keep / 0.5


class Block(nn.Module):
    """One construct mapping the stream (STREAM channels) to itself. ``free`` lists the producers
    whose output channels are coupled only inside the block (kill their rows together and they
    must go): [(module names, symmetric-in-groups?)]."""

    def __init__(self, kind, act):
        super().__init__()
        self.kind, self.act = kind, act  # one nn.ReLU module called by every block
        c, h = STREAM, HIDDEN
        self.a = conv_bn(c, h, 1)
        if kind == "residual" or kind == "droppath":
            self.b = conv_bn(h, c)
            self.drop = DropPath()
            self.free = [(["a.0"], 1)]
        elif kind == "depthwise":
            self.b, self.c = conv_bn(h, h, 3, groups=h), conv_bn(h, c, 1)
            self.free = [(["a.0", "b.0"], 1)]
        elif kind == "grouped":
            self.b, self.c = conv_bn(h, h, 3, groups=2), conv_bn(h, c, 1)
            self.free = [(["a.0"], 2), (["b.0"], 2)]
        elif kind == "cat":
            self.b, self.c = conv_bn(c, h, 3), conv_bn(2 * h, c, 1)
            self.free = [(["a.0"], 1), (["b.0"], 1)]
        elif kind == "shuffle":
            self.a, self.b = conv_bn(c // 2, h, 1), conv_bn(h, c // 2, 1)
            self.free = [(["a.0"], 1)]
        elif kind == "se":
            self.fc1, self.fc2, self.c = nn.Conv2d(h, 2, 1), nn.Conv2d(2, h, 1), conv_bn(h, c, 1)
            self.free = [(["a.0", "fc2"], 1), (["fc1"], 1)]

    def forward(self, x):
        kind, act = self.kind, self.act
        if kind in ("residual", "droppath"):
            return act(x + self.drop(self.b(act(self.a(x)))))
        if kind in ("depthwise", "grouped"):
            return self.c(act(self.b(act(self.a(x)))))
        if kind == "cat":
            return self.c(torch.cat([act(self.a(x)), act(self.b(x))], dim=1))
        if kind == "shuffle":
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, act(self.b(act(self.a(x2))))), dim=1)
            n, ch, hh, ww = out.size()
            out = out.view(n, 2, ch // 2, hh, ww).transpose(1, 2).contiguous()
            return out.view(n, -1, hh, ww)
        h = act(self.a(x))
        scale = torch.sigmoid(self.fc2(act(self.fc1(F.adaptive_avg_pool2d(h, 1)))))
        return self.c(h * scale)


class Net(nn.Module):
    def __init__(self, kinds, head):
        super().__init__()
        self.act = nn.ReLU()
        self.stem = conv_bn(2, STREAM)
        self.blocks = nn.ModuleList(Block(k, self.act) for k in kinds)
        self.head, self.fc = head, nn.Linear(STREAM * (1 if head == "pool" else 16), 3)

    def forward(self, x):
        x = self.act(self.stem(x))
        for block in self.blocks:
            x = block(x)
        x = F.adaptive_avg_pool2d(x, 1) if self.head == "pool" else F.max_pool2d(x, 2)
        return self.fc(torch.flatten(x, 1))


def randomize(model, g, dead_fraction):
    """BN statistics and affine random (dead channels then carry constants); random dead rows in
    every producer; returns the rows killed on purpose in free groups: module → count."""
    killed = {}
    randomize_batchnorm(model, g)
    with torch.no_grad():
        for m in [model.stem[0], model.fc]:  # fuzz: random dead rows, removable or not
            rows = torch.rand(m.weight.shape[0], generator=g) < dead_fraction
            m.weight[rows] = 0.0
        for block in model.blocks:
            for names, groups in block.free:
                width = block.get_submodule(names[0]).weight.shape[0] // groups
                # a strict subset of each group, the same positions in every group
                local = [c for c in range(width) if torch.rand(1, generator=g) < dead_fraction][
                    : width - 1
                ]
                rows = [gi * width + c for gi in range(groups) for c in local]
                for name in names:
                    block.get_submodule(name).weight[rows] = 0.0
                    killed[f"{id(block)}.{name}"] = len(rows)
    return killed


def weights(model):
    return sum(
        p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1
    )


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    kinds=st.lists(st.sampled_from(CONSTRUCTS), min_size=1, max_size=3),
    head=st.sampled_from(["pool", "flatten"]),
    dead=st.floats(0.2, 0.8),
    fuse_bn=st.booleans(),
)
def test_every_construct_same_function_and_smaller(seed, kinds, head, dead, fuse_bn):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Net(kinds, head).eval()
    killed = randomize(model, g, dead)
    small = simplify(model, torch.zeros(1, 2, 8, 8), fuse_bn=fuse_bn)
    x = torch.randn(8, 2, 8, 8, generator=g)
    with torch.no_grad():
        y, y_small = model(x), small(x)
    assert (y - y_small).abs().max() <= 1e-5 * y.abs().max()
    names = {id(m): name for name, m in model.named_modules()}
    for key, count in killed.items():
        block_id, name = key.split(".", 1)
        full = f"{names[int(block_id)]}.{name}"
        assert (
            small.get_submodule(full).weight.shape[0]
            <= model.get_submodule(full).weight.shape[0] - count
        )
    if any(killed.values()):  # bias maps aside (zero padding), the weights shrink
        assert weights(small) < weights(model)


def test_explain_names_the_blocking_node():
    class WithUnknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(torch.cat([self.a(x).cumsum(1), self.b(x)], dim=1))

    model = WithUnknown()
    with torch.no_grad():
        model.a.weight[1] = 0.0
        model.b.weight[2] = 0.0
        model.head.weight[0] = 0.0
    kept = explain(model, torch.zeros(1, 3))
    assert [(k.layer, k.channel) for k in kept] == [("a", 1), ("head", 0)]
    assert kept[0].blocked_by == "cumsum" and "Tensor.cumsum" in kept[0].reason
    assert kept[1].blocked_by == "output" and kept[1].reason == "model output"


def test_residual_stream_is_one_group_across_producers():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)
            self.conv, self.fc = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(3, 2)

        def forward(self, x):
            x = F.relu(self.bn(self.stem(x)))
            x = x + self.conv(x)
            return self.fc(x.mean((2, 3)))

    groups = channel_groups(Residual(), torch.zeros(1, 1, 6, 6))
    by_first = {g.members[0]: g for g in groups}
    channel1 = by_first[("stem", "out", 1)]
    assert set(channel1.members) == {
        ("stem", "out", 1), ("bn", "out", 1), ("conv", "in", 1), ("conv", "out", 1), ("fc", "in", 1)
    }  # fmt: skip
    assert channel1.blocked_by is None
    assert by_first[("fc", "out", 0)].blocked_by == ("output", "model output")
    assert by_first[("stem", "in", 0)].blocked_by == ("x", "model input")


def test_weights_shared_between_calls_keep_their_channels():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.relu(self.shared(torch.relu(self.shared(x)))))

    model = Twice()
    with torch.no_grad():
        model.shared.weight[0] = 0.0
    small = simplify(model, torch.zeros(1, 4))
    assert small.get_submodule("shared").out_features == 4
    assert "called 2 times" in explain(model, torch.zeros(1, 4))[0].reason


def test_untraceable_model_gets_one_clear_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    match = r"DataDependent cannot be traced by torch.fx \(.+\) at test_structure.py:\d+: return"
    with pytest.raises(ValueError, match=match):
        simplify(DataDependent(), torch.zeros(1, 3))


def test_package_exposes_the_module_functions():
    assert nw.simplify is simplify
    assert nw.structure.export_onnx is nw.export_onnx
    assert nw.save_simplified is nw.structure.save_simplified
    assert nw.load_simplified is nw.structure.load_simplified


class _BareBias(nn.Module):
    """A Linear followed by a 1-D parameter added directly: an operand with no channel axis."""

    def __init__(self):
        super().__init__()
        self.l, self.o = nn.Linear(4, 3), nn.Linear(3, 2)
        self.b = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return self.o(torch.relu(self.l(x) + self.b))


def test_a_bare_1d_parameter_operand_keeps_its_channels_and_the_function():
    model = _BareBias().eval()
    with torch.no_grad():
        model.l.weight[1] = 0
    small = nw.simplify(model, torch.zeros(1, 4))
    x = torch.randn(5, 4)
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-6)
    kept = nw.structure.explain(model, torch.zeros(1, 4))
    assert [(k.layer, k.channel, k.blocked_by) for k in kept] == [("l", 1, "add")]
