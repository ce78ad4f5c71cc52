"""``neuronwise analyze`` and the analysis helpers: numbers against plain computations, plots,
the linear probe, and bad input (no labels, unknown layers, no classifier)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuronwise import data as nwdata
from neuronwise import models
from neuronwise.experiment.analysis import (
    analyze_model,
    classwise_layer,
    entropy_summary,
    extract_features,
    linear_probe,
)
from neuronwise.experiment.cli import main
from neuronwise.experiment.tools import load_run_model

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("analysis") / "run"
    assert main(["quickstart", "--run-dir", str(run), "--set", "train.epochs=2",
                 "--set", "data.batch_size=64"]) == 0
    return run


def digits_test() -> tuple[torch.Tensor, torch.Tensor]:
    test = nwdata.load("digits", split="test")
    return test.images, test.labels


def plain_mean_entropy(z: torch.Tensor, y: torch.Tensor, classes: int) -> float:
    """mean_u Σ_c h(clamp(p_c(u))) written out with loops over classes (METHODS.md §6)."""
    total = torch.zeros(z.shape[1], dtype=torch.float64)
    for c in range(classes):
        rows = z[y == c]
        if len(rows) == 0:
            continue
        p = (rows > 0).double().mean(dim=0)
        q = 1 - p
        p, q = p.clamp(1e-4, 0.9999), q.clamp(1e-4, 0.9999)
        total += -(p * torch.log2(p) + q * torch.log2(q))
    return float(total.mean())


def test_analyze_command_matches_plain_computations(run_dir, capsys):
    assert main(["analyze", str(run_dir), "--entropy", "--sharpness", "--draws", "2"]) == 0
    out = capsys.readouterr().out
    folder = run_dir / "analysis"
    assert str(folder) in out and "sharpness σ=0.1" in out
    for name in ("entropy_hist.png", "entropy_classwise.png", "landscape.png"):
        assert (folder / name).read_bytes()[:4] == PNG, name
    summary = json.loads((folder / "analysis.json").read_text())

    _, model, _ = load_run_model(run_dir)
    x, y = digits_test()
    with torch.no_grad():
        hidden = model.features[0](model.flatten(x))
        logits = model(x)
    assert summary["samples"] == len(y) == 360
    assert summary["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    accuracy = 100.0 * (logits.argmax(1) == y).double().mean().item()
    assert summary["error"] == pytest.approx(100.0 - accuracy)
    bits = summary["psp_entropy_bits"]
    assert list(bits) == ["features.0", "features.2", "classifier"]
    assert bits["features.0"]["mean"] == pytest.approx(plain_mean_entropy(hidden, y, 10), rel=1e-12)
    assert bits["classifier"]["mean"] == pytest.approx(plain_mean_entropy(logits, y, 10), rel=1e-12)
    assert bits["features.0"]["units"] == 128 and bits["features.0"]["max_bits"] == 10
    assert summary["classwise_layer"] == "features.0"  # the widest hidden Linear

    s = summary["sharpness"]
    assert s["sigmas"] == [0.01, 0.05, 0.1] and s["draws"] == 2
    assert s["base_loss"] == pytest.approx(summary["loss"], rel=1e-9)
    alphas, losses = summary["landscape"]["alphas"], summary["landscape"]["losses"]
    assert len(alphas) == 21 and alphas[0] == -1.0 and alphas[-1] == 1.0
    # α = 0 is the model itself.
    assert losses[alphas.index(min(alphas, key=abs))] == pytest.approx(summary["loss"], rel=1e-6)


def test_analyze_layers_flag_and_unknown_layer(run_dir, capsys):
    assert main(["analyze", str(run_dir), "--layers", "classifier", "--limit", "100"]) == 0
    summary = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    assert list(summary["psp_entropy_bits"]) == ["classifier"] and summary["samples"] == 100
    assert "sharpness" not in summary
    capsys.readouterr()
    assert main(["analyze", str(run_dir), "--layers", "fc9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fc9" in err and "features.0" in err


def test_analysis_leaves_the_model_as_it_was():
    model = models.create("lenet300", image_size=8)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = digits_test()
    result = analyze_model(model, [(x[:200], y[:200]), (x[200:], y[200:])], sharpness=True,
                           draws=2, landscape_points=3)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.samples == 360 and set(result.entropy) == {"fc1", "fc2", "classifier"}
    assert result.landscape.alphas.tolist() == [-1.0, 0.0, 1.0]


class Pairs:
    """A loader over fixed batches (re-iterable)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.parametrize("batches, message", [
    ([torch.zeros(4, 1, 8, 8)], "a batch is a Tensor"),
    ([[torch.zeros(4, 1, 8, 8)]], "list of 1 Tensor"),
    ([(torch.zeros(4, 1, 8, 8), torch.zeros(4, 10))], "expected 1-D integer class indices"),
])
def test_loader_without_labels_is_a_clear_error(batches, message):
    model = models.create("mlp", image_size=8)
    with pytest.raises(TypeError, match="Invalid loader") as error:
        analyze_model(model, Pairs(batches))
    assert message in str(error.value)
    with pytest.raises(TypeError, match=message):
        extract_features(model, Pairs(batches))


def test_missing_layers_are_a_clear_error():
    model = models.create("mlp", image_size=8)
    loader = Pairs([digits_test()])
    with pytest.raises(ValueError, match=r"\['fc1'\] are not Linear/Conv2d modules.*features\.0"):
        analyze_model(model, loader, layers=["fc1"])
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        analyze_model(nn.Sequential(nn.Flatten()), loader)
    with pytest.raises(ValueError, match="has no nn.Linear classifier"):
        extract_features(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), loader)
    with pytest.raises(ValueError, match="'head' is not a module"):
        extract_features(model, loader, layer="head")
    with pytest.raises(ValueError, match="Invalid epochs: 0"):
        linear_probe(model, loader, loader, epochs=0)


def test_never_on_fraction_counts_dead_units():
    layer = nn.Linear(3, 4)
    with torch.no_grad():
        layer.weight[1].zero_()
        layer.bias[1] = -1.0  # unit 1 outputs -1 for every input: never on
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    y = torch.arange(64) % 2
    summary = entropy_summary(analyze_model(model, [(x, y)]).entropy)
    assert summary["0"]["never_on_fraction"] == 0.25
    # A dead unit sits at the floor: C·h(1e-4) bits.
    floor = -2 * (1e-4 * math.log2(1e-4) + 0.9999 * math.log2(0.9999))
    assert summary["0"]["units"] == 4 and summary["0"]["max_bits"] == 2
    per_unit = analyze_model(model, [(x, y)]).entropy["0"].per_unit
    assert per_unit[1].item() == pytest.approx(floor)
    # The live mean leaves the dead unit out: (H0 + H2 + H3) / 3, and the layer mean is
    # (3 · live mean + floor) / 4.
    live = (per_unit[0] + per_unit[2] + per_unit[3]).item() / 3
    assert summary["0"]["live_mean"] == pytest.approx(live)
    assert summary["0"]["mean"] == pytest.approx((3 * live + floor) / 4)


def test_live_mean_is_nan_when_every_unit_is_dead():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.fill_(-1.0)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    summary = entropy_summary(analyze_model(layer, [(x, torch.arange(8) % 2)]).entropy)
    assert summary[""]["never_on_fraction"] == 1.0 and math.isnan(summary[""]["live_mean"])


def test_classwise_layer_is_the_widest_hidden_linear():
    assert classwise_layer(models.create("lenet5"), ["conv1", "conv2", "fc1", "classifier"]) == "fc1"
    assert classwise_layer(models.create("lenet300"), ["fc1", "fc2", "classifier"]) == "fc1"
    assert classwise_layer(models.create("lenet5"), ["conv1", "conv2"]) == "conv2"
    assert classwise_layer(models.create("lenet5"), ["classifier"]) == "classifier"


def selector_model(coordinate: int, head_seed: int) -> nn.Sequential:
    """Features = input coordinate ``coordinate`` (exactly); the head is random and irrelevant."""
    select = nn.Linear(2, 1)
    head = nn.Linear(1, 2)
    with torch.no_grad():
        select.weight.zero_()
        select.weight[0, coordinate] = 1.0
        select.bias.zero_()
        generator = torch.Generator().manual_seed(head_seed)
        head.weight.copy_(torch.randn(2, 1, generator=generator))
    return nn.Sequential(select, head)


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 2, generator=generator)
    x[:, 0] = 4.0 * y - 2.0 + 0.3 * x[:, 0]  # coordinate 0 separates the classes; 1 is noise
    return x, y


def test_linear_probe_reads_the_classifier_input():
    train, test = blobs(400, 0), blobs(200, 1)
    informative = selector_model(0, head_seed=0)
    features, labels = extract_features(informative, [train])
    assert torch.equal(features, train[0][:, :1]) and torch.equal(labels, train[1])
    before = {k: v.clone() for k, v in informative.state_dict().items()}
    result = linear_probe(informative, [train], [test], epochs=5, lr=0.1, batch_size=100)
    assert result.test_accuracy == 100.0 and result.features == 1
    assert (result.train_samples, result.test_samples) == (400, 200)
    assert all(torch.equal(before[k], v) for k, v in informative.state_dict().items())
    # Another head on the same features: the same probe, bit for bit.
    again = linear_probe(selector_model(0, head_seed=1), [train], [test], epochs=5, lr=0.1,
                         batch_size=100)
    assert again == result
    noise = linear_probe(selector_model(1, head_seed=0), [train], [test], epochs=5, lr=0.1,
                         batch_size=100)
    assert noise.test_accuracy < 70.0


def test_linear_probe_transfers_mnist_features_to_fashion(real_data_root):
    from neuronwise.experiment.analysis import split_loader
    from neuronwise.experiment.config import from_dict

    config = from_dict({"data": {"name": "mnist", "root": str(real_data_root)}})
    train = split_loader(config, "train", limit=2000, dataset="fashion-mnist")
    test = split_loader(config, "test", limit=1000, dataset="fashion-mnist")
    result = linear_probe(models.create("lenet300"), train, test, epochs=5)
    # Random LeNet-300 features: far above chance (10 %) when images and labels stay paired.
    assert result.test_accuracy > 50.0 and result.features == 100
