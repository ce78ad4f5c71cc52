"""``neuronwise analyze RUN``: test error, PSP-entropy, sharpness and loss-landscape slices of a
run's model (JSON + PNG plots), and the frozen-feature linear probe of the pruning study.

Everything here evaluates in eval mode under ``no_grad`` and leaves the model as it found it
(weights bit-identical, training flags restored).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from neuronwise import data as nwdata
from neuronwise import models
from neuronwise.entropy import LayerEntropy, PSPEntropy
from neuronwise.io import atomic_write_bytes, atomic_write_text
from neuronwise.sharpness import LandscapeSlice, Sharpness, landscape_slice
from neuronwise.sharpness import sharpness as measure_sharpness

from .config import Config
from .plots import classwise_png, entropy_histograms_png, landscape_png
from .rundir import RunDir
from .tools import load_run_model

__all__ = [
    "Analysis",
    "ProbeResult",
    "analyze_model",
    "analyze_run",
    "classwise_layer",
    "classwise_png",
    "entropy_histograms_png",
    "entropy_summary",
    "evaluate",
    "extract_features",
    "landscape_png",
    "linear_probe",
    "split_loader",
]

DEFAULT_SIGMAS = (0.01, 0.05, 0.1)


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyze_model` measured; ``None`` for the parts not asked for.

    Attributes:
        loss, accuracy, samples: mean cross-entropy and top-1 accuracy (%) over the loader.
        entropy: PSP-entropy per layer (METHODS.md §6).
        sharpness: mean loss increase under weight noise on surviving weights.
        landscape: loss along a filter-normalized random direction (surviving weights only).
    """

    loss: float
    accuracy: float
    samples: int
    entropy: dict[str, LayerEntropy] | None = None
    sharpness: Sharpness | None = None
    landscape: LandscapeSlice | None = None

    def summary(self) -> dict:
        """A JSON-ready digest (no per-unit arrays)."""
        out: dict = {"loss": self.loss, "accuracy": self.accuracy,
                     "error": 100.0 - self.accuracy, "samples": self.samples}
        if self.entropy is not None:
            out["psp_entropy_bits"] = entropy_summary(self.entropy)
        if self.sharpness is not None:
            s = self.sharpness
            out["sharpness"] = {"base_loss": s.base_loss, "sigmas": list(s.sigmas),
                                "mean_increase": list(s.mean),
                                # JSON has no NaN: one draw has no sample std.
                                "std": [None if math.isnan(d) else d for d in s.std],
                                "draws": int(s.increases.shape[1])}
        if self.landscape is not None:
            out["landscape"] = {"alphas": self.landscape.alphas.tolist(),
                                "losses": self.landscape.losses.tolist()}
        return out


def _pair(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if (not isinstance(batch, (tuple, list)) or len(batch) != 2
            or not all(isinstance(t, torch.Tensor) for t in batch)):
        found = type(batch).__name__
        if isinstance(batch, (tuple, list)):
            found += f" of {len(batch)} " + ", ".join(type(t).__name__ for t in batch)
        raise TypeError(f"Invalid loader: a batch is a {found} (expected an (inputs, labels) "
                        "pair of tensors; the analysis needs true labels)")
    inputs, labels = batch
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"Invalid loader: labels of dtype {labels.dtype}, shape "
                        f"{tuple(labels.shape)} (expected 1-D integer class indices)")
    return inputs, labels


def _device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


class _Evaluating:
    """Eval mode for the duration of a ``with`` block; every module's flag restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc) -> None:
        for module, training in self.modes:
            module.training = training


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> tuple[float, float, int]:
    """Mean cross-entropy, top-1 accuracy (%) and sample count over ``loader`` (eval mode)."""
    device = _device(model)
    loss = correct = samples = 0.0
    with _Evaluating(model):
        for batch in loader:
            inputs, labels = _pair(batch)
            inputs, labels = inputs.to(device), labels.to(device)
            logits = model(inputs)
            loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            samples += labels.numel()
    if samples == 0:
        raise ValueError("Invalid loader: it yielded no samples")
    return loss / samples, 100.0 * correct / samples, int(samples)


def analyze_model(
    model: nn.Module,
    loader: Iterable,
    entropy: bool = True,
    sharpness: bool = False,
    layers: Sequence[str] | None = None,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    draws: int = 10,
    seed: int = 0,
    landscape_points: int = 21,
    sharpness_loader: Iterable | None = None,
) -> Analysis:
    """Test loss/accuracy, PSP-entropy of ``layers`` (default every Linear/Conv2d) and, with
    ``sharpness``, the noise probe and a random-direction landscape slice over α ∈ [−1, 1].

    ``sharpness_loader`` (default ``loader``) feeds the two weight-space probes, which evaluate
    the loss once per σ·draw and per α, so a subset keeps them affordable for conv nets.
    """
    if draws < 1:
        raise ValueError(f"Invalid draws: {draws} (expected >= 1)")
    if landscape_points < 2:
        raise ValueError(f"Invalid landscape_points: {landscape_points} (expected >= 2)")
    # Built first so that a wrong layer name fails before any pass over the data.
    metric = PSPEntropy(model, layers=layers) if entropy else None
    loss, accuracy, samples = evaluate(model, loader)
    layer_entropy = None
    if metric is not None:
        device = _device(model)
        for batch in loader:
            inputs, labels = _pair(batch)
            metric.update(inputs.to(device), labels.to(device))
        layer_entropy = metric.compute()
    noise = curve = None
    if sharpness:
        probe_loader = loader if sharpness_loader is None else sharpness_loader
        noise = measure_sharpness(model, probe_loader, sigma=tuple(sigmas), draws=draws, seed=seed)
        curve = landscape_slice(model, probe_loader, alphas=torch.linspace(
            -1.0, 1.0, landscape_points, dtype=torch.float64), seed=seed)
    return Analysis(loss, accuracy, samples, layer_entropy, noise, curve)


def entropy_summary(layers: Mapping[str, LayerEntropy]) -> dict[str, dict]:
    """Per layer: mean and median H(u) in bits, the unit count and shape, the fraction of units
    never on (p_on = 0 for every class) — the dead units, which sit at the entropy floor — and the
    mean H(u) over the other units (``live_mean``; NaN when every unit is dead), which compares
    the entropy of what still computes without counting how many units died."""
    out = {}
    for name, layer in layers.items():
        seen = layer.class_counts > 0
        never_on = (layer.p_on[:, seen] == 0).all(dim=1)
        live = layer.per_unit[~never_on]
        out[name] = {"mean": layer.mean, "median": float(layer.per_unit.median()),
                     "units": int(layer.per_unit.numel()), "unit_shape": list(layer.unit_shape),
                     "never_on_fraction": float(never_on.double().mean()),
                     "live_mean": float(live.mean()) if live.numel() else math.nan,
                     "max_bits": int(seen.sum())}
    return out


def classwise_layer(model: nn.Module, layers: Iterable[str]) -> str:
    """The layer whose class-wise matrix is plotted: the widest hidden Linear among ``layers``
    (LeNet-5's fc1, 500 × 10, as in the official notebook), else the last hidden layer, else the
    classifier."""
    layers = list(layers)
    if not layers:
        raise ValueError("Invalid layers: [] (expected at least one analysed layer)")
    modules = dict(model.named_modules())
    head = models.classifier_name(model) if any(
        isinstance(m, nn.Linear) for m in modules.values()) else None
    hidden = [n for n in layers if n != head]
    linear = [n for n in hidden if isinstance(modules.get(n), nn.Linear)]
    if linear:
        return max(linear, key=lambda n: modules[n].out_features)
    return hidden[-1] if hidden else layers[-1]


# -- linear probe ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeResult:
    """Accuracies (%) of a linear classifier trained on frozen features."""

    train_accuracy: float
    test_accuracy: float
    features: int
    train_samples: int
    test_samples: int


@torch.no_grad()
def extract_features(model: nn.Module, loader: Iterable,
                     layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of module ``layer`` (default the classifier head, i.e. the penultimate features
    after their nonlinearity), flattened per sample, and the labels, over ``loader``."""
    modules = dict(model.named_modules())
    if layer is None:
        layer = models.classifier_name(model)
    elif layer not in modules or layer == "":
        raise ValueError(f"Invalid layer: {layer!r} is not a module of the model "
                         f"(valid: {[n for n in modules if n]})")
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(args[0].detach().flatten(1).float().cpu())

    features, labels = [], []
    device = _device(model)
    handle = modules[layer].register_forward_hook(hook)
    try:
        with _Evaluating(model):
            for batch in loader:
                inputs, y = _pair(batch)
                model(inputs.to(device))
                features.append(captured.pop())
                labels.append(y.cpu().to(torch.int64))
    finally:
        handle.remove()
    if not labels:
        raise ValueError("Invalid loader: it yielded no samples")
    return torch.cat(features), torch.cat(labels)


def linear_probe(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    epochs: int = 10,
    lr: float = 0.01,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
    layer: str | None = None,
) -> ProbeResult:
    """Train a linear classifier (softmax regression) on the frozen features of ``model``
    (see :func:`extract_features`) and report its accuracy on ``test_loader``.

    Features are standardized with the training mean and std (constant features, e.g. of dead
    neurons, become 0). The classifier starts at zero and trains with Adam on minibatches whose
    order comes from a generator seeded by ``seed``, so the probe is deterministic. C is
    1 + the largest training label. The model is not changed.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"Invalid epochs: {epochs!r} (expected an int >= 1)")
    if not lr > 0:
        raise ValueError(f"Invalid lr: {lr} (expected > 0)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Invalid batch_size: {batch_size!r} (expected an int >= 1)")
    if not weight_decay >= 0:
        raise ValueError(f"Invalid weight_decay: {weight_decay} (expected >= 0)")
    x_train, y_train = extract_features(model, train_loader, layer)
    x_test, y_test = extract_features(model, test_loader, layer)
    num_classes = int(y_train.max()) + 1
    if int(y_test.max()) >= num_classes or int(min(y_train.min(), y_test.min())) < 0:
        raise ValueError(f"Invalid labels: test labels span [{int(y_test.min())}, "
                         f"{int(y_test.max())}] (expected within the training classes "
                         f"[0, {num_classes - 1}])")
    mean = x_train.mean(dim=0)
    std = x_train.std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    head = nn.Linear(x_train.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(len(y_train), generator=generator).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(head(x_train[index]), y_train[index]).backward()
            optimizer.step()
    with torch.no_grad():
        train_accuracy = 100.0 * (head(x_train).argmax(1) == y_train).double().mean().item()
        test_accuracy = 100.0 * (head(x_test).argmax(1) == y_test).double().mean().item()
    return ProbeResult(train_accuracy, test_accuracy, int(x_train.shape[1]), len(y_train),
                       len(y_test))


# -- the command -------------------------------------------------------------------------------
def split_loader(config: Config, split: str, data_root: str | None = None,
                 limit: int | None = None, dataset: str | None = None) -> nwdata.TensorLoader:
    """An unshuffled loader over ``split`` of the config's dataset (or ``dataset``); ``limit``
    keeps the first samples."""
    name = dataset or config.data.name
    root = nwdata.resolve_root(data_root or config.data.root)
    samples = nwdata.load(name, split=split, root=root)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"Invalid limit: {limit} (expected >= 1)")
        samples = samples.subset(torch.arange(min(limit, len(samples))))
    return nwdata.TensorLoader(samples, batch_size=config.data.eval_batch_size)


def analyze_run(
    run_dir: str | Path,
    entropy: bool = True,
    sharpness: bool = False,
    checkpoint: str = "last",
    data_root: str | None = None,
    layers: Sequence[str] | None = None,
    limit: int | None = None,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    draws: int = 10,
    seed: int = 0,
) -> str:
    """Analyse a run's model on its test set; write ``RUN/analysis/``: ``analysis.json`` and
    ``entropy_hist.png``, ``entropy_classwise.png`` (with ``entropy``), ``landscape.png``
    (with ``sharpness``). Returns the lines to print."""
    if not (entropy or sharpness):
        entropy = True
    config, model, _ = load_run_model(run_dir, checkpoint)
    loader = split_loader(config, "test", data_root, limit)
    result = analyze_model(model, loader, entropy=entropy, sharpness=sharpness, layers=layers,
                           sigmas=sigmas, draws=draws, seed=seed)
    out = RunDir(run_dir).path / "analysis"
    summary = {"run_dir": str(run_dir), "checkpoint": checkpoint, "split": "test",
               "seed": seed, **result.summary()}
    lines = [f"analysis written: {out}",
             (f"  test loss {result.loss:.4f}, error {100 - result.accuracy:.2f}% "
             f"over {result.samples:,} samples ({checkpoint} checkpoint)")]
    if result.entropy is not None:
        atomic_write_bytes(out / "entropy_hist.png",
                           entropy_histograms_png({"model": result.entropy}))
        name = classwise_layer(model, result.entropy)
        summary["classwise_layer"] = name
        atomic_write_bytes(out / "entropy_classwise.png",
                           classwise_png({"model": result.entropy[name]}, name))
        lines += [f"  {n:<24} mean H {r.mean:.4f} bits over {r.per_unit.numel():,} units"
                  for n, r in result.entropy.items()]
    if result.sharpness is not None:
        atomic_write_bytes(out / "landscape.png", landscape_png(
            {"model": result.landscape}, "random filter-normalized direction", "α"))
        lines += [f"  sharpness σ={s}: loss +{m:.4f} (std {'n/a' if math.isnan(d) else f'{d:.4f}'})"
                  for s, m, d in zip(result.sharpness.sigmas, result.sharpness.mean,
                                     result.sharpness.std)]
    summary = _merge_previous(out, summary)
    atomic_write_text(out / "analysis.json", json.dumps(summary, indent=2) + "\n")
    return "\n".join(lines)


# What each kind of analysis adds to analysis.json, and the plots that show it.
_PARTS = {"entropy": (("psp_entropy_bits", "classwise_layer"),
                      ("entropy_hist.png", "entropy_classwise.png")),
          "sharpness": (("sharpness", "landscape"), ("landscape.png",))}


def _merge_previous(out: Path, summary: dict) -> dict:
    """Keep the analyses of an earlier ``analyze`` (e.g. ``--sharpness``, then ``--entropy``) of
    the same model on the same data (same checkpoint, seed, samples, and test loss to the bit);
    for another model or data, drop them, and their plots with them."""
    try:
        previous = json.loads((out / "analysis.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = {}
    same = isinstance(previous, dict) and all(
        previous.get(key) == summary[key] for key in ("checkpoint", "split", "seed", "samples",
                                                       "loss"))
    for keys, plots in _PARTS.values():
        if keys[0] in summary:
            continue
        if same and keys[0] in previous:
            summary.update({k: previous[k] for k in keys if k in previous})
        else:
            for plot in plots:
                (out / plot).unlink(missing_ok=True)
    return summary
