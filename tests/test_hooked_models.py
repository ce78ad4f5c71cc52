"""Models carrying neuronwise hooks or masks stay ordinary modules.

They deep-copy, pickle, ``torch.save``/``torch.load``, change device and dtype, and train under
DistributedDataParallel like any module (STYLE.md: the torch.nn.utils.prune pain points avoided).
"""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neuronwise as nw
from neuronwise.interop import export_torch_prune
from neuronwise.serene import SeReNe


def _net(batchnorm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6) if batchnorm else nn.Identity(), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 12), nn.ReLU(), nn.Linear(12, 3),
    )


def _train_step(model: nn.Module, optimizer, x, y, reg=None) -> None:
    optimizer.zero_grad()
    logits = model(x)
    if isinstance(reg, SeReNe):
        reg.compute(logits)
    F.cross_entropy(logits, y).backward()
    optimizer.step()
    if reg is not None:
        reg.step()


def _lobster(model):
    reg = nw.Lobster(model, lam=1e-2)
    nw.global_magnitude_prune(model, 0.5, mask=reg.mask)
    return reg


def _neq(model):
    """NEq with skip_frozen_grads: one layer fully frozen (requires_grad off), one mostly frozen."""
    neq = nw.NEq(model, torch.randn(4, 1, 8, 8), eps=0.5, skip_frozen_grads=True)
    neq.step()
    neq.load_state_dict(
        {**neq.state_dict(), "frozen": {"0": torch.ones(6, dtype=torch.bool),
                                       "1": torch.zeros(6, dtype=torch.bool),
                                       "4": torch.arange(12) > 1}}
    )
    return neq


def _torch_prune_export(model):
    nw.global_magnitude_prune(model, 0.5)
    export_torch_prune(model, nw.ParameterMask(model))


SETUPS = {
    "lobster": _lobster,
    "neq-skip-frozen": _neq,
    "torch-prune-export": _torch_prune_export,
    "serene": lambda model: SeReNe(model, lam=1e-2),
}
@pytest.mark.parametrize("setup", SETUPS)
def test_pickle_and_torch_save_round_trip(setup, tmp_path):
    model = _net().eval()
    SETUPS[setup](model)
    x = torch.randn(5, 1, 8, 8)
    expected = model(x)
    restored = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state) == set(model.state_dict())


@pytest.mark.parametrize("setup", SETUPS)
def test_deepcopy_is_independent(setup):
    model = _net().eval()
    SETUPS[setup](model)
    x = torch.randn(5, 1, 8, 8)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    assert not torch.equal(next(clone.parameters()), next(model.parameters()))


def test_serene_deepcopy_records_into_its_own_hooks():
    model = _net()
    reg = SeReNe(model, lam=1e-2)
    copy.deepcopy(model)(torch.randn(2, 1, 8, 8))
    assert not reg.activations.outputs


def test_serene_hooks_removed_leave_a_picklable_model():
    model = _net()
    reg = SeReNe(model, lam=1e-2)
    reg.remove()
    assert all(not m._forward_hooks for m in model.modules())
    pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize("setup", ["lobster", "serene", "neq-skip-frozen"])
def test_dtype_and_device_moves_keep_methods_working(setup):
    model = _net()
    reg = SETUPS[setup](model)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if isinstance(reg, nw.NEq):
        reg.attach(optimizer)
    frozen = model[0].weight.detach().clone()
    model.double()  # Module._apply, the path of .to(device): parameters keep their identity
    step_reg = reg if isinstance(reg, (nw.Lobster, SeReNe)) else None
    _train_step(model, optimizer, x.double(), y, step_reg)
    assert model[0].weight.dtype == torch.float64
    if isinstance(reg, nw.Lobster):
        assert all(torch.all(p[~m] == 0) for p, m in zip(reg.mask.params, reg.mask.masks))
    if isinstance(reg, nw.NEq):
        assert torch.equal(model[0].weight, frozen.double())  # fully frozen layer untouched
    assert model.to("meta")(x.to("meta", torch.float64)).shape == (8, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("setup", SETUPS)
def test_cuda_round_trip(setup):
    model = _net().eval()
    SETUPS[setup](model)
    x = torch.randn(5, 1, 8, 8)
    expected = model(x)
    on_gpu = model.to("cuda")(x.cuda())
    torch.testing.assert_close(on_gpu.cpu(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.to("cpu")(x), expected, rtol=0, atol=0)


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist, torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    sys.path.insert(0, sys.argv[3])
    import test_hooked_models as t

    rank, world, store = int(sys.argv[1]), 2, sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {}
        for name in ("lobster", "serene"):
            model = t._net(batchnorm=False)
            reg = t.SETUPS[name](model)
            wrapped = DDP(model)
            optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
            x, y = t._data()
            for _ in range(2):
                t._train_step(wrapped, optimizer, x[rank::world], y[rank::world], reg)
            results[name] = [p.detach() for p in model.parameters()]
        torch.save(results, f"{store}.{rank}.pt")
    finally:
        dist.destroy_process_group()
    """
)


def _data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 8, 8, generator=generator), torch.arange(8) % 3


def test_ddp_wrapped_hooked_models_match_single_process(tmp_path):
    """Two gloo ranks on half batches each train like one process on the whole batch."""
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_SCRIPT)
    store = str(tmp_path / "store")
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    workers = [
        subprocess.Popen([sys.executable, str(script), str(rank), store, tests_dir],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]
    outputs = [w.communicate(timeout=120)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    ranks = [torch.load(f"{store}.{rank}.pt", weights_only=True) for rank in range(2)]
    for name in ("lobster", "serene"):
        model = _net(batchnorm=False)  # batch statistics would differ between half batches
        reg = SETUPS[name](model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = _data()
        # DDP averages the two half-batch gradients: the gradient of the full-batch mean loss.
        for _ in range(2):
            _train_step(model, optimizer, x[[0, 2, 4, 6, 1, 3, 5, 7]],
                        y[[0, 2, 4, 6, 1, 3, 5, 7]], reg)
        for a, b, expected in zip(ranks[0][name], ranks[1][name], model.parameters()):
            assert torch.equal(a, b)
            torch.testing.assert_close(a, expected.detach(), rtol=1e-5, atol=1e-6)
