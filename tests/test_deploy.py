"""deploy: simplify, then a timed dense/CSR choice per layer; same function, saved and loaded."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import neuronwise as nw
from neuronwise.deploy import DeployedModel, deploy, load_deployed, save_deployed
from neuronwise.sparse_layers import CSRConv2d, CSRLinear, GatherLinear


def mask_weights(model: nn.Module, density: float, generator: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(torch.rand(m.weight.shape, generator=generator) < density)


def assert_same_function(model, deployed, x):
    original = x.clone()
    with torch.no_grad():
        expected, out = model(x), deployed(x)
    assert torch.equal(x, original)  # in-place ReLUs touch only the layers' own outputs
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * max(1.0, expected.abs().max()))


def kernels(deployed: DeployedModel) -> dict[str, str]:
    return {row.name: row.kernel for row in deployed.layers}


def csr_modules(deployed: DeployedModel) -> list[nn.Module]:
    return [m for m in deployed.modules() if isinstance(m, (CSRLinear, CSRConv2d))]


@settings(max_examples=10, deadline=None)
@given(density=st.floats(0.0, 1.0), dead=st.integers(0, 300), batch=st.integers(1, 5),
       kernel=st.sampled_from(["auto", "csr"]), seed=st.integers(0, 2**16))
def test_lenet300_same_function_on_random_patterns(density, dead, batch, kernel, seed):
    g = torch.Generator().manual_seed(seed)
    model = nw.models.create("lenet300").eval()
    mask_weights(model, density, g)
    with torch.no_grad():
        model.fc1.weight[:dead] = 0.0  # dead neurons, removed by simplify
    deployed = deploy(model, torch.zeros(1, 1, 28, 28), batch_size=batch, threads=[1], repeats=2,
                      kernel=kernel)
    assert_same_function(model, deployed, torch.randn(batch + 2, 1, 28, 28, generator=g))
    if kernel == "csr":
        assert set(kernels(deployed).values()) == {"csr"}
        assert len(csr_modules(deployed)) == len(deployed.layers)


def test_gather_kernel_drops_unused_input_features():
    g = torch.Generator().manual_seed(5)
    model = nw.models.create("lenet300").eval()
    mask_weights(model, 0.2, g)
    with torch.no_grad():
        model.fc1.weight[:, :300] = 0.0  # the first 300 pixels are never used
    deployed = deploy(model, torch.zeros(1, 1, 28, 28), batch_size=3, threads=[1], repeats=1,
                      kernel="gather")
    kernels_chosen = kernels(deployed)
    assert kernels_chosen["fc1"] == "gather"
    gathers = [m for m in deployed.modules() if isinstance(m, GatherLinear)]
    assert {m.columns.numel() for m in gathers} >= {784 - 300 - int(
        (model.fc1.weight[:, 300:] == 0).all(0).sum())}
    assert_same_function(model, deployed, torch.randn(4, 1, 28, 28, generator=g))


def test_lenet5_with_csr_convolutions_and_dead_layers():
    g = torch.Generator().manual_seed(0)
    model = nw.models.create("lenet5").eval()
    mask_weights(model, 0.1, g)
    with torch.no_grad():
        model.conv1.weight[:, :, 0] = 0.0  # a dead row of every 5x5 kernel: empty CSR columns
        model.fc1.weight.zero_()  # a fully dead layer: its bias reaches the classifier
        model.fc1.bias.uniform_(-1, 1, generator=g)
    deployed = deploy(model, torch.zeros(1, 1, 28, 28), batch_size=3, threads=[1], repeats=2,
                      kernel="csr")
    assert kernels(deployed) == {"conv1": "csr", "conv2": "csr", "fc1": "csr", "classifier": "csr"}
    assert_same_function(model, deployed, torch.randn(4, 1, 28, 28, generator=g))
    rows = {r.name: r for r in deployed.layers}
    assert rows["fc1"].density == 0.0  # simplify keeps one all-zero neuron of a dead layer
    row = rows["conv1"]
    weight = model.conv1.weight
    alive = int((weight.flatten(1) != 0).any(1).sum())  # simplify drops the dead filters
    expected = float((weight != 0).sum()) / (alive * weight[0].numel())
    assert row.op == "conv2d" and row.shape == (alive, *weight.shape[1:])
    assert row.density == pytest.approx(expected)


def test_channels_last_layout_keeps_the_function():
    g = torch.Generator().manual_seed(4)
    model = nw.models.create("lenet5").eval()
    mask_weights(model, 0.3, g)
    for kernel in ("dense", "csr"):
        deployed = deploy(model, torch.zeros(1, 1, 28, 28), batch_size=2, threads=[1],
                          repeats=1, kernel=kernel, channels_last=True)
        conv_weights = [b for n, b in deployed.named_buffers() if b.dim() == 4]
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
        convs = [n for n in deployed.graph_module.graph.nodes
                 if n.target is torch.conv2d or str(n.target).startswith("csr_conv")]
        assert len(convs) == 2
        for conv in convs:  # conv1 has one input channel: oneDNN would return NCHW
            (user,) = conv.users
            assert user.target == "contiguous"
            assert user.kwargs == {"memory_format": torch.channels_last}
        assert_same_function(model, deployed, torch.randn(3, 1, 28, 28, generator=g))


def test_a_losing_sparse_kernel_falls_back_to_dense():
    # A fully dense layer at batch 64: CSR multiplies the same number of entries through an index
    # indirection, so the timed choice must keep the dense kernel.
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    deployed = deploy(model, torch.zeros(1, 256), batch_size=64, threads=[1], repeats=5)
    assert kernels(deployed)["0"] == "dense"
    assert {r.name: r for r in deployed.layers}["0"].density == 1.0
    assert not any(isinstance(m, CSRLinear) and m.in_features == 256 for m in deployed.modules())
    assert_same_function(model, deployed, torch.randn(64, 256))


def test_forward_restores_the_callers_thread_count():
    model = nw.models.create("lenet300").eval()
    mask_weights(model, 0.05, torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    deployed = deploy(model, torch.zeros(1, 1, 28, 28), batch_size=4, threads=[1, 2], repeats=2)
    assert torch.get_num_threads() == before
    assert deployed.threads in (1, 2)
    for threads in (deployed.threads, 3 - deployed.threads):
        deployed.threads = threads  # both branches: equal to the caller's count and different
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                deployed(torch.randn(2, 1, 28, 28))
            assert torch.get_num_threads() == 1
        finally:
            torch.set_num_threads(before)


@pytest.mark.parametrize("channels_last", [False, True])
def test_save_load_round_trip_without_model_code(tmp_path, channels_last):
    g = torch.Generator().manual_seed(3)
    model = nw.models.create("lenet5").eval()
    mask_weights(model, 0.05, g)
    deployed = deploy(model, torch.zeros(1, 1, 28, 28), batch_size=2, threads=[1], repeats=2,
                      kernel="csr", channels_last=channels_last)
    assert deployed.channels_last is channels_last
    save_deployed(deployed, tmp_path / "deployed.pt")
    state = torch.load(tmp_path / "deployed.pt", weights_only=True)  # no pickled code inside
    assert state["format"] == "neuronwise.deploy/1"
    loaded = load_deployed(tmp_path / "deployed.pt")
    assert loaded.threads == deployed.threads and loaded.layers == deployed.layers
    assert loaded.channels_last is channels_last
    assert len(csr_modules(loaded)) == len(csr_modules(deployed)) == 4
    x = torch.randn(5, 1, 28, 28, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), deployed(x))
    assert_same_function(model, loaded, x)


def test_table_and_invalid_arguments(tmp_path):
    model = nw.models.create("lenet300").eval()
    example = torch.zeros(1, 1, 28, 28)
    deployed = deploy(model, example, batch_size=1, threads=[1], repeats=1, kernel="dense")
    table = deployed.table()
    assert "fc1" in table and "100.00%" in table and "csr ms" in table
    assert all(row.kernel == "dense" for row in deployed.layers)
    assert not any(" csr " in line for line in table.splitlines()[2:])
    with pytest.raises(ValueError, match="batch_size"):
        deploy(model, example, batch_size=0)
    with pytest.raises(ValueError, match="threads"):
        deploy(model, example, threads=[0])
    with pytest.raises(ValueError, match="kernel"):
        deploy(model, example, kernel="coo")
    torch.save({"format": "other"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a deployed model"):
        load_deployed(tmp_path / "x.pt")
