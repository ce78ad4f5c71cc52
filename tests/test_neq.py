"""NEq (METHODS.md §5): similarity, velocities, selection, freezing, fast backward, state."""

from __future__ import annotations

import copy
import io
import itertools
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuronwise import distributed
from neuronwise.neq import NEq, cosine
from neuronwise.neq.backward import ActiveRowsHook


def small_net() -> nn.Sequential:
    """Every hooked type: Conv2d (bias), BatchNorm2d, Linear, LayerNorm; classifier last."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),  # 0
        nn.BatchNorm2d(4),  # 1
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),  # 3
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 8),  # 6
        nn.LayerNorm(8),  # 7
        nn.ReLU(),
        nn.Linear(8, 3),  # 9: classifier
    )


def batches(count: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 1, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g))
        for _ in range(count)
    ]


def train_epoch(model, optimizer, data):
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


# ---------------------------------------------------------------- similarity


def test_cosine_zero_vector_rules():
    dot = torch.tensor([0.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    na = torch.tensor([0.0, 0.0, 2.0, 4.0], dtype=torch.float64)
    nb = torch.tensor([0.0, 5.0, 0.0, 9.0], dtype=torch.float64)
    assert cosine(dot, na, nb).tolist() == [1.0, 0.0, 0.0, 0.5]


def test_spatial_similarity_is_mean_of_per_sample_cosines():
    conv = nn.Conv2d(1, 2, 1)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(4, 2))
    # Sample 1 positions [1, 0]; sample 2 all zero.
    x = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 0.0]]]])
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.0]).view(2, 1, 1, 1))
        conv.bias.zero_()
    neq = NEq(model, x)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([1.0, 0.0]))
    neq.step()
    # Channel 0: sample 1 [1,0] -> [2,1] (cos 2/√5); sample 2 [0,0] -> [1,1] (one zero: 0).
    # Channel 1: zero -> zero for both samples (cos 1).
    phi = neq.similarity["0"]
    assert phi.dtype == torch.float64
    assert phi[0].item() == pytest.approx((2 / math.sqrt(5) + 0) / 2, abs=1e-15)
    assert phi[1].item() == 1.0


def test_nc_similarity_is_one_cosine_over_the_validation_vector():
    fc = nn.Linear(2, 2, bias=False)
    model = nn.Sequential(fc, nn.Linear(2, 2))
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 0.0], [3.0, 4.0]]))
    neq = NEq(model, torch.eye(2))  # sample j reads column j: neuron k's vector is W[k]
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[0.0, 1.0], [4.0, 3.0]]))
    neq.step()
    # (3,4)·(4,3)/25 = 0.96; per-sample cosines of scalars would give 1.
    assert neq.similarity["0"].tolist() == pytest.approx([0.0, 0.96], abs=1e-15)


def test_similarity_invariant_under_replicated_validation_on_two_ranks(monkeypatch):
    def run(patch: bool):
        torch.manual_seed(3)
        model = small_net()
        neq = NEq(model, torch.randn(3, 1, 6, 6))
        train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.5), batches(2))
        if patch:
            # Two ranks holding the same Ξ: every reduced sum (and count) doubles.
            calls = []
            monkeypatch.setattr(
                distributed, "all_reduce_sum", lambda t: calls.append(1) or t.mul_(2)
            )
            neq.step()
            assert calls
        else:
            neq.step()
        return neq.similarity

    plain, doubled = run(False), run(True)
    for name in plain:
        torch.testing.assert_close(plain[name], doubled[name], rtol=0, atol=1e-12)


# ---------------------------------------------------------------- velocity


def rotating_neq(angles, velocity, mu=0.5, eps=1e-3):
    """One hooked neuron whose Ξ-vector is (cos θ, sin θ): φ^t = cos(θ_t − θ_{t−1}) exactly."""
    fc = nn.Linear(2, 1, bias=False)
    model = nn.Sequential(fc, nn.Linear(1, 2))

    def set_angle(theta):
        with torch.no_grad():
            fc.weight.copy_(torch.tensor([[math.cos(theta), math.sin(theta)]]))

    set_angle(angles[0])
    neq = NEq(model, torch.eye(2), velocity=velocity, mu=mu, eps=eps)
    velocities, frozen = [], []
    for theta in angles[1:]:
        set_angle(theta)
        neq.step()
        velocities.append(neq.velocity["0"].item())
        frozen.append(bool(neq.frozen["0"].item()))
    return velocities, frozen


def test_velocity_quarter_turns_hand_computed():
    # Exact quarter turns: φ = 0, 0, 0, 0 so Δφ = −1, 0, 0, 0.
    vecs = [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0), (1.0, 0.0)]
    fc = nn.Linear(2, 1, bias=False)
    results = {}
    for form in ("paper", "official"):
        model = nn.Sequential(fc, nn.Linear(1, 2))
        with torch.no_grad():
            fc.weight.copy_(torch.tensor([vecs[0]]))
        neq = NEq(model, torch.eye(2), velocity=form, mu=0.5, eps=0.25)
        seq, frozen = [], []
        for v in vecs[1:]:
            with torch.no_grad():
                fc.weight.copy_(torch.tensor([v]))
            neq.step()
            seq.append(neq.velocity["0"].item())
            frozen.append(bool(neq.frozen["0"].item()))
        results[form] = (seq, frozen)
    # paper: v = Δφ − μ v;  official: m = u + Δφ, u = μ m − Δφ  (both start 1, −0.5 per unit Δφ).
    assert results["paper"][0] == [-1.0, 0.5, -0.25, 0.125]
    assert results["official"][0] == [-1.0, 0.5, 0.25, 0.125]
    # |v| = 0.25 = ε: strict for paper, inclusive for official.
    assert results["paper"][1] == [False, False, False, True]
    assert results["official"][1] == [False, False, True, True]


@pytest.mark.parametrize("form", ["paper", "official"])
@pytest.mark.parametrize("mu", [0.0, 0.5, 0.9])
def test_velocity_matches_closed_forms(form, mu):
    g = torch.Generator().manual_seed(7)
    angles = torch.cumsum(torch.rand(7, generator=g, dtype=torch.float64), 0).tolist()
    velocities, _ = rotating_neq(angles, form, mu=mu)
    # The weights are float32: φ from the rounded vectors, in float64.
    vectors = [torch.tensor([math.cos(a), math.sin(a)]).double() for a in angles]
    phi = [1.0] + [float(u @ v / (u.norm() * v.norm())) for u, v in itertools.pairwise(vectors)]
    delta = [b - a for a, b in itertools.pairwise(phi)]
    for t in range(len(delta)):
        if form == "paper":
            expected = sum((-mu) ** k * delta[t - k] for k in range(t + 1))
        else:
            expected = delta[t] - (1 - mu) * sum(
                mu ** (k - 1) * delta[t - k] for k in range(1, t + 1)
            )
        assert velocities[t] == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- selection and schedule


def test_classifier_never_hooked_by_default():
    model = small_net()
    neq = NEq(model, torch.randn(2, 1, 6, 6))
    assert list(neq.modules) == ["0", "1", "3", "6", "7"]
    with_head = NEq(model, torch.randn(2, 1, 6, 6), exclude=[])
    assert "9" in with_head.modules


@pytest.mark.parametrize("selection", ["random", "topk"])
@pytest.mark.parametrize("p", [0.0, 0.5, 0.8, 1.0])
def test_baselines_freeze_floor_of_untrained_share(selection, p):
    model = small_net()
    neq = NEq(model, torch.randn(3, 1, 6, 6), selection=selection, trained_fraction=p)
    train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(1))
    neq.step()
    # Layer widths 4, 4, 5, 8, 8; e.g. p = 0.8 freezes ⌊0.2·5⌋ = 1 of conv 3.
    expected = {"0": 4, "1": 4, "3": 5, "6": 8, "7": 8}
    for name, width in expected.items():
        assert int(neq.frozen[name].sum()) == math.floor(round((1 - p) * width, 9))
    if selection == "topk":
        for name, frozen in neq.frozen.items():
            speed = neq.velocity[name].abs()
            if 0 < frozen.sum() < frozen.numel():
                assert speed[frozen].max() <= speed[~frozen].min()


def test_random_draws_differ_across_epochs_and_seeds():
    model = small_net()
    x = torch.randn(2, 1, 6, 6)
    draws = []
    for seed in (0, 0, 1):
        neq = NEq(model, x, selection="random", trained_fraction=0.5, seed=seed)
        neq.step()
        first = torch.cat(list(neq.frozen.values()))
        neq.step()
        draws.append((first, torch.cat(list(neq.frozen.values()))))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert not torch.equal(draws[0][0], draws[0][1])
    assert not torch.equal(draws[0][0], draws[2][0])


def test_warmup_trains_all_then_threshold_applies():
    model = small_net()
    neq = NEq(model, torch.randn(2, 1, 6, 6), eps=10.0, warmup=2)
    assert neq.frozen_fraction() == 0.0  # epoch 1
    neq.step()
    assert neq.frozen_fraction() == 0.0  # epoch 2 still warm-up
    neq.step()
    assert neq.frozen_fraction() == 1.0  # |v| < 10 everywhere


def test_unfreezing_and_pinning():
    # A neuron frozen at rest unfreezes when it moves, unless pinned.
    for pinning, expected in ((False, False), (True, True)):
        fc = nn.Linear(2, 1, bias=False)
        model = nn.Sequential(fc, nn.Linear(1, 2))
        with torch.no_grad():
            fc.weight.copy_(torch.tensor([[1.0, 0.0]]))
        neq = NEq(model, torch.eye(2), eps=0.1, pinning=pinning)
        neq.step()  # no change: φ = 1, v = 0
        assert neq.frozen["0"].item()
        with torch.no_grad():
            fc.weight.copy_(torch.tensor([[0.0, 1.0]]))
        neq.step()  # φ = 0: v = −1
        assert neq.frozen["0"].item() is expected


# ---------------------------------------------------------------- freezing in the optimizer


def reference_update(kind, params, grads, frozen_masks, state, hp):
    """METHODS §5 masked SGD / Adam(W), written plainly (masks broadcast over rows)."""
    lr, wd = hp["lr"], hp["weight_decay"]
    for i, (p, g, m) in enumerate(zip(params, grads, frozen_masks)):
        st = state.setdefault(i, {})
        if kind == "sgd":
            d = g + wd * p
            d = torch.where(m, torch.zeros_like(d), d)
            buf = d.clone() if "buf" not in st else hp["momentum"] * st["buf"] + d
            buf = torch.where(m, torch.zeros_like(buf), buf)
            st["buf"] = buf
            p -= lr * buf
        else:
            b1, b2 = hp["betas"]
            st["step"] = st.get("step", 0) + 1
            if kind == "adamw":
                p.copy_(torch.where(m, p, p * (1 - lr * wd)))
            else:
                g = g + wd * p
            g = torch.where(m, torch.zeros_like(g), g)
            ea = b1 * st.get("m", torch.zeros_like(p)) + (1 - b1) * g
            ea = torch.where(m, torch.zeros_like(ea), ea)
            ev = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
            st["m"], st["v"] = ea, ev
            denom = (ev / (1 - b2 ** st["step"])).sqrt() + 1e-8
            p -= lr / (1 - b1 ** st["step"]) * ea / denom


OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05}),
    "adam": (torch.optim.Adam, {"lr": 0.01, "betas": (0.9, 0.999), "weight_decay": 0.05}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "betas": (0.9, 0.999), "weight_decay": 0.05}),
}


def row_masks(neq, model):
    """Frozen mask per parameter of ``model``, broadcast to the parameter's shape."""
    masks = []
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if name in neq.frozen:
                masks.append(neq.frozen[name].view(-1, *[1] * (p.dim() - 1)).expand_as(p))
            else:
                masks.append(torch.zeros_like(p, dtype=torch.bool))
    return masks


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_optim_mode_matches_reference_and_keeps_frozen_rows(kind):
    torch.manual_seed(0)
    model = small_net()
    cls, hp = OPTIMIZERS[kind]
    optimizer = cls(model.parameters(), **hp)
    neq = NEq(model, torch.randn(3, 1, 6, 6), selection="random", trained_fraction=0.5)
    neq.attach(optimizer)
    reference = [p.detach().clone() for p in model.parameters()]
    state: dict = {}
    for epoch in range(3):
        masks = row_masks(neq, model)
        for x, y in batches(3, seed=epoch):
            before = [p.detach().clone() for p in model.parameters()]
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            grads = [p.grad.clone() for p in model.parameters()]
            optimizer.step()
            reference_update(kind, reference, grads, masks, state, hp)
            for p, b, m in zip(model.parameters(), before, masks):
                assert torch.equal(p[m], b[m])  # frozen rows bit-identical
                assert not torch.equal(p[~m], b[~m])  # the rest moves
            for p, r in zip(model.parameters(), reference):
                torch.testing.assert_close(p, r, rtol=0, atol=1e-6)
            buffers = "momentum_buffer" if kind == "sgd" else "exp_avg"
            for p, m in zip(model.parameters(), masks):
                assert not optimizer.state[p][buffers][m].any()
            if epoch:
                assert 0 < neq.frozen_fraction() < 1
        neq.step()


def test_grad_mode_zeroes_gradients_only():
    torch.manual_seed(0)
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    neq = NEq(model, torch.randn(2, 1, 6, 6), selection="topk", trained_fraction=0.5, mode="grad")
    neq.attach(optimizer)
    neq.step()
    masks = row_masks(neq, model)
    before = [p.detach().clone() for p in model.parameters()]
    train_epoch(model, optimizer, batches(1))
    for p, b, m in zip(model.parameters(), before, masks):
        assert not p.grad[m].any()
        # Weight decay still shrinks frozen rows in this mode.
        torch.testing.assert_close(p[m], b[m] * (1 - 0.1 * 0.1))


def test_restore_mode_for_other_optimizers_warns_and_keeps_rows():
    torch.manual_seed(0)
    model = small_net()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=0.01)
    neq = NEq(model, torch.randn(2, 1, 6, 6), selection="random", trained_fraction=0.5)
    with pytest.warns(UserWarning, match="restore"):
        handle = neq.attach(optimizer)
    neq.step()
    masks = row_masks(neq, model)
    before = [p.detach().clone() for p in model.parameters()]
    train_epoch(model, optimizer, batches(2))
    for p, b, m in zip(model.parameters(), before, masks):
        assert torch.equal(p[m], b[m]) and not torch.equal(p[~m], b[~m])
    handle.remove()
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    train_epoch(model, optimizer, batches(1))
    assert not all(torch.equal(p[m], b[m]) for p, b, m in zip(model.parameters(), before, masks))


# ---------------------------------------------------------------- fast backward


def fast_and_reference(kind):
    torch.manual_seed(0)
    base = small_net()
    x = torch.randn(3, 1, 6, 6)
    runs = []
    for skip in (True, False):
        model = copy.deepcopy(base)
        cls, hp = OPTIMIZERS[kind]
        optimizer = cls(model.parameters(), **hp)
        # Conv 0, Linear 6 (active-row path), LN 7 partly frozen; BN 1, conv 3 fully frozen in epoch 2.
        partial = NEq(
            model,
            x,
            layers=["0", "6", "7"],
            selection="random",
            trained_fraction=0.2,
            skip_frozen_grads=skip,
        )
        full = NEq(
            model,
            x,
            layers=["1", "3"],
            eps=1e9,
            skip_frozen_grads=skip,
        )
        partial.attach(optimizer)
        full.attach(optimizer)
        runs.append((model, optimizer, partial, full))
    return runs


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_skip_frozen_grads_equals_masked_reference(kind):
    (fast, fast_opt, fp, ff), (ref, ref_opt, rp, rf) = fast_and_reference(kind)
    for epoch in range(4):
        data = batches(2, seed=epoch)
        train_epoch(fast, fast_opt, data)
        train_epoch(ref, ref_opt, data)
        for a, b in zip(fast.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        if epoch == 1:
            # Unfrozen again: optimizer state kept while autograd skipped them must be exact.
            ff.eps = rf.eps = 0.0
        for n in (fp, ff, rp, rf):
            n.step()
        if epoch == 0:
            # The fast path really skips: conv 3 has no gradient, conv 0 runs the active-row hook.
            assert (
                not fast[3].weight.requires_grad
                and fast[0]._forward_hooks
                and fast[6]._forward_hooks
            )
            fast_opt.zero_grad()
            F.cross_entropy(fast(data[0][0]), data[0][1]).backward()
            assert fast[3].weight.grad is None
            assert not fast[0].weight.grad[fp.frozen["0"]].any()
            assert fast[0].weight.grad[~fp.frozen["0"]].abs().sum() > 0
            fast_opt.zero_grad()
    ff.remove()
    fp.remove()
    assert all(p.requires_grad for p in fast.parameters()) and not fast[0]._forward_hooks


def test_active_rows_grad_matches_autograd_and_allows_inplace_relu():
    torch.manual_seed(0)
    for layer, x in (
        (nn.Conv2d(3, 6, 3, stride=2, padding=1, dilation=1), torch.randn(2, 3, 7, 7)),
        (nn.Linear(5, 6), torch.randn(2, 4, 5)),
    ):
        active = torch.tensor([0, 2, 5])
        x = x.requires_grad_()
        reference = copy.deepcopy(layer)
        (F.relu(reference(x)) ** 2).sum().backward()
        expected_x = x.grad.clone()
        x.grad = None
        handle = layer.register_forward_hook(ActiveRowsHook(active))
        out = layer(x)
        out.relu_()  # legal: the output is not a view of the custom Function's input
        (out**2).sum().backward()
        handle.remove()
        torch.testing.assert_close(x.grad, expected_x)
        frozen = torch.ones(6, dtype=torch.bool)
        frozen[active] = False
        for p, r in ((layer.weight, reference.weight), (layer.bias, reference.bias)):
            torch.testing.assert_close(p.grad[active], r.grad[active])
            assert not p.grad[frozen].any()


# ---------------------------------------------------------------- state, modes, hooks


def run_epochs(model, optimizer, neq, epochs, start):
    for epoch in range(start, start + epochs):
        train_epoch(model, optimizer, batches(2, seed=epoch))
        neq.step()


@pytest.mark.parametrize("selection", ["threshold", "random"])
def test_state_dict_resume_equals_uninterrupted(selection):
    kwargs = {"eps": 0.05, "selection": selection, "skip_frozen_grads": True}
    if selection == "random":
        kwargs["trained_fraction"] = 0.5
    torch.manual_seed(0)
    base = small_net()
    x = torch.randn(3, 1, 6, 6)

    model = copy.deepcopy(base)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    neq = NEq(model, x, **kwargs)
    neq.attach(optimizer)
    run_epochs(model, optimizer, neq, 4, 0)

    first = copy.deepcopy(base)
    opt1 = torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9)
    neq1 = NEq(first, x, **kwargs)
    neq1.attach(opt1)
    run_epochs(first, opt1, neq1, 2, 0)
    buffer = io.BytesIO()
    torch.save(
        {"model": first.state_dict(), "opt": opt1.state_dict(), "neq": neq1.state_dict()}, buffer
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = small_net()
    resumed.load_state_dict(checkpoint["model"])
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(checkpoint["opt"])
    neq2 = NEq(resumed, x, **kwargs)
    neq2.load_state_dict(checkpoint["neq"])
    neq2.attach(opt2)
    run_epochs(resumed, opt2, neq2, 2, 2)

    assert neq2.epoch == neq.epoch == 4 and neq2.history == neq.history
    for key in ("similarity", "velocity", "frozen", "previous"):
        for name in neq.modules:
            assert torch.equal(getattr(neq, key)[name], getattr(neq2, key)[name]), (key, name)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_load_state_dict_rejects_other_layers():
    model = small_net()
    neq = NEq(model, torch.randn(2, 1, 6, 6))
    other = NEq(model, torch.randn(2, 1, 6, 6), layers=["0"])
    with pytest.raises(ValueError, match="Invalid state: layers"):
        other.load_state_dict(neq.state_dict())


def test_step_restores_module_modes_and_leaves_no_hooks():
    model = small_net()
    model.train()
    model[1].eval()
    neq = NEq(model, torch.randn(2, 1, 6, 6))
    neq.step()
    assert model.training and not model[1].training and model[3].training
    assert all(not m._forward_hooks for m in model.modules())


def test_model_deepcopies_and_pickles_with_neq_attached():
    torch.manual_seed(0)
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    neq = NEq(
        model,
        torch.randn(2, 1, 6, 6),
        selection="random",
        trained_fraction=0.2,
        skip_frozen_grads=True,
    )
    neq.attach(optimizer)
    neq.step()
    assert any(m._forward_hooks for m in model.modules())
    x = torch.randn(2, 1, 6, 6)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
        F.cross_entropy(clone(x), torch.tensor([0, 1])).backward()


def test_frozen_fractions_trained_neurons_and_backward_flops():
    # conv 1→2 k3 on 5×5 (out 2×3×3 = 18): forward 18·(9+1) = 180; BN 2·18 = 36; Linear 18·3 = 54.
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(18, 3))
    x = torch.randn(1, 1, 5, 5)
    neq = NEq(model, torch.randn(2, 1, 5, 5), selection="random", trained_fraction=0.5)
    total = 2 * (180 + 36 + 54)
    assert neq.backward_flops(x) == total and neq.trained_neurons() == 2 + 2 + 3
    neq.step()
    assert neq.frozen_per_layer() == {"0": 0.5, "1": 0.5} and neq.frozen_fraction() == 0.5
    assert neq.backward_flops(x) == 2 * (90 + 18 + 54)
    assert neq.trained_neurons() == 1 + 1 + 3
    neq.step()
    # Epochs trained so far: epoch 1 (nothing frozen) and epoch 2 (half of conv and BN).
    assert neq.backward_flops(x, average=True) == (total + 2 * (90 + 18 + 54)) / 2
    assert neq.trained_neurons(average=True) == (7 + 5) / 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": -1.0}, "Invalid eps: -1.0 (expected >= 0)"),
        ({"mu": 1.5}, "Invalid mu: 1.5"),
        ({"velocity": "fast"}, "Invalid velocity: 'fast'"),
        ({"warmup": 0}, "Invalid warmup: 0"),
        ({"mode": "none"}, "Invalid mode: 'none'"),
        ({"selection": "topk"}, "Invalid trained_fraction: None"),
        ({"trained_fraction": 0.5}, "Invalid trained_fraction: 0.5"),
        ({"selection": "random", "trained_fraction": 0.5, "pinning": True}, "Invalid pinning"),
        ({"layers": ["2"]}, "Invalid layers: '2'"),
        ({"exclude": ["nope"]}, "Invalid exclude"),
        ({"batch_size": 0}, "Invalid batch_size: 0"),
    ],
)
def test_constructor_validation(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        NEq(small_net(), torch.randn(2, 1, 6, 6), **kwargs)


def test_batched_validation_pass_equals_single_batch():
    torch.manual_seed(0)
    base = small_net()
    x = torch.randn(5, 1, 6, 6)
    result = []
    for batch_size in (2, 5):
        model = copy.deepcopy(base)
        neq = NEq(model, x, batch_size=batch_size)
        train_epoch(model, torch.optim.SGD(model.parameters(), lr=1.0), batches(2))
        neq.step()
        result.append(neq.similarity)
    assert min(float(phi.min()) for phi in result[0].values()) < 0.9
    # float32 forwards round differently per batch size; a wrong aggregation would be far off.
    for name in result[0]:
        torch.testing.assert_close(result[0][name], result[1][name], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- reporting: velocities


def test_velocity_quantiles_pool_every_hooked_neuron():
    torch.manual_seed(0)
    model = small_net()
    neq = NEq(model, torch.randn(3, 1, 6, 6))
    assert neq.velocity_quantiles([0.0, 0.5, 1.0]) == [0.0, 0.0, 0.0]  # before the first step
    train_epoch(model, torch.optim.SGD(model.parameters(), lr=1.0), batches(2))
    neq.step()
    speeds = sorted(abs(v) for velocity in neq.velocity.values() for v in velocity.tolist())
    assert len(speeds) == 4 + 4 + 5 + 8 + 8 and speeds[-1] > 0
    low, tenth, median, high = neq.velocity_quantiles([0.0, 0.1, 0.5, 1.0])
    assert (low, median, high) == (speeds[0], speeds[14], speeds[-1])  # 29 neurons
    # Linear interpolation: q = 0.1 sits at rank 0.1 · 28 = 2.8.
    assert tenth == pytest.approx(speeds[2] + 0.8 * (speeds[3] - speeds[2]), rel=1e-12)


@pytest.mark.parametrize("quantiles", [[], [1.5], [-0.1], [True], ["0.5"]])
def test_velocity_quantiles_validation(quantiles):
    with pytest.raises(ValueError, match="Invalid quantiles"):
        NEq(small_net(), torch.randn(2, 1, 6, 6)).velocity_quantiles(quantiles)
