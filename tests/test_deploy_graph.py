"""deploy_graph: the lowered graph (addmm with stored Wᵀ, sparse modules, no duplicate weights) and
its compiled function (same tensors as the module; rebuilt by copies, pickling and ``.to()``)."""

from __future__ import annotations

import copy
import io

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from neuronwise.deploy import deploy
from neuronwise.deploy_graph import compile_graph, lower, plain_graph


def exported(model: nn.Module, example: torch.Tensor):
    return torch.export.export(model.eval(), (example.repeat(2, *[1] * (example.dim() - 1)),),
                               dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))


def mlp(generator: torch.Generator, bias: bool = True) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 7, bias=bias), nn.ReLU(),
                          nn.Linear(7, 3, bias=bias))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(generator=generator)
    return model.eval()


@settings(max_examples=15, deadline=None)
@given(kernels=st.lists(st.sampled_from(["dense", "csr", "gather"]), min_size=2, max_size=2),
       bias=st.booleans(), dead_inputs=st.integers(0, 11), batch=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_lowered_and_compiled_graph_compute_the_model(kernels, bias, dead_inputs, batch, seed):
    g = torch.Generator().manual_seed(seed)
    model = mlp(g, bias)
    with torch.no_grad():
        model[1].weight[:, :dead_inputs] = 0.0  # unused input features, empty CSR columns
        model[1].weight[:, -1] *= torch.rand(7, generator=g) < 0.5
    graph = lower(plain_graph(exported(model, torch.zeros(1, 3, 4))),
                  {"1": kernels[0], "3": kernels[1]}, channels_last=False)
    run = compile_graph(graph)
    x = torch.randn(batch, 3, 4, generator=g)
    with torch.no_grad():
        expected = model(x)
        for out in (graph(x), run(x)):
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * max(1, expected.abs().max()))
    calls = {node.target for node in graph.graph.nodes if node.op == "call_function"}
    if "dense" in kernels:  # the dense kernel of a matrix input: x Wᵀ + b with Wᵀ stored
        assert (torch.addmm if bias else torch.mm) in calls
    assert torch.nn.functional.linear not in calls


def test_lowered_graph_keeps_no_dense_weight_beside_its_replacement():
    model = mlp(torch.Generator().manual_seed(0))
    graph = lower(plain_graph(exported(model, torch.zeros(1, 3, 4))), {"1": "csr", "3": "dense"},
                  channels_last=False)
    tensors = dict(graph.named_buffers()) | dict(graph.named_parameters())
    assert set(tensors) == {"csr_1.weight", "csr_1.bias", "3_weight_t", "3.bias"}
    torch.testing.assert_close(tensors["3_weight_t"], model[3].weight.t())
    assert tensors["3_weight_t"].is_contiguous()


def test_compiled_function_uses_the_modules_tensors():
    model = mlp(torch.Generator().manual_seed(1))
    graph = lower(plain_graph(exported(model, torch.zeros(1, 3, 4))), {}, channels_last=False)
    run = compile_graph(graph)
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        graph.get_buffer("3_weight_t").zero_()  # an in-place change is seen by the function
        torch.testing.assert_close(run(x), model[3].bias.expand(2, 3))


def test_copies_pickles_and_dtype_changes_rebuild_the_function():
    model = mlp(torch.Generator().manual_seed(2))
    deployed = deploy(model, torch.zeros(1, 3, 4), batch_size=2, threads=[1], repeats=1)
    x = torch.randn(4, 3, 4)
    clone = copy.deepcopy(deployed)
    buffer = io.BytesIO()
    torch.save(deployed, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        expected = deployed(x)
        torch.testing.assert_close(unpickled(x), expected)
        clone.graph_module.get_buffer("3_weight_t").zero_()  # the copy runs over its own tensors
        torch.testing.assert_close(deployed(x), expected)
        torch.testing.assert_close(clone(x), clone.graph_module.get_parameter("3.bias").expand(4, 3))
        as_double = deployed.double()(x.double())
    assert as_double.dtype == torch.float64
    torch.testing.assert_close(as_double, model.double()(x.double()))
