"""Lightning callbacks: real ``Trainer.fit`` runs on CPU, checked against plain training loops."""

from __future__ import annotations

import pytest

pytest.importorskip("lightning", reason="the 'lightning' extra is not installed")

import lightning.pytorch as pl
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import neuronwise as nw
from neuronwise.integrations.lightning import (
    LobsterCallback,
    NEqCallback,
    PruneOnPlateauCallback,
    SeReNeCallback,
)
from neuronwise.serene import SeReNe


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(),
                                 nn.Linear(10, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, index):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, index):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _data(samples: int = 32) -> TensorDataset:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(samples, 16, generator=generator)
    return TensorDataset(x, (x[:, :3].argmax(1)))


def _loader() -> DataLoader:
    return DataLoader(_data(), batch_size=8)


def _fit(model, callbacks, epochs, ckpt_path=None, validate=True) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=1.0 if validate else 0,
    )
    trainer.fit(model, _loader(), _loader() if validate else None, ckpt_path=ckpt_path)
    return trainer


def _plain_loop(model, epochs, regularizer=None, neq=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if neq is not None:
        neq.attach(optimizer)
    for _ in range(epochs):
        for x, y in _loader():
            optimizer.zero_grad()
            logits = model(x)
            if isinstance(regularizer, SeReNe):
                regularizer.compute(logits)
            F.cross_entropy(logits, y).backward()
            optimizer.step()
            if regularizer is not None:
                regularizer.step()
        if neq is not None:
            neq.step()


def _assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_lobster_callback_matches_plain_loop():
    model, reference = Classifier(), Classifier()
    nw.global_magnitude_prune(model, 0.3)
    nw.global_magnitude_prune(reference, 0.3)
    # Pruned before the regularizer is built: the official mask rule keeps those zeros.
    callback = LobsterCallback(lam=0.05, zeros_at_start="masked")
    _fit(model, [callback], epochs=2, validate=False)
    _plain_loop(reference, 2, nw.Lobster(reference, lam=0.05, zeros_at_start="masked"))
    _assert_same_parameters(model, reference)
    assert int((model.net[0].weight == 0).sum()) >= round(0.3 * 16 * 12) - 5
    assert not any(m._forward_hooks for m in model.modules())  # teardown left no hook


def test_serene_callback_matches_plain_loop():
    model, reference = Classifier(), Classifier()
    callback = SeReNeCallback(lam=0.05)
    _fit(model, [callback], epochs=2, validate=False)
    regularizer = SeReNe(reference, lam=0.05)
    _plain_loop(reference, 2, regularizer)
    _assert_same_parameters(model, reference)
    assert not any(m._forward_hooks for m in model.modules())


def test_serene_callback_on_a_compiled_lightning_module_matches_plain_loop():
    # Lightning runs the compiled forward; the callback hooks the module inside (the hooks must
    # fire in the compiled graph, and SeReNe needs the layer outputs outside it).
    model, reference = Classifier(), Classifier()
    torch._dynamo.reset()  # counts this fit's graphs only
    _fit(torch.compile(model, backend="aot_eager"), [SeReNeCallback(lam=0.05)], epochs=2,
         validate=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it ran compiled
    _plain_loop(reference, 2, SeReNe(reference, lam=0.05))
    _assert_same_parameters(model, reference)


def test_neq_callback_matches_plain_loop():
    val_inputs = _data(8).tensors[0]
    model, reference = Classifier(), Classifier()
    callback = NEqCallback(val_inputs, eps=0.02, mu=0.0)
    _fit(model, [callback], epochs=3, validate=False)
    neq = nw.NEq(reference, val_inputs, eps=0.02, mu=0.0)
    _plain_loop(reference, 3, neq=neq)
    _assert_same_parameters(model, reference)
    assert callback.method.history == neq.history
    assert any(sum(counts) > 0 for counts in neq.history)  # some neurons were frozen


def test_prune_on_plateau_resumes_exactly_from_a_lightning_checkpoint(tmp_path):
    def callbacks():
        lobster = LobsterCallback(lam=0.05)
        return [PruneOnPlateauCallback(patience=0, tolerance=0.05, regularizer=lobster), lobster]

    uninterrupted, straight = Classifier(), callbacks()
    _fit(uninterrupted, straight, epochs=3)

    first, interrupted = Classifier(), callbacks()
    trainer = _fit(first, interrupted, epochs=2)
    trainer.save_checkpoint(tmp_path / "epoch2.ckpt")
    saved = torch.load(tmp_path / "epoch2.ckpt", weights_only=False)["callbacks"]
    assert saved["LobsterCallback"]["mask"]["masks"]
    assert len(saved["PruneOnPlateauCallback"]["history"]) == 2

    resumed, restarted = Classifier(), callbacks()
    _fit(resumed, restarted, epochs=3, ckpt_path=tmp_path / "epoch2.ckpt")
    _assert_same_parameters(resumed, uninterrupted)
    assert restarted[0].method.history == straight[0].method.history
    assert [r["epoch"] for r in straight[0].method.history] == [1, 2, 3]
    remaining = [r["remaining"] / r["total"] for r in straight[0].method.history]
    assert remaining[-1] < 1.0
    for p, m in zip(restarted[1].method.mask.params, restarted[1].method.mask.masks):
        assert torch.all(p[~m] == 0)


def test_prune_on_plateau_callback_needs_the_monitored_metric():
    callback = PruneOnPlateauCallback(monitor="val_acc", patience=0)
    with pytest.raises(RuntimeError, match=r"'val_acc' was not logged.*val_loss"):
        _fit(Classifier(), [callback], epochs=1)


def test_constructors_validate_before_fit():
    with pytest.raises(ValueError, match="Invalid lam"):
        LobsterCallback(lam=-1.0)
    with pytest.raises(ValueError, match="Invalid variant"):
        SeReNeCallback(variant="nope")
    with pytest.raises(ValueError, match="Invalid patience"):
        PruneOnPlateauCallback(patience=-1)
    with pytest.raises(TypeError, match="Invalid regularizer"):
        PruneOnPlateauCallback(regularizer=object())
    with pytest.raises(TypeError, match="Invalid val_inputs"):
        NEqCallback([1, 2])


def test_any_method_callback_runs_through_the_adapter():
    from neuronwise.experiment.methods.magnitude import MagnitudePruningCallback
    from neuronwise.integrations.lightning import MethodCallbackAdapter

    model = Classifier()
    adapter = MethodCallbackAdapter(MagnitudePruningCallback("oneshot", sparsity=0.5))
    _fit(model, [adapter], epochs=2, validate=False)
    params = [p for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()]
    total = sum(p.numel() for p in params)
    zeros = sum(int((p == 0).sum()) for p in params)
    assert zeros == round(0.5 * total)  # pruned up front, kept at zero through 2 epochs of SGD
    assert adapter.state_dict()["done"] is True
    with pytest.raises(TypeError, match="Invalid callback"):
        MethodCallbackAdapter(object())


def test_declared_metrics_are_logged_to_lightning():
    val_inputs = _data(8).tensors[0]
    callback = NEqCallback(val_inputs, eps=0.02, mu=0.0)
    trainer = _fit(Classifier(), [callback], epochs=2, validate=False)
    logged = trainer.callback_metrics
    assert {"frozen_percent", "frozen_per_layer/net.0", "velocity_quantiles/p50",
            "backward_saving_percent"} <= set(logged)
    # The last epoch's frozen share is the neuron-weighted mean of the layers' (12 and 10 rows).
    layers = [float(logged[f"frozen_per_layer/{n}"]) for n in ("net.0", "net.2")]
    expected = (12 * layers[0] + 10 * layers[1]) / 22
    assert float(logged["frozen_percent"]) == pytest.approx(expected, rel=1e-5)
