"""Importance criteria: the defaults reproduce |w| / L1 ranking exactly; others change the choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuronwise import pruning
from neuronwise.pruning import (
    GradualMagnitudePruning,
    IterativeMagnitudePruning,
    PruneOnPlateau,
    get_importance,
    global_magnitude_prune,
    importance_names,
    magnitude,
    neuron_l1,
    neuron_taylor,
    prune_below,
    register_importance,
    taylor,
    threshold_search,
    threshold_statistics,
)
from neuronwise.structured import l1_structured_prune


def _row() -> nn.Module:
    """One Linear 4 → 1 without bias: w = [1, 2, 3, 4], g = [4, 1, 1, 0.1], so |w·g| = [4, 2, 3, 0.4]."""
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    layer.weight.grad = torch.tensor([[4.0, 1.0, 1.0, 0.1]])
    return nn.Sequential(layer)


def _weights(model: nn.Module) -> list[float]:
    return model[0].weight.flatten().tolist()


# --- parameter importance: hand-computed choices ------------------------------------------------


def test_taylor_scores_are_weight_times_gradient():
    model = _row()
    assert taylor(model[0].weight).flatten().tolist() == pytest.approx([4.0, 2.0, 3.0, 0.4])
    assert magnitude(model[0].weight).flatten().tolist() == [1.0, 2.0, 3.0, 4.0]


def test_global_prune_with_taylor_keeps_the_highest_products():
    by_magnitude, by_taylor = _row(), _row()
    global_magnitude_prune(by_magnitude, 0.5)
    largest = global_magnitude_prune(by_taylor, 0.5, importance=taylor)
    assert _weights(by_magnitude) == [0.0, 0.0, 3.0, 4.0]  # |w| 1 and 2 go
    assert _weights(by_taylor) == [1.0, 0.0, 3.0, 0.0]  # |w·g| 0.4 and 2 go
    assert largest == pytest.approx(2.0)  # the largest pruned score


def test_prune_below_and_statistics_use_the_scores():
    model = _row()
    prune_below(model.parameters(), 2.5, importance=taylor)
    assert _weights(model) == [1.0, 0.0, 3.0, 0.0]
    stats = threshold_statistics(_row().named_parameters(), importance=taylor)
    assert (stats.mean, stats.min, stats.max) == pytest.approx((2.35, 0.4, 4.0))


def test_threshold_search_with_taylor_bisects_between_the_scores():
    # A constant loss stays within the bound: T climbs from mean_T towards max_T, so only the
    # highest-scored entry survives. |w| keeps w = 4; |w·g| keeps w = 1 (score 4).
    by_magnitude, by_taylor = _row(), _row()
    plain = threshold_search(by_magnitude, lambda: 1.0)
    result = threshold_search(by_taylor, lambda: 1.0, importance=taylor)
    assert plain.trials[0][0] == pytest.approx(2.5) and result.trials[0][0] == pytest.approx(2.35)
    assert _weights(by_magnitude) == [0.0, 0.0, 0.0, 4.0]
    assert _weights(by_taylor) == [1.0, 0.0, 0.0, 0.0]
    assert 3.0 < result.threshold < 4.0 and result.remaining == 1


def test_schedules_pass_the_importance_on():
    model = _row()
    PruneOnPlateau(model, lambda: 1.0, patience=0, importance=taylor).step(1.0)
    assert _weights(model) == [1.0, 0.0, 0.0, 0.0]
    model = _row()
    assert IterativeMagnitudePruning(model, fraction=0.5, importance=taylor).step() == 0.5
    assert _weights(model) == [1.0, 0.0, 3.0, 0.0]
    model = _row()
    gradual = GradualMagnitudePruning(
        model, final_sparsity=0.75, initial_sparsity=0.5, frequency=1, num_updates=1,
        importance=taylor,
    )
    assert gradual.step() == 0.5
    assert _weights(model) == [1.0, 0.0, 3.0, 0.0]
    assert gradual.step() == 0.75
    assert _weights(model) == [1.0, 0.0, 0.0, 0.0]


# --- the defaults are the old |w| / L1 rankings, bit for bit ------------------------------------


def _old_magnitude(p: torch.Tensor) -> torch.Tensor:
    return p.detach().abs()


def _old_row_l1(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().reshape(layer.weight.shape[0], -1).abs().double().sum(dim=1)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6),
        nn.ReLU(), nn.Linear(6, 3),
    )


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_default_importance_equals_the_old_magnitude_ranking():
    x = torch.randn(8, 1, 6, 6)

    def evaluate_on(model):
        return lambda: float(model(x).square().mean())

    default, explicit = _net(), _net()
    a = threshold_search(default, evaluate_on(default))
    b = threshold_search(explicit, evaluate_on(explicit), importance=_old_magnitude)
    assert a.trials == b.trials and a.threshold == b.threshold
    _assert_same(default, explicit)

    default, explicit = _net(), _net()
    assert global_magnitude_prune(default, 0.6) == global_magnitude_prune(
        explicit, 0.6, importance=_old_magnitude
    )
    _assert_same(default, explicit)

    default, explicit = _net(), _net()
    schedules = [IterativeMagnitudePruning(default, 0.3),
                 IterativeMagnitudePruning(explicit, 0.3, importance=_old_magnitude)]
    for _ in range(3):
        assert schedules[0].step() == schedules[1].step()
    _assert_same(default, explicit)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_default_neuron_importance_equals_the_old_l1_norm(scope):
    default, explicit = _net(), _net()
    assert l1_structured_prune(default, 0.5, scope) == l1_structured_prune(
        explicit, 0.5, scope, importance=_old_row_l1
    )
    _assert_same(default, explicit)
    layer = _net()[4]
    assert torch.equal(neuron_l1(layer), _old_row_l1(layer))


# --- neuron importance --------------------------------------------------------------------------


def _two_layers() -> nn.Module:
    """Hidden rows w = [1,1], [2,2], [3,3] (L1 2, 4, 6) with grads [1,1], [.1,.1], [1,1]
    (Σ|w·g| 2, 0.4, 6); the classifier is ignored by default."""
    model = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    model[0].weight.grad = torch.tensor([[1.0, 1.0], [0.1, 0.1], [1.0, 1.0]])
    return model


def test_structured_prune_with_neuron_taylor_drops_another_neuron():
    by_l1, by_taylor = _two_layers(), _two_layers()
    assert neuron_taylor(by_taylor[0]).tolist() == pytest.approx([2.0, 0.4, 6.0])
    l1_structured_prune(by_l1, 1 / 3)
    l1_structured_prune(by_taylor, 1 / 3, importance=neuron_taylor)
    assert by_l1[0].weight.abs().sum(1).tolist() == [0.0, 4.0, 6.0]
    assert by_taylor[0].weight.abs().sum(1).tolist() == [2.0, 0.0, 6.0]


# --- lookup, registration, errors ---------------------------------------------------------------


def test_lookup_by_name_and_registration():
    assert get_importance("taylor") is taylor and get_importance("l1", "neuron") is neuron_l1
    assert get_importance(magnitude) is magnitude
    assert {"magnitude", "taylor"} <= set(importance_names())
    with pytest.raises(ValueError, match="Invalid importance: 'nope'"):
        get_importance("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_importance("magnitude")(magnitude)

    @register_importance("test-squared")
    def squared(p):
        return p.detach().square()

    try:
        model = _row()
        global_magnitude_prune(model, 0.25, importance=get_importance("test-squared"))
        assert _weights(model) == [0.0, 2.0, 3.0, 4.0]
    finally:
        pruning.importance._REGISTRY["parameter"].pop("test-squared")


def test_bad_importance_results_are_named():
    model = _row()
    model[0].weight.grad = None
    with pytest.raises(ValueError, match="has no .grad"):
        global_magnitude_prune(model, 0.5, importance=taylor)
    with pytest.raises(ValueError, match=r"Invalid importance '<lambda>': returned \(4,\)"):
        global_magnitude_prune(model, 0.5, importance=lambda p: p.detach().flatten())
