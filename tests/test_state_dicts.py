"""Every method object's state_dict holds its hyperparameters (torch.optim semantics).

load_state_dict restores them; a state saved before a hyperparameter was (older checkpoints)
keeps the constructor's value; an invalid one is refused with the field's name.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuronwise import NEq, SeReNe
from neuronwise.lobster import Lobster
from neuronwise.neq import HYPERPARAMETERS
from neuronwise.pruning import GradualMagnitudePruning, IterativeMagnitudePruning, PruneOnPlateau


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _without(state: dict, keys) -> dict:
    return {k: v for k, v in state.items() if k not in keys}


# --- NEq ----------------------------------------------------------------------------------------

NEQ_SETTINGS = {
    "eps": 0.05, "mu": 0.25, "velocity": "official", "warmup": 3, "mode": "grad",
    "selection": "topk", "trained_fraction": 0.5, "pinning": False, "batch_size": 2,
    "skip_frozen_grads": True,
}


def test_neq_state_dict_round_trips_its_hyperparameters():
    model, x = _mlp(), torch.randn(5, 4)
    saved = NEq(model, x, **NEQ_SETTINGS).state_dict()
    expected = {**NEQ_SETTINGS, "velocity_form": NEQ_SETTINGS["velocity"]}
    assert {name: saved[name] for name in HYPERPARAMETERS} == {
        name: expected[name] for name in HYPERPARAMETERS
    }
    restored = NEq(model, x)  # defaults everywhere
    restored.load_state_dict(saved)
    assert {name: getattr(restored, name) for name in HYPERPARAMETERS} == {
        name: expected[name] for name in HYPERPARAMETERS
    }
    restored.remove()


def test_neq_old_state_without_hyperparameters_keeps_the_constructor_values():
    model, x = _mlp(), torch.randn(5, 4)
    old = _without(NEq(model, x).state_dict(), HYPERPARAMETERS)  # as saved before they were
    neq = NEq(model, x, **NEQ_SETTINGS)
    neq.load_state_dict(old)
    assert (neq.eps, neq.mu, neq.velocity_form, neq.selection, neq.trained_fraction) == (
        0.05, 0.25, "official", "topk", 0.5,
    )
    neq.remove()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"eps": -1.0}, "Invalid eps: -1.0"),
        ({"mode": "none"}, "Invalid mode: 'none'"),
        ({"selection": "random"}, "Invalid trained_fraction: None"),  # checked together
    ],
)
def test_neq_refuses_invalid_hyperparameters_in_a_state(change, message):
    model, x = _mlp(), torch.randn(5, 4)
    neq = NEq(model, x)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        neq.load_state_dict({**neq.state_dict(), **change})


def test_neq_loaded_mode_applies_to_an_attached_optimizer():
    # Attached in mode "grad" (momentum keeps moving frozen rows), then a state with mode
    # "optim" is loaded: the next step zeroes the frozen rows' momentum and keeps them still.
    model, x = _mlp(), torch.randn(5, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]

    def epoch():
        for inputs, labels in data:
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), labels).backward()
            optimizer.step()

    neq = NEq(model, x, mode="grad", selection="random", trained_fraction=0.5)
    neq.attach(optimizer)
    epoch()
    neq.step()
    frozen = neq.frozen["0"]
    assert frozen.any()
    neq.load_state_dict({**neq.state_dict(), "mode": "optim"})
    before = model[0].weight.detach()[frozen].clone()
    epoch()
    assert torch.equal(model[0].weight.detach()[frozen], before)
    assert not optimizer.state[model[0].weight]["momentum_buffer"][frozen].any()


# --- regularizers -------------------------------------------------------------------------------


def test_serene_state_dict_round_trips_and_old_states_load():
    model = _mlp()
    saved = SeReNe(model, lam=0.2, variant="full", foreach=True).state_dict()
    assert (saved["lam"], saved["variant"], saved["foreach"]) == (0.2, "full", True)
    restored = SeReNe(model, lam=0.0)
    restored.load_state_dict(saved)
    assert (restored.lam, restored.variant, restored.foreach) == (0.2, "full", True)
    older = SeReNe(model, lam=0.3, variant="local", foreach=False)
    older.load_state_dict(_without(saved, {"lam", "variant", "foreach"}))
    assert (older.lam, older.variant, older.foreach) == (0.3, "local", False)
    with pytest.raises(ValueError, match="Invalid variant: 'x'"):
        older.load_state_dict({**saved, "variant": "x"})
    restored.remove()
    older.remove()


def test_lobster_state_dict_round_trips_and_old_states_load():
    model = _mlp()
    saved = Lobster(model, lam=0.2, scale_by_lr=True, lr=0.5, rescaled=True, foreach=True)
    saved = saved.state_dict()
    restored = Lobster(model)
    restored.load_state_dict(saved)
    assert (restored.lam, restored.scale_by_lr, restored.lr, restored.rescaled, restored.foreach) \
        == (0.2, True, 0.5, True, True)
    older = Lobster(model, lam=0.3, foreach=False)
    older.load_state_dict(_without(saved, {"foreach"}))
    assert older.foreach is False and older.lam == 0.2


# --- schedules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "settings", "defaults"),
    [
        (
            lambda model, **kw: PruneOnPlateau(model, lambda: 1.0, **kw),
            {"patience": 3, "tolerance": 0.1, "plateau_tolerance": 0.2, "safe_threshold": True},
            {"patience": 20, "tolerance": 0.05, "plateau_tolerance": 0.01, "safe_threshold": False},
        ),
        (
            IterativeMagnitudePruning,
            {"fraction": 0.4, "every": 3, "final_sparsity": 0.9},
            {"fraction": 0.2, "every": 1, "final_sparsity": None},
        ),
        (
            GradualMagnitudePruning,
            {"final_sparsity": 0.8, "initial_sparsity": 0.1, "start_step": 2, "frequency": 5,
             "num_updates": 4},
            {"final_sparsity": 0.5, "initial_sparsity": 0.0, "start_step": 0, "frequency": 100,
             "num_updates": 10},
        ),
    ],
)
def test_schedule_state_dicts_hold_their_hyperparameters(build, settings, defaults):
    model = _mlp()
    saved = build(model, **settings).state_dict()
    assert {k: saved[k] for k in settings} == settings
    restored = build(model, **defaults)
    restored.load_state_dict(saved)
    assert {k: getattr(restored, k) for k in settings} == settings
    older = build(model, **defaults)
    older.load_state_dict(_without(saved, settings))
    assert {k: getattr(older, k) for k in settings} == defaults
