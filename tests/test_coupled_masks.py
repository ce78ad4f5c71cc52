"""Neuron masks over coupled channel groups: a residual stream's channel (or a depthwise pair) is
masked in every conv that writes it, and only when all of them are dead; the model then
simplifies exactly with that channel gone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neuronwise as nw
from neuronwise.pruning import ParameterMask, PruneOnPlateau

X = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))


class ResidualNet(nn.Module):
    """stem → [conv1 → conv2] + skip → depthwise → classifier.

    Coupled by hand: stream channel c is written by stem row c and conv2 row c (the addition) and
    read by the depthwise conv, whose row c is its own channel c: {stem c, conv2 c, dw c} go
    together. conv1's rows and the classifier's rows stand alone.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        s = F.relu(self.bn0(self.stem(x)))
        s = F.relu(s + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(s))))))
        s = F.relu(self.dw(s))
        return self.fc(F.adaptive_avg_pool2d(s, 1).flatten(1))


STREAM = ("stem", "conv2", "dw")


def residual_net() -> nn.Module:
    torch.manual_seed(0)
    model = ResidualNet()
    with torch.no_grad():
        for bn in (model.bn0, model.bn1, model.bn2):  # constants for the dead channels to carry
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def zero_rows(model, rows):
    with torch.no_grad():
        for name, row in rows:
            model.get_submodule(name).weight[row] = 0


def masked_rows(model, mask, name):
    """Rows of layer ``name`` whose weight row and bias entry are masked (all mask entries 0)."""
    layer = model.get_submodule(name)
    index = {id(p): i for i, p in enumerate(mask.params)}
    weight = mask.masks[index[id(layer.weight)]].reshape(layer.weight.shape[0], -1)
    masked = ~weight.any(dim=1)
    assert torch.equal(masked, ~weight.all(dim=1))  # a row is masked whole or not at all
    if layer.bias is not None:
        assert torch.equal(masked, ~mask.masks[index[id(layer.bias)]])
    return masked.nonzero().flatten().tolist()


def test_a_stream_channel_is_masked_only_when_every_conv_writing_it_is_dead():
    model = residual_net()
    # stream channel 1: dead in stem and conv2, alive in the depthwise conv; channel 2: dead in
    # all three; conv1 row 3: a group of its own
    zero_rows(model, [("stem", 1), ("conv2", 1), ("stem", 2), ("conv2", 2), ("dw", 2),
                      ("conv1", 3)])
    modules = (nn.Linear, nn.Conv2d)
    coupled = ParameterMask(model, modules, granularity="neurons", example_input=X[:1])
    per_row = ParameterMask(model, modules, granularity="neurons")
    coupled.update()
    per_row.update()
    assert {n: masked_rows(model, coupled, n) for n in (*STREAM, "conv1", "fc")} == {
        "stem": [2], "conv2": [2], "dw": [2], "conv1": [3], "fc": []}
    assert {n: masked_rows(model, per_row, n) for n in (*STREAM, "conv1", "fc")} == {
        "stem": [1, 2], "conv2": [1, 2], "dw": [2], "conv1": [3], "fc": []}


def test_plain_chains_mask_the_same_with_or_without_coupling():
    model = nw.models.create("lenet5")
    rows = [("conv1", 0), ("conv2", 5), ("fc1", 7), ("classifier", 3)]
    zero_rows(model, rows)
    with torch.no_grad():
        model.get_submodule("conv2").weight[2, 0] = 0  # a partly zero row stays free
    coupled = ParameterMask(model, granularity="neurons", example_input=torch.zeros(1, 1, 28, 28))
    per_row = ParameterMask(model, granularity="neurons")
    coupled.update()
    per_row.update()
    for a, b in zip(coupled.masks, per_row.masks):
        assert torch.equal(a, b)
    assert sum(int((~m).sum()) for m in coupled.masks) > 0


def _teacher_loss(model, teacher):
    def evaluate():
        with torch.no_grad():
            return 1.0 + float(F.mse_loss(model(X), teacher) / teacher.var())
    return evaluate


def test_prune_on_plateau_kills_a_stream_channel_in_every_member_and_it_simplifies_exactly():
    model = residual_net()
    zero_rows(model, [("stem", 1), ("conv2", 1), ("stem", 2), ("conv2", 2), ("dw", 2)])
    with torch.no_grad():
        model.dw.weight[1] = 10.0  # the largest entries: no threshold reaches them
    teacher = model(X).detach()
    pruner = PruneOnPlateau(model, _teacher_loss(model, teacher), patience=0,
                            modules=(nn.Linear, nn.Conv2d), granularity="neurons",
                            example_input=X[:1])
    assert pruner.step(1.0) is not None
    rows = {name: masked_rows(model, pruner.mask, name) for name in STREAM}
    assert rows["stem"] == rows["conv2"] == rows["dw"]  # all members together
    assert 2 in rows["stem"] and 1 not in rows["stem"]
    # every fully dead stream channel is masked, in every member
    dead = [c for c in range(4) if all(not model.get_submodule(n).weight[c].any() for n in STREAM)]
    assert rows["stem"] == dead
    # conv1's rows are their own groups: masked exactly when dead
    alive = model.conv1.weight.reshape(4, -1).any(dim=1)
    assert masked_rows(model, pruner.mask, "conv1") == (~alive).nonzero().flatten().tolist()

    small = nw.simplify(model, X[:1])
    assert small.stem.out_channels == small.dw.out_channels == 4 - len(dead)
    assert small.conv1.out_channels == max(1, int(alive.sum()))  # a tensor keeps one channel
    reference, out = model(X), small(X)
    assert (out - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_serene_with_a_coupled_mask_lets_a_half_dead_stream_channel_recover():
    model = residual_net()  # eval mode: BN normalizes with its running statistics
    zero_rows(model, [("stem", 1), ("conv2", 1), ("stem", 2), ("conv2", 2), ("dw", 2)])
    with torch.no_grad():  # stream channel 1 stays positive through the ReLUs: gradients flow
        model.bn0.bias[1] = model.bn2.bias[1] = 1.0
    masks = {}
    for coupling in (True, False):
        net = copy.deepcopy(model)
        mask = ParameterMask(net, (nn.Linear, nn.Conv2d), granularity="neurons",
                             example_input=X[:1] if coupling else None)
        mask.update()  # what a pruning step does
        reg = nw.SeReNe(net, lam=0.1, mask=mask)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            out = net(X)
            reg.compute(out)
            F.cross_entropy(out, torch.arange(8) % 3).backward()
            optimizer.step()
            reg.step()
        reg.remove()
        masks[coupling] = masked_rows(net, mask, "stem")
        for name in STREAM:  # channel 2 is dead in every member: it stays exactly zero
            layer = net.get_submodule(name)
            assert not layer.weight[2].any() and layer.bias[2] == 0
        # channel 1 lives on through the depthwise conv: its stem row trains again (coupled),
        # or is held at zero although simplify could never remove it (per row)
        assert bool(net.stem.weight[1].any()) is coupling
    assert masks == {True: [2], False: [1, 2]}


def test_example_input_needs_neuron_granularity_and_no_given_mask():
    model = residual_net()
    with pytest.raises(ValueError, match="Invalid example_input.*'params'"):
        ParameterMask(model, example_input=X[:1])
    mask = ParameterMask(model, granularity="neurons")
    with pytest.raises(ValueError, match="Invalid example_input.*mask is given"):
        PruneOnPlateau(model, lambda: 1.0, mask=mask, example_input=X[:1])


try:
    from neuronwise.integrations.torchvision import models as _torchvision

    TV = _torchvision()
except ImportError:  # pragma: no cover - torchvision is a test extra
    TV = None


@pytest.mark.skipif(TV is None, reason="torchvision not available")
@pytest.mark.parametrize("name, members", [
    # ResNet-18's first stream (no downsample in layer1): the stem conv and both blocks' conv2
    ("resnet18", ("conv1", "layer1.0.conv2", "layer1.1.conv2")),
    # MobileNetV3-small: the stem feeds a depthwise conv whose channels the SE block scales
    ("mobilenet_v3_small", ("features.0.0", "features.1.block.0.0",
                            "features.1.block.1.fc2")),
])
def test_torchvision_groups_are_masked_together(name, members):
    torch.manual_seed(0)
    model = getattr(TV, name)(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    mask = ParameterMask(model, (nn.Linear, nn.Conv2d), granularity="neurons", example_input=x)
    zero_rows(model, [(m, 3) for m in members[:-1]])
    mask.update()
    assert all(masked_rows(model, mask, m) == [] for m in members)  # one member alive
    zero_rows(model, [(members[-1], 3)])
    mask.update()
    assert all(masked_rows(model, mask, m) == [3] for m in members)
    mask.apply()
    small = nw.simplify(model, x)
    assert small.get_submodule(members[0]).out_channels == \
        model.get_submodule(members[0]).out_channels - 1
    reference = model(x)
    assert (small(x) - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_the_plateau_schedule_of_a_run_couples_its_neuron_mask_on_the_run_input():
    from neuronwise.experiment.methods.base import MethodContext
    from neuronwise.experiment.methods.plateau import PlateauPruningCallback

    model = nw.models.create("resnet20").eval()
    callback = PlateauPruningCallback(patience=0, granularity="neurons")
    callback.setup(MethodContext(model, [torch.optim.SGD(model.parameters(), lr=0.1)],
                                 torch.device("cpu"), torch.zeros(1, 3, 32, 32)))
    # Channel 0 of layer1's stream: the stem conv and every block's conv2, followed through the
    # option-A shortcuts, which pad planes/4 zero channels in front (32/4 = 8, then 64/4 = 16).
    stream = [("conv1", 0)] + [(f"layer{s}.{b}.conv2", c) for s, c in ((1, 0), (2, 8), (3, 24))
                               for b in range(3)]
    zero_rows(model, stream[:-1])
    callback.mask.update()
    assert all(c not in masked_rows(model, callback.mask, name) for name, c in stream)
    zero_rows(model, stream[-1:])
    callback.mask.update()
    assert all(masked_rows(model, callback.mask, name) == [c] for name, c in stream)


def test_a_pruner_refuses_a_granularity_its_shared_mask_does_not_have():
    model = residual_net()
    with pytest.raises(ValueError, match="Invalid granularity: 'neurons'.*'params'"):
        PruneOnPlateau(model, lambda: 1.0, granularity="neurons", mask=ParameterMask(model))
    mask = ParameterMask(model, granularity="neurons")
    assert PruneOnPlateau(model, lambda: 1.0, granularity="neurons", mask=mask).mask is mask
    assert PruneOnPlateau(model, lambda: 1.0, mask=mask).mask is mask


def test_a_run_with_serene_and_neuron_granularity_shares_a_coupled_neuron_mask():
    """The run's pruning granularity decides the mask SeReNe shares with the pruner (it was the
    regularizer's per-entry mask whatever the config said): a zero weight in a live neuron stays
    free, a dead stream channel is masked in every conv writing it."""
    from neuronwise.experiment.methods.base import MethodContext
    from neuronwise.experiment.methods.plateau import PlateauPruningCallback
    from neuronwise.experiment.methods.schedules import PruningConfig
    from neuronwise.experiment.methods.serene import SeReNeCallback, SeReNeConfig

    model = residual_net()
    context = MethodContext(model, [torch.optim.SGD(model.parameters(), lr=0.1)],
                            torch.device("cpu"), X[:1])
    serene = SeReNeCallback.from_config(SeReNeConfig(zeros_at_start="masked"))
    plateau = PlateauPruningCallback.from_config(PruningConfig(granularity="neurons"), serene)
    serene.setup(context)
    plateau.setup(context)
    mask = serene.method.mask
    assert plateau.method.mask is mask and mask.granularity == "neurons"
    assert mask.zeros_at_start == "masked"
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = 0  # one entry of a live neuron
    zero_rows(model, [(name, 1) for name in STREAM])
    mask.update()
    assert masked_rows(model, mask, "conv1") == []
    assert all(masked_rows(model, mask, name) == [1] for name in STREAM)
    # the default granularity keeps the regularizer's own per-entry mask
    per_entry = SeReNeCallback.from_config(SeReNeConfig())
    per_entry.setup(context)
    default = PlateauPruningCallback.from_config(PruningConfig(), per_entry)
    default.setup(context)
    assert default.method.mask is per_entry.method.mask
    assert per_entry.method.mask.granularity == "params"


def test_a_compiled_model_is_coupled_through_its_wrapper():
    model = residual_net()
    zero_rows(model, [("stem", 1), ("conv2", 1), ("stem", 2), ("conv2", 2), ("dw", 2)])
    mask = ParameterMask(torch.compile(model), (nn.Linear, nn.Conv2d), granularity="neurons",
                         example_input=X[:1])
    mask.update()
    assert [masked_rows(model, mask, name) for name in STREAM] == [[2], [2], [2]]
