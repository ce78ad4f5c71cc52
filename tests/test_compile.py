"""Methods on a model under ``torch.compile``, compiled before or after the method hooks it.

Every compile here uses the ``aot_eager`` backend: dynamo and AOTAutograd as under the default
inductor backend (the forward graph is one autograd node, hooks are traced or break the graph,
guards decide on reuse), without its code generation, so a compile takes a second or two.

Each test starts from an empty dynamo cache with torch's default hook guards, as a fresh process,
and then compiles one model of the same class without hooks first: the notebook or study where
the class was compiled earlier, whose cached graph skipped hooks added later.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import neuronwise as nw
from neuronwise._utils import unwrap

BACKEND = "aot_eager"
ORDERS = ("compile_first", "method_first", "in_place")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 4 * 4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def data(count: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 1, 6, 6, generator=g), torch.randint(0, 3, (6,), generator=g))
            for _ in range(count)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    config = torch._dynamo.config
    saved = config.skip_nnmodule_hook_guards
    torch._dynamo.reset()
    config.skip_nnmodule_hook_guards = True  # torch's default
    # The class compiled earlier in the process, without hooks.
    warm = torch.compile(Net(), backend=BACKEND)
    F.cross_entropy(warm(data(1)[0][0]), data(1)[0][1]).backward()
    yield
    torch._dynamo.reset()
    config.skip_nnmodule_hook_guards = saved


def twins() -> tuple[Net, Net]:
    torch.manual_seed(0)
    model = Net()
    return model, copy.deepcopy(model)


def attach(model: Net, order: str, make):
    """(the model to train, the method): compiled before or after ``make`` hooks the model."""
    if order == "compile_first":
        compiled = torch.compile(model, backend=BACKEND)
        return compiled, make(compiled)
    if order == "in_place":
        model.compile(backend=BACKEND)
        return model, make(model)
    method = make(model)
    return torch.compile(model, backend=BACKEND), method


def train(net, optimizer, after_step=lambda: None, after_epoch=lambda epoch: None) -> None:
    """Three epochs of two batches of cross-entropy training."""
    for epoch in range(3):
        for x, y in data(2, seed=epoch):
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
            after_step()
        after_epoch(epoch)


def names(tree) -> object:
    """The keys of a nested state dict, with tensors and numbers left out."""
    if isinstance(tree, dict):
        return {k: names(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [names(v) for v in tree]
    return None


def test_unwrap_removes_the_compile_wrapper():
    model = Net()
    assert unwrap(model) is model
    assert unwrap(torch.compile(model, backend=BACKEND)) is model
    assert unwrap(nn.Sequential(model)) is not model  # an ordinary container stays


@pytest.mark.parametrize("order", ORDERS)
def test_serene_on_a_compiled_model_records_real_sensitivities(order):
    # Before: "no recorded activations" (a cached graph without the hooks), names
    # '_orig_mod.fc1', and sensitivities 0 for every hidden neuron (the recorded z was an output
    # of the compiled graph, not on the way to the logits).
    model, reference = twins()
    trained, reg = attach(model, order, lambda m: nw.SeReNe(m, lam=0.1))
    eager = nw.SeReNe(reference, lam=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    for x, y in data():
        sensitivities = []
        for net, method, optimizer in ((trained, reg, opt), (reference, eager, opt_ref)):
            optimizer.zero_grad()
            logits = net(x)
            sensitivities.append(method.compute(logits))
            F.cross_entropy(logits, y).backward()
            optimizer.step()
            method.step()
        got, expected = sensitivities
        assert list(got) == ["conv", "fc1", "fc2"]
        assert expected["fc1"].abs().sum() > 0
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(model.state_dict(), reference.state_dict())
    reg.compute(trained(data(1)[0][0]))  # pending sums, keyed by layer name, in the state
    plain = nw.SeReNe(Net(), lam=0.1)
    plain.load_state_dict(reg.state_dict())
    back = nw.SeReNe(torch.compile(Net(), backend=BACKEND), lam=0.1)
    back.load_state_dict(plain.state_dict())
    assert list(back.state_dict()["sums"]) == ["conv", "fc1", "fc2"]
    reg.remove()
    trained(data(1)[0][0])
    assert not reg.activations.outputs  # no hook left behind in the compiled graph


@pytest.mark.parametrize("order", ORDERS)
def test_neq_on_a_compiled_model_freezes_as_eager_and_its_state_loads_both_ways(order):
    # Before: layers named '_orig_mod.conv', so the state did not load into an uncompiled NEq.
    model, reference = twins()
    val = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    settings = {"eps": 0.05, "skip_frozen_grads": True}
    trained, neq = attach(model, order, lambda m: nw.NEq(m, val, **settings))
    eager = nw.NEq(reference, val, **settings)
    runs = ((trained, neq, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)),
            (reference, eager, torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)))
    for net, method, optimizer in runs:
        method.attach(optimizer)
        train(net, optimizer, after_epoch=lambda epoch, method=method: method.step())
    assert list(neq.modules) == ["conv", "bn", "fc1"]
    assert any(bool(f.any()) for f in neq.frozen.values())  # the runs froze something
    torch.testing.assert_close(neq.frozen, eager.frozen)
    torch.testing.assert_close(model.state_dict(), reference.state_dict())
    plain = nw.NEq(Net(), val, **settings)
    plain.load_state_dict(neq.state_dict())
    torch.testing.assert_close(plain.frozen, neq.frozen)
    compiled = nw.NEq(torch.compile(Net(), backend=BACKEND), val, **settings)
    compiled.load_state_dict(eager.state_dict())
    torch.testing.assert_close(compiled.velocity, eager.velocity)


@pytest.mark.parametrize("order", ORDERS[:2])
def test_lobster_and_prune_on_plateau_on_a_compiled_model_match_eager(order):
    # Before: PruneOnPlateau's best_state held '_orig_mod.*' keys, which an uncompiled model refuses.
    model, reference = twins()
    x_val, y_val = data(1, seed=9)[0]

    def build(net):
        reg = nw.Lobster(net, lam=0.05)
        return reg, nw.PruneOnPlateau(net, lambda: F.cross_entropy(net(x_val), y_val).item(),
                                      patience=1, tolerance=0.5, mask=reg.mask)

    trained, (reg, pruner) = attach(model, order, build)
    eager_reg, eager_pruner = build(reference)
    for net, r, p in ((trained, reg, pruner), (reference, eager_reg, eager_pruner)):
        # A plateau after the first epoch prunes, then the detector starts over.
        train(net, torch.optim.SGD(unwrap(net).parameters(), lr=0.1), after_step=r.step,
              after_epoch=lambda epoch, p=p: p.step(1.0 + float(epoch > 0)))
    assert pruner.history and pruner.history[0]["remaining"] < pruner.history[0]["total"]
    torch.testing.assert_close(model.state_dict(), reference.state_dict())
    assert names(pruner.state_dict()) == names(eager_pruner.state_dict())
    plain = Net()
    restored = nw.PruneOnPlateau(plain, lambda: 0.0, mask=nw.ParameterMask(plain))
    restored.load_state_dict(pruner.state_dict())
    assert restored.best_state is not None
    plain.load_state_dict(restored.best_state)  # keys of an uncompiled model
    back = nw.Lobster(torch.compile(Net(), backend=BACKEND), lam=0.05)
    back.load_state_dict(eager_reg.state_dict())


def test_analysis_and_simplify_of_a_compiled_model_use_the_original_names():
    model = Net().eval()
    with torch.no_grad():
        model.fc1.weight[:3] = 0  # three dead neurons for simplify
        model.fc1.bias[:3] = -1
    compiled = torch.compile(model, backend=BACKEND)
    x, y = data(1)[0]
    compiled(x)  # compiled and run before the analyses
    loader = [(x, y)]
    got, expected = nw.psp_entropy(compiled, loader), nw.psp_entropy(model, loader)
    assert list(got) == list(expected) == ["conv", "fc1", "fc2"]
    for name in got:
        torch.testing.assert_close(got[name].per_class, expected[name].per_class, equal_nan=True)
    assert nw.metrics.count_neurons(compiled) == nw.metrics.count_neurons(model)
    assert nw.metrics.forward_flops(compiled, x) == nw.metrics.forward_flops(model, x)
    assert list(nw.neuron_l1_norms(compiled)) == ["conv", "fc1"]
    small = nw.simplify(compiled, x[:1])
    assert small.fc1.out_features == 5
    torch.testing.assert_close(small(x), model(x))


def test_in_place_compiled_model_runs_analysis_hooks():
    # model.compile() keeps the names; the analyses' one-forward hooks must still fire.
    model = Net().eval()
    model.compile(backend=BACKEND)
    x, y = data(1)[0]
    with torch.no_grad():
        model(x)  # a graph traced without the analysis hooks, as an evaluation would leave
    got = nw.psp_entropy(model, [(x, y)])
    assert list(got) == ["conv", "fc1", "fc2"]
    assert all(int(layer.class_counts.sum()) == len(y) for layer in got.values())


@pytest.fixture
def compile_backend():
    torch.compiler.set_default_backend(BACKEND)  # what train.compile's torch.compile(model) uses
    yield
    torch.compiler.set_default_backend(None)


def test_a_compiled_run_resumes_uncompiled_and_back_with_the_same_checkpoint(
        tmp_path, capsys, compile_backend):
    from neuronwise.experiment.cli import main
    from neuronwise.experiment.rundir import load_checkpoint

    quick = ["--set", "data.batch_size=64", "--set", "train.threads=1", "--set", "method=serene",
             "--set", "serene.lam=0.01"]
    checkpoints = {}
    for first, then in ((True, False), (False, True)):
        run = tmp_path / f"compile-{first}"
        assert main(["quickstart", "--run-dir", str(run), *quick, "--set", "train.epochs=1",
                     "--set", f"train.compile={str(first).lower()}"]) == 0
        one = load_checkpoint(run / "last.pt")
        assert main(["quickstart", "--run-dir", str(run), "--resume", "--set", "train.epochs=2",
                     "--set", f"train.compile={str(then).lower()}"]) == 0
        assert f"train.compile: {first} -> {then}" in capsys.readouterr().out
        checkpoints[first] = one, load_checkpoint(run / "last.pt")
    (compiled, resumed), (plain, recompiled) = checkpoints[True], checkpoints[False]
    assert names(compiled) == names(plain) and names(resumed) == names(recompiled)
    assert "_orig_mod" not in str(names(compiled)) + str(names(resumed))
    torch.testing.assert_close(compiled["model"], plain["model"])
    torch.testing.assert_close(resumed["model"], recompiled["model"])
