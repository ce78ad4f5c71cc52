"""torch.nn.utils.prune interop: import, export, finalise, round trip."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import neuronwise as nw
from neuronwise.interop import export_torch_prune, finalize, import_torch_prune


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 3),
    )


def _torch_pruned(model: nn.Module) -> dict[str, torch.Tensor]:
    """Prune three tensors with torch and return their masks by qualified name."""
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.random_unstructured(model[4], "weight", amount=0.3)
    prune.l1_unstructured(model[4], "bias", amount=4)
    return {"0.weight": model[0].weight_mask.bool().clone(),
            "4.weight": model[4].weight_mask.bool().clone(),
            "4.bias": model[4].bias_mask.bool().clone()}


def _plain(model: nn.Module) -> bool:
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    return hooks == 0 and not any(n.endswith(("_orig", "_mask")) for n in names)


def test_import_keeps_outputs_and_torch_masks(model):
    masks = _torch_pruned(model)
    x = torch.randn(5, 1, 8, 8)
    model.eval()
    expected = model(x)
    mask = import_torch_prune(model)
    assert _plain(model)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    by_name = dict(zip([n for n, _ in nw.pruning.prunable_parameters(model)], mask.masks))
    for name, torch_mask in masks.items():
        assert torch.equal(by_name[name], torch_mask)
    # Unpruned tensors: masked where zero now (BN beta starts at zero), free elsewhere.
    assert torch.equal(by_name["1.bias"], torch.zeros(4, dtype=torch.bool))
    assert by_name["6.weight"].all()


def test_import_leaves_torch_zero_with_mask_one_free(model):
    with torch.no_grad():
        model[4].weight[0, 0] = 0.0
    prune.custom_from_mask(model[4], "weight", torch.ones_like(model[4].weight))
    mask = import_torch_prune(model)
    by_name = dict(zip([n for n, _ in nw.pruning.prunable_parameters(model)], mask.masks))
    assert by_name["4.weight"][0, 0]  # torch did not prune it: it may grow again


def test_imported_mask_holds_zeros_through_lobster_training(model):
    masks = _torch_pruned(model)
    mask = import_torch_prune(model)
    reg = nw.Lobster(model, lam=1e-2, mask=mask)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 1, 8, 8)), torch.arange(8) % 3).backward()
        optimizer.step()
        reg.step()
    params = dict(model.named_parameters())
    for name, torch_mask in masks.items():
        assert torch.all(params[name][~torch_mask] == 0)
        assert torch.all(params[name][torch_mask] != 0)


def test_export_then_import_round_trip(model):
    nw.global_magnitude_prune(model, 0.6)
    ours = nw.ParameterMask(model)
    expected_masks = [m.clone() for m in ours.masks]
    x = torch.randn(3, 1, 8, 8)
    model.eval()
    expected = model(x)
    exported = export_torch_prune(model, ours)
    assert exported == ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias",
                        "6.weight", "6.bias"]
    assert torch.equal(model[4].weight_mask.bool(), expected_masks[4])
    assert isinstance(model[4].weight_orig, nn.Parameter)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    back = import_torch_prune(model)
    assert _plain(model)
    assert all(torch.equal(a, b) for a, b in zip(back.masks, expected_masks))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_export_only_pruned_and_combination_with_torch(model):
    with torch.no_grad():
        model[6].weight[:, :8] = 0.0
    ours = nw.ParameterMask(model, zeros_at_start="masked")
    assert export_torch_prune(model, ours, only_pruned=True) == ["1.bias", "6.weight"]
    # torch combines a further pruning with ours: the result contains both sets of zeros.
    prune.l1_unstructured(model[6], "weight", amount=0.25)
    combined = model[6].weight_mask.bool()
    assert not combined[:, :8].any()
    assert int((~combined).sum()) == 8 * 3 + round(0.25 * 24)
    back = import_torch_prune(model)
    names = [n for n, _ in nw.pruning.prunable_parameters(model)]
    assert torch.equal(back.masks[names.index("6.weight")], combined)


def test_exported_model_pickles_and_finalize_matches_prune_remove(model):
    nw.global_magnitude_prune(model, 0.5)
    export_torch_prune(model, nw.ParameterMask(model))
    clone = pickle.loads(pickle.dumps(model))
    assert finalize(clone) == finalize(model)
    assert _plain(model) and _plain(clone)
    for (name, a), (_, b) in zip(model.named_parameters(), clone.named_parameters()):
        assert torch.equal(a, b), name


def test_import_rejects_pruned_parameter_outside_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    prune.l1_unstructured(model[1], "weight", amount=1)
    with pytest.raises(ValueError, match=r"pruned parameters \['1.weight'\]"):
        import_torch_prune(model)
    mask = import_torch_prune(nn.Sequential(nn.LayerNorm(4)), modules=(nn.LayerNorm,))
    assert len(mask.params) == 2


def test_export_rejects_foreign_mask(model):
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not parameters of the model"):
        export_torch_prune(model, nw.ParameterMask(other))
    with pytest.raises(TypeError, match="expected ParameterMask"):
        export_torch_prune(model, {"0.weight": torch.ones(4, 1, 3, 3)})
