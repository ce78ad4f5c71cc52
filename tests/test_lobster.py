"""Lobster: the update rule against hand-computed values, foreach == loop, masks, state."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from neuronwise.lobster import Lobster
from neuronwise.pruning import ParameterMask, global_magnitude_prune


def _tiny_cnn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )
    with torch.no_grad():
        model[1].bias.normal_()  # BN β starts at 0, which the mask would hold (see below)
    return model


def _backward(model: nn.Module, seed: int = 0, scale: float = 1.0) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 2, 5, 5, generator=generator)
    y = torch.randint(0, 3, (5,), generator=generator)
    model.zero_grad()
    (scale * nn.functional.cross_entropy(model(x), y)).backward()


def _single(values, grad) -> tuple[nn.Parameter, torch.Tensor]:
    p = nn.Parameter(torch.tensor(values))
    p.grad = torch.tensor(grad)
    return p, p.detach().clone()


def test_update_matches_hand_computed_values():
    # S̄ = relu(1 − |g|) = [0.5, 0.75, 0 (|g| > 1: no decay), 1]; p ← p − 0.1·p·S̄
    p, _ = _single([1.0, -2.0, 0.5, 4.0], [0.5, -0.25, 2.0, 0.0])
    Lobster([p], lam=0.1).step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.95, -1.85, 0.5, 3.6]))


def test_rescaled_update_matches_hand_computed_values():
    # S = |g| / max|g| = [0.25, 0.125, 1, 0]; S̄ = 1 − S, no relu
    p, _ = _single([1.0, -2.0, 0.5, 4.0], [0.5, -0.25, 2.0, 0.0])
    Lobster([p], lam=0.1, rescaled=True).step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.925, -1.825, 0.5, 3.6]))


_floats = st.floats(-4.0, 4.0, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.tuples(_floats, _floats), min_size=1, max_size=12),
    lam=st.floats(0.0, 1.0),
    rescaled=st.booleans(),
)
def test_decay_only_shrinks_towards_zero(values, lam, rescaled):
    # For λ ∈ [0, 1], 0 ≤ λ·S̄ ≤ 1: no parameter grows or changes sign, and zeros stay zero.
    p = nn.Parameter(torch.tensor([v for v, _ in values]))
    p.grad = torch.tensor([g for _, g in values])
    before = p.detach().clone()
    Lobster([p], lam=lam, rescaled=rescaled).step()
    assert bool((p.abs() <= before.abs()).all())
    assert bool((p * before >= 0).all())
    assert bool(p[before == 0].eq(0).all())


def test_large_gradients_are_not_decayed():
    p, before = _single([0.3, -0.7, 1.5], [1.0, -1.5, 40.0])
    Lobster([p], lam=0.5).step()
    assert torch.equal(p.detach(), before)


def test_scale_by_lr_multiplies_lambda_by_lr():
    p, _ = _single([2.0], [0.0])
    reg = Lobster([p], lam=0.5, scale_by_lr=True, lr=0.1)
    reg.step()
    torch.testing.assert_close(p.detach(), torch.tensor([2.0 - 0.05 * 2.0]))
    reg.lr = 1.0
    reg.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.9 - 0.5 * 1.9]))


def test_lam_zero_is_a_no_op():
    model = _tiny_cnn()
    _backward(model)
    before = copy.deepcopy(model.state_dict())
    Lobster(model, lam=0.0).step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_parameters_without_grad_are_skipped_and_others_decayed():
    model = _tiny_cnn()
    _backward(model)
    skipped = model[4].weight
    skipped.grad = None
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    Lobster(model, lam=0.1).step()
    for name, p in model.named_parameters():
        if p is skipped:
            assert torch.equal(p, before[name])
        else:
            assert not torch.equal(p, before[name]), name


def test_model_selects_only_the_given_module_types():
    model = _tiny_cnn()
    _backward(model)
    bn_before = model[1].weight.detach().clone()
    reg = Lobster(model, lam=0.1, modules=(nn.Linear, nn.Conv2d))
    assert len(reg.params) == 6  # conv, fc1, fc2: weight and bias each
    reg.step()
    assert torch.equal(model[1].weight, bn_before)


def test_accepts_param_groups():
    model = _tiny_cnn()
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": [model[6].weight]}]
    assert len(Lobster(groups).params) == 3


@pytest.mark.parametrize("rescaled", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_foreach_equals_loop(rescaled, seed):
    torch.manual_seed(seed)
    loop_model = _tiny_cnn()
    # Large gradients put some |g| above 1, so the relu gate is exercised; some weights are 0.
    _backward(loop_model, seed, scale=50.0)
    global_magnitude_prune(loop_model, 0.3)
    loop_model[6].bias.grad = None
    foreach_model = copy.deepcopy(loop_model)
    for p, q in zip(loop_model.parameters(), foreach_model.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()  # deepcopy drops .grad
    Lobster(loop_model, lam=0.05, rescaled=rescaled, foreach=False).step()
    Lobster(foreach_model, lam=0.05, rescaled=rescaled, foreach=True).step()
    for p, q in zip(loop_model.parameters(), foreach_model.parameters()):
        # Bit for bit (sign of zero included): the loop's fewer passes round as the op-by-op form.
        assert torch.equal(p, q)
        assert torch.equal(torch.signbit(p), torch.signbit(q))


def _reference_step(p: torch.Tensor, grad: torch.Tensor, lam: float) -> torch.Tensor:
    """p − λ·p·relu(1 − |g|), one operation at a time, on copies."""
    return p.clone().addcmul_(p, grad.abs().neg_().add_(1.0).clamp_min_(0.0), value=-lam)


def test_loop_reuses_its_buffer_across_sizes_dtypes_and_reshaped_parameters():
    # The loop path builds S̄ in one buffer per dtype, as large as the largest parameter; small and
    # large tensors, two dtypes and a parameter replaced by one of another shape all stay exact.
    generator = torch.Generator().manual_seed(4)
    shapes = [(7, 5), (3,), (40,), (2, 3, 3)]
    params = [nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    params.append(nn.Parameter(torch.randn(6, 4, generator=generator, dtype=torch.float64)))
    reg = Lobster(params, lam=0.3, foreach=False)
    for step in range(3):
        if step == 2:
            params[1].data = torch.randn(50, generator=generator)  # larger than any before
        expected = []
        for p in params:
            p.grad = 2 * torch.randn(p.shape, generator=generator, dtype=p.dtype)
            expected.append(_reference_step(p.detach(), p.grad, 0.3))
        reg.step()
        for p, want in zip(params, expected):
            assert torch.equal(p.detach(), want)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4),
        lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-4),
    ],
    ids=["sgd-momentum-wd", "adam"],
)
def test_pruned_weights_stay_exactly_zero(make_optimizer):
    model = _tiny_cnn()
    optimizer = make_optimizer(model.parameters())
    _backward(model)
    optimizer.step()  # momentum / moments now exist for every entry, pruned ones included
    reg = Lobster(model, lam=1e-3)
    global_magnitude_prune(model, 0.5, mask=reg.mask)  # the pruning step marks what it zeroed
    pruned = [p == 0 for p in model.parameters()]
    moved_without_mask = False
    for step in range(15):
        _backward(model, seed=step + 1)
        optimizer.step()
        moved_without_mask |= any(
            bool(p[z].ne(0).any()) for p, z in zip(model.parameters(), pruned)
        )
        reg.step()
        assert all(bool(p[z].eq(0).all()) for p, z in zip(model.parameters(), pruned))
    assert moved_without_mask  # the optimizer alone does move them: the mask is what holds them


def test_shared_mask_keeps_zeros_created_after_construction():
    model = _tiny_cnn()
    reg = Lobster(model, lam=1e-3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    global_magnitude_prune(model, 0.4, mask=reg.mask)
    zeros = [p == 0 for p in model.parameters()]
    for step in range(3):
        _backward(model, seed=step)
        optimizer.step()
        reg.step()
    assert all(bool(p[z].eq(0).all()) for p, z in zip(model.parameters(), zeros))


@pytest.mark.parametrize("zeros_at_start", ["free", "masked"])
def test_zero_initialised_parameters_train_unless_the_official_rule_is_asked(zeros_at_start):
    # METHODS.md §1 DECISION: the default mask holds only what a pruning step zeroed, so a fresh
    # BatchNorm β (all 0) trains; "masked" (official) holds it at 0 until the mask is updated.
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4))
    reg = Lobster(model, zeros_at_start=zeros_at_start)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(3, 2, 5, 5)).pow(2).mean().backward()
    optimizer.step()
    assert bool((model[1].bias.detach() != 0).all())  # SGD moved every β entry off 0
    reg.step()  # λ·β·relu(1 − |g|) also decays β a little; only the mask sets it to 0 exactly
    if zeros_at_start == "masked":
        assert torch.equal(model[1].bias.detach(), torch.zeros(4))
    else:
        assert bool((model[1].bias.detach() != 0).all())
        assert all(bool(m.all()) for m in reg.mask.masks)  # nothing masked before a pruning step


def test_invalid_zeros_at_start_is_refused():
    with pytest.raises(ValueError, match="Invalid zeros_at_start: 'none'"):
        ParameterMask(nn.Linear(2, 2), zeros_at_start="none")


def test_neuron_mask_zeros_the_bias_of_a_dead_neuron():
    model = nn.Sequential(nn.Linear(3, 4))
    with torch.no_grad():
        model[0].weight[2] = 0.0
        model[0].bias.fill_(0.5)
    mask = ParameterMask(model, granularity="neurons", zeros_at_start="masked")
    reg = Lobster(model, lam=0.0, mask=mask)
    reg.step()
    assert model[0].bias.tolist() == [0.5, 0.5, 0.0, 0.5]


def test_state_dict_round_trip():
    model = _tiny_cnn()
    global_magnitude_prune(model, 0.3)
    reg = Lobster(model, lam=3e-4, scale_by_lr=True, lr=0.2, rescaled=True, zeros_at_start="masked")
    buffer = io.BytesIO()
    torch.save(reg.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    dense = copy.deepcopy(model)
    for p in dense.parameters():
        p.data.fill_(1.0)
    restored = Lobster(dense)
    restored.load_state_dict(state)
    assert (restored.lam, restored.scale_by_lr, restored.lr, restored.rescaled) == (
        3e-4,
        True,
        0.2,
        True,
    )
    assert all(torch.equal(a, b) for a, b in zip(restored.mask.masks, reg.mask.masks))
    restored.step()  # the loaded mask, not the dense model's, is applied
    assert sum(int((p == 0).sum()) for p in dense.parameters()) == sum(
        int((p == 0).sum()) for p in model.parameters()
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lam": -1.0}, "Invalid lam: -1.0 (expected >= 0)"),
        ({"lam": float("nan")}, "Invalid lam: nan"),
        ({"scale_by_lr": True}, "Invalid lr: None"),
        ({"lr": 0.0}, "Invalid lr: 0.0 (expected > 0)"),
        ({"foreach": "yes"}, "Invalid foreach: 'yes'"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Lobster(_tiny_cnn(), **kwargs)


def test_model_without_selected_modules_raises():
    with pytest.raises(ValueError, match="no parameters in modules"):
        Lobster(nn.Sequential(nn.ReLU()))
