"""Pruning: masks, threshold statistics and bisection (hand-traced), plateau detector, baselines."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

from neuronwise.lobster import Lobster
from neuronwise.pruning import (
    GradualMagnitudePruning,
    IterativeMagnitudePruning,
    ParameterMask,
    PruneOnPlateau,
    global_magnitude_prune,
    prunable_parameters,
    prune_below,
    threshold_search,
    threshold_statistics,
)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _zeros(model: nn.Module) -> int:
    return sum(int((p == 0).sum()) for p in model.parameters())


# --- masks -------------------------------------------------------------------------------------


def test_parameter_mask_holds_zeros_through_an_attached_optimizer():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[:, :2] = 0.0
    mask = ParameterMask(model, zeros_at_start="masked")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    handle = mask.attach(optimizer)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        mask.zero_grads()
        assert model[0].weight.grad[:, :2].eq(0).all()
        optimizer.step()
        assert model[0].weight[:, :2].eq(0).all()
    handle.remove()
    optimizer.zero_grad()
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    assert model[0].weight[:, :2].ne(0).any()  # detached: the optimizer moves them again


def test_parameter_mask_update_and_state_dict():
    model = _mlp()
    mask = ParameterMask(model)
    assert all(m.all() for m in mask.masks)
    with torch.no_grad():
        model[2].weight[1, 3] = 0.0
    mask.update()
    assert int(sum((~m).sum() for m in mask.masks)) == 1
    other = ParameterMask(_mlp())
    other.load_state_dict(mask.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.masks, mask.masks))
    with pytest.raises(ValueError, match="Invalid masks: 1 tensors"):
        other.load_state_dict({"granularity": "params", "masks": mask.masks[:1]})


@pytest.mark.parametrize("foreach", [False, True])
def test_apply_follows_every_change_of_the_masks(foreach):
    # apply() multiplies by cached float copies: in-place edits, reassignment and load_state_dict
    # must all reach the parameters.
    model = _mlp()
    mask = ParameterMask(model)

    def applied() -> list[torch.Tensor]:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(1.0)
        mask.apply(foreach=foreach)
        return [p.detach().clone() for p in model.parameters()]

    assert all(p.eq(1).all() for p in applied())  # nothing masked: nothing changes
    mask.masks[0][2, 1] = False  # in place
    after = applied()
    assert after[0][2, 1] == 0 and int((after[0] == 0).sum()) == 1
    mask.masks = [torch.ones_like(m) for m in mask.masks]  # reassigned
    assert all(p.eq(1).all() for p in applied())
    state = {"granularity": "params", "masks": [m.clone() for m in mask.masks]}
    state["masks"][3][0] = False
    mask.load_state_dict(state)
    after = applied()
    assert after[3][0] == 0 and sum(int((p == 0).sum()) for p in after) == 1
    model[2].bias.grad = torch.ones(3)
    mask.zero_grads()
    assert model[2].bias.grad.tolist() == [0.0, 1.0, 1.0]


def test_mask_built_under_inference_mode_still_applies():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0
    with torch.inference_mode():
        mask = ParameterMask(model, zeros_at_start="masked")  # inference tensors: no version counter to cache against
    with torch.no_grad():
        model[0].weight[0, 0] = 5.0
    mask.apply()
    assert model[0].weight[0, 0] == 0


def test_neuron_granularity_masks_all_zero_rows_with_their_bias():
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(12, 4))
    with torch.no_grad():
        model[0].weight[1] = 0.0  # dead channel
        model[0].weight[2, 0] = 0.0  # live channel with some zeros
        model[2].weight[0] = 0.0  # dead neuron
        model[2].weight[3, :6] = 0.0  # live neuron, half zero
        model[2].weight[1, 5] = 1e-30  # live: "all entries == 0", not a rounded sum
    mask = ParameterMask(model, granularity="neurons", zeros_at_start="masked")
    conv_w, conv_b, fc_w, fc_b = mask.masks
    assert conv_b.tolist() == [True, False, True] and fc_b.tolist() == [False, True, True, True]
    assert conv_w[2].all() and not conv_w[1].any()  # live rows are free entirely
    assert fc_w[3].all() and not fc_w[0].any()
    mask.apply()
    assert model[0].bias[1] == 0 and model[2].bias[0] == 0
    assert model[0].bias[0] != 0 and model[2].bias[1] != 0


def test_neuron_granularity_needs_a_model():
    with pytest.raises(ValueError, match="'neurons' needs a model"):
        ParameterMask(list(_mlp().parameters()), granularity="neurons")


def test_prune_below_uses_strict_inequality_on_weights_and_biases():
    p = torch.tensor([0.5, -0.25, 0.125, -0.0625])
    b = torch.tensor([0.1875, 0.3125])
    prune_below([p, b], 0.25)
    assert p.tolist() == [0.5, -0.25, 0.0, 0.0]
    assert b.tolist() == [0.0, 0.3125]


# --- threshold statistics and search ------------------------------------------------------------


def _stub_model() -> nn.Module:
    """fc: 8 weights of magnitudes 1..8 and a bias 0.5; head: an all-zero weight (skipped)."""
    model = nn.Sequential(nn.Linear(8, 1), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0]]))
        model[0].bias.fill_(0.5)
        model[1].weight.zero_()
    return model


def _count_loss(model: nn.Module):
    """Stub validation loss: 1 + 0.04 per zero among the 8 fc weights."""
    calls = []

    def evaluate() -> float:
        loss = 1.0 + 0.04 * int((model[0].weight == 0).sum())
        calls.append(loss)
        return loss

    return evaluate, calls


def test_threshold_statistics_by_hand():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm2d(2), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, -1.0], [2.0, 0.0]]))  # mean 1.5
        model[0].bias.fill_(100.0)  # biases are not in W
        model[1].weight.copy_(torch.tensor([0.5, 0.25]))  # BN γ is: mean 0.375
        model[2].weight.zero_()  # all zero: skipped, not NaN
    stats = threshold_statistics(prunable_parameters(model))
    assert stats.mean == pytest.approx((1.5 + 0.375) / 2)
    assert (stats.min, stats.max) == (0.25, 2.0)


def test_threshold_search_reproduces_hand_traced_bisection():
    # L0 = 1, bound = 1.1, stop when |L_a − L_b| < 0.055. mean_T = 4.5 (max_T 8, min_T 1).
    # prune(4.5): 4 zeros → 1.16 ≥ bound → (a, L_a, b, L_b) = (1, 1.0, 4.5, 1.16)
    # c = 2.75: 2 zeros → 1.08 ≤ bound → a = 2.75      (|1.08 − 1.16| = 0.08 ≥ 0.055)
    # c = 3.625: 3 zeros → 1.12 > bound → b = 3.625    (|1.08 − 1.12| = 0.04 < 0.055: stop)
    # T = (2.75 + 3.625)/2 = 3.1875: weights 1, 2, 3 and the bias 0.5 become 0.
    model = _stub_model()
    evaluate, calls = _count_loss(model)
    result = threshold_search(model, evaluate, tolerance=0.1)
    assert [t for t, _ in result.trials] == [4.5, 2.75, 3.625]
    assert [loss for _, loss in result.trials] == pytest.approx([1.16, 1.08, 1.12])
    assert result.threshold == 3.1875
    assert (result.loss_before, result.loss_after) == (1.0, pytest.approx(1.12))
    assert model[0].weight.tolist() == [[0.0, 0.0, 0.0, -4.0, 5.0, -6.0, 7.0, -8.0]]
    assert model[0].bias.item() == 0.0
    assert (result.remaining, result.total) == (5, 10)
    assert len(calls) == 1 + 3 + 1  # L0, three trials, loss_after


def test_threshold_search_safe_returns_the_last_accepted_threshold():
    model = _stub_model()
    evaluate, _ = _count_loss(model)
    result = threshold_search(model, evaluate, tolerance=0.1, safe=True)
    assert result.threshold == 2.75
    assert model[0].weight.tolist() == [[0.0, 0.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0]]


def test_threshold_search_upper_branch_ends_on_the_1e10_exit():
    # bound = 1.5: prune(4.5) → 1.16 < bound → (a, L_a, b, L_b) = (4.5, 1.16, 8, ∞).
    # c = 6.25 → 6 zeros, 1.24 (a); c = 7.125 → 7 zeros, 1.28 (a); every later c < 8 keeps 7 zeros,
    # so L_b stays ∞ and b = 8: c approaches 8 until two centres are ≤ 1e-10 apart; a is returned.
    model = _stub_model()
    evaluate, _ = _count_loss(model)
    result = threshold_search(model, evaluate, tolerance=0.5)
    thresholds = [t for t, _ in result.trials]
    assert thresholds[:3] == [4.5, 6.25, 7.125]
    assert all(loss == pytest.approx(1.28) for _, loss in result.trials[2:])
    # Centre j is 8 − 3.5/2^j, 3.5/2^j from centre j − 1: the exit fires, before evaluating, at
    # the first j with 3.5/2^j ≤ 1e-10, j = 36; so mean_T and centres 1..35 were tried.
    j = math.ceil(math.log2(3.5 / 1e-10))
    assert j == 36 and len(thresholds) == 1 + (j - 1)
    assert thresholds[-1] == 8 - 3.5 / 2**35
    assert result.threshold == thresholds[-1] and 8 - result.threshold < 1e-9
    assert int((model[0].weight == 0).sum()) == 7


def test_threshold_search_restores_the_model_exactly_after_each_trial():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.eval()
    state = copy.deepcopy(model.state_dict())
    seen = []

    def evaluate() -> float:
        # A misbehaving evaluation that also moves BN buffers: restoring covers it.
        model[1].running_mean.add_(1.0)
        seen.append([p.detach().clone() for p in model.parameters()])
        return float(sum(int((p == 0).sum()) for p in model.parameters()))

    result = threshold_search(model, evaluate, tolerance=0.0)
    assert len(result.trials) > 10
    names = [name for name, _ in model.named_parameters()]
    pruned = {name for name, _ in prunable_parameters(model)}  # BatchNorm1d is not in P
    # Every trial starts from the original weights: what it sees is exactly prune(t) of them.
    for (threshold, _), params in zip(result.trials, seen[1:]):
        for name, value in zip(names, params):
            original = state[name]
            if name in pruned:
                original = torch.where(original.abs() < threshold, 0.0, original)
            assert torch.equal(value, original), name
    assert torch.equal(model[1].running_mean, state["1.running_mean"] + 1)  # only loss_after's


# --- plateau detector --------------------------------------------------------------------------


def _constant_evaluate() -> float:
    return 1.0


def test_patience_zero_prunes_every_epoch():
    model = _mlp()
    pruner = PruneOnPlateau(model, _constant_evaluate, patience=0)
    results = [pruner.step(val_loss=1.0) for _ in range(3)]
    assert all(r is not None for r in results)
    assert [h["epoch"] for h in pruner.history] == [1, 2, 3]


def test_unshared_mask_revival_is_undone_with_one_warning():
    torch.manual_seed(0)
    model = _mlp()
    pruner = PruneOnPlateau(model, _constant_evaluate, patience=0)
    pruner.step(val_loss=1.0)
    pruned = [p == 0 for p in model.parameters()]
    assert sum(int(m.sum()) for m in pruned) > 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # plain optimizer steps: the mask is neither shared nor attached
            optimizer.zero_grad()
            (model(torch.randn(16, 4)) - 1).square().sum().backward()
            optimizer.step()
            assert pruner.mask.violations() > 0
            pruner.step(val_loss=1.0)
            assert all(bool((p[m] == 0).all()) for p, m in zip(model.parameters(), pruned))
            assert pruner.mask.violations() == 0
    assert [str(w.message).split(":")[0] for w in caught] == ["PruneOnPlateau"]
    assert "non-zero again" in str(caught[0].message)


def test_losses_within_one_percent_do_not_count_as_bad():
    pruner = PruneOnPlateau(_mlp(), _constant_evaluate, patience=2)
    losses = [1.0, 1.0099, 1.02, 1.005, 1.02, 1.03]  # bad counts: 0, 0, 1, 0, 1, 2
    results = [pruner.step(loss) for loss in losses]
    assert [r is not None for r in results] == [False] * 5 + [True]
    assert pruner.history[0]["epoch"] == 6
    assert (pruner.best, pruner.best_state, pruner.num_bad_epochs) == (math.inf, None, 0)


def test_best_only_moves_on_strict_improvement():
    model = _mlp()
    pruner = PruneOnPlateau(model, _constant_evaluate, patience=5)
    pruner.step(1.0)
    first = pruner.best_state["0.weight"].clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    pruner.step(1.005)  # within tolerance, not better: best and best_state stay
    assert pruner.best == 1.0 and torch.equal(pruner.best_state["0.weight"], first)
    pruner.step(0.99)
    assert pruner.best == 0.99 and torch.equal(pruner.best_state["0.weight"], model[0].weight)


def test_plateau_restores_best_weights_and_buffers_but_not_optimizer_state():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = PruneOnPlateau(model, patience=1)
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    pruner.step(1.0, evaluate=_constant_evaluate)
    best = copy.deepcopy(model.state_dict())
    model(torch.randn(8, 4)).sum().backward()  # "training" moves weights and BN statistics
    optimizer.step()
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]

    result = pruner.step(2.0, evaluate=_constant_evaluate)
    assert result is not None
    t = result.threshold
    pruned = {name for name, _ in prunable_parameters(model)}  # BatchNorm1d is not in P
    for key, value in model.state_dict().items():
        if key in pruned:
            assert torch.equal(value, torch.where(best[key].abs() < t, 0.0, best[key])), key
        else:
            assert torch.equal(value, best[key]), key
    for p, buffer in zip(model.parameters(), momentum):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], buffer)


def _train_epoch(model, optimizer, reg, data) -> None:
    x, y = data
    for i in range(0, len(x), 8):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 8]), y[i : i + 8]).backward()
        optimizer.step()
        reg.step()


def _setup():
    torch.manual_seed(0)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reg = Lobster(model, lam=1e-2)
    x_val = torch.randn(32, 4)
    y_val = (x_val[:, :3] * torch.tensor([2.0, -1.0, 1.0])).argmax(dim=1)

    def evaluate() -> float:
        return nn.functional.cross_entropy(model(x_val), y_val).item()

    pruner = PruneOnPlateau(model, evaluate, patience=2, tolerance=0.1, mask=reg.mask)
    return model, optimizer, reg, pruner


# The val losses are scripted so that a checkpoint after epoch 4 lies inside a plateau:
# best at epoch 3, bad at 4 and 5 → pruning at 5 restores epoch 3; best at 6, pruning at 8.
_VAL_LOSSES = [1.0, 1.1, 0.9, 1.0, 1.2, 0.8, 1.0, 1.1]


def _run(model, optimizer, reg, pruner, epochs, data):
    for epoch in epochs:
        _train_epoch(model, optimizer, reg, data)
        pruner.step(_VAL_LOSSES[epoch])


def test_resume_mid_plateau_takes_the_same_decisions():
    x = torch.randn(32, 4)
    data = (x, (x[:, :3] * torch.tensor([2.0, -1.0, 1.0])).argmax(dim=1))  # learnable labels
    model, optimizer, reg, pruner = _setup()
    _run(model, optimizer, reg, pruner, range(8), data)
    assert [h["epoch"] for h in pruner.history] == [5, 8]
    assert 0 < pruner.history[-1]["remaining"] < pruner.history[0]["remaining"] < 67

    model2, optimizer2, reg2, pruner2 = _setup()
    _run(model2, optimizer2, reg2, pruner2, range(4), data)
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model2.state_dict(),
            "optimizer": optimizer2.state_dict(),
            "reg": reg2.state_dict(),
            "pruner": pruner2.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model3, optimizer3, reg3, pruner3 = _setup()
    model3.load_state_dict(checkpoint["model"])
    optimizer3.load_state_dict(checkpoint["optimizer"])
    reg3.load_state_dict(checkpoint["reg"])
    pruner3.load_state_dict(checkpoint["pruner"])
    _run(model3, optimizer3, reg3, pruner3, range(4, 8), data)

    assert pruner3.history == pruner.history
    assert all(torch.equal(a, b) for a, b in zip(model3.parameters(), model.parameters()))


def test_bad_plateau_hyperparameters_raise():
    with pytest.raises(ValueError, match=r"Invalid patience: -1 \(expected an integer >= 0\)"):
        PruneOnPlateau(_mlp(), patience=-1)
    with pytest.raises(ValueError, match=r"Invalid tolerance: -0.1 \(expected >= 0\)"):
        PruneOnPlateau(_mlp(), tolerance=-0.1)
    with pytest.raises(ValueError, match="Invalid granularity: 'rows'"):
        PruneOnPlateau(_mlp(), granularity="rows")
    with pytest.raises(ValueError, match="Invalid val_loss: nan"):
        PruneOnPlateau(_mlp(), _constant_evaluate).step(float("nan"))
    with pytest.raises(ValueError, match="Invalid evaluate: None"):
        PruneOnPlateau(_mlp()).step(1.0)


# --- magnitude baselines -----------------------------------------------------------------------


def test_global_magnitude_prune_hits_the_exact_sparsity_with_ties():
    model = nn.Sequential(nn.Linear(5, 2))
    with torch.no_grad():
        model[0].weight.copy_(
            torch.tensor([[0.3, -0.1, 0.2, 0.1, 0.5], [0.1, 0.9, -0.3, 0.4, 0.2]])
        )
        model[0].bias.copy_(torch.tensor([0.1, -0.6]))
    # 12 entries, sparsity 0.25 → 3 zeros: four entries tie at |0.1|; the first three go.
    largest = global_magnitude_prune(model, 0.25)
    assert _zeros(model) == 3 and largest == pytest.approx(0.1)
    assert model[0].weight[0].tolist() == pytest.approx([0.3, 0.0, 0.2, 0.0, 0.5])
    assert model[0].weight[1, 0].item() == 0.0 and model[0].bias[0].item() == pytest.approx(0.1)
    global_magnitude_prune(model, 0.5)
    assert _zeros(model) == 6
    assert max(p.abs().max().item() for p in model.parameters()) == pytest.approx(0.9)


def test_iterative_magnitude_pruning_schedule():
    model = nn.Sequential(nn.Linear(10, 10))  # 110 entries
    pruner = IterativeMagnitudePruning(model, fraction=0.5, every=2, final_sparsity=0.8)
    sparsities = [pruner.step() for _ in range(8)]
    assert sparsities == [None, 0.5, None, 0.75, None, 0.8, None, None]
    assert _zeros(model) == round(0.8 * 110)
    state = pruner.state_dict()
    resumed = IterativeMagnitudePruning(nn.Sequential(nn.Linear(10, 10)), fraction=0.1)
    resumed.load_state_dict(state)
    assert (resumed.fraction, resumed.rounds, resumed.last_epoch) == (0.5, 3, 8)


def test_gradual_schedule_values_by_hand():
    model = nn.Sequential(nn.Linear(19, 20))  # 400 entries
    pruner = GradualMagnitudePruning(
        model, final_sparsity=0.8, start_step=10, frequency=5, num_updates=4
    )
    # s_t = 0.8 − 0.8·(1 − (t − 10)/20)³
    expected = {10: 0.0, 15: 0.4625, 20: 0.7, 25: 0.7875, 30: 0.8}
    for t, value in expected.items():
        assert pruner.sparsity_at(t) == pytest.approx(value)
    assert pruner.sparsity_at(3) == 0.0 and pruner.sparsity_at(99) == pytest.approx(0.8)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.mask.attach(optimizer)
    returned = {}
    for t in range(40):
        optimizer.zero_grad()
        model(torch.randn(4, 19)).pow(2).sum().backward()
        optimizer.step()
        sparsity = pruner.step()
        if sparsity is not None:
            returned[t] = sparsity
            assert _zeros(model) == round(sparsity * 400)  # 0, 185, 280, 315, 320
    assert returned == pytest.approx(expected)


def test_gradual_initial_sparsity_is_applied_at_start():
    model = nn.Sequential(nn.Linear(9, 10))  # 100 entries
    pruner = GradualMagnitudePruning(model, 0.5, initial_sparsity=0.2, frequency=1, num_updates=2)
    assert [pruner.step() for _ in range(4)] == pytest.approx([0.2, 0.5 - 0.3 / 8, 0.5, None])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda m: global_magnitude_prune(m, 1.5), "Invalid sparsity: 1.5"),
        (lambda m: IterativeMagnitudePruning(m, fraction=-0.2), "Invalid fraction: -0.2"),
        (lambda m: IterativeMagnitudePruning(m, every=0), "Invalid every: 0"),
        (lambda m: GradualMagnitudePruning(m, 0.5, initial_sparsity=0.6), "Invalid initial_sp"),
        (lambda m: GradualMagnitudePruning(m, 0.5, frequency=0), "Invalid frequency: 0"),
        (lambda m: prune_below(m.parameters(), -1.0), "Invalid threshold: -1.0"),
        (lambda m: threshold_search(m, _constant_evaluate, tolerance=-1), "Invalid tolerance: -1"),
    ],
)
def test_bad_baseline_hyperparameters_raise(build, message):
    with pytest.raises(ValueError, match=message):
        build(_mlp())
