"""Config schema: defaults, YAML loading, overrides, and one-line errors for every bad input."""

from pathlib import Path

import pytest

from neuronwise.experiment import config as cfg

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid():
    c = cfg.from_dict({})
    assert c.optim.lr == 0.1 and c.method == "none" and c.pruning.schedule == "none"


@pytest.mark.parametrize(
    "path",
    # Study and comparison configs have their own schemas (tests/test_study.py, test_compare.py).
    sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name not in ("study", "compare")),
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_shipped_configs_load(path):
    config = cfg.load(path)
    assert config.name


def test_nested_values_and_float_text(tmp_path):
    c = cfg.load(write(tmp_path, "method: lobster\nlobster: {lam: 1e-4}\ntrain: {epochs: 3}\n"))
    assert c.lobster.lam == pytest.approx(1e-4) and c.train.epochs == 3


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "train: {epochs: 3}\n")
    c = cfg.load(path, ["train.epochs=7", "optim.lr=1e-3", "data.augment=cifar"])
    assert (c.train.epochs, c.optim.lr, c.data.augment) == (7, 1e-3, "cifar")
    with pytest.raises(cfg.ConfigError, match="train.epochs: expected an integer"):
        cfg.load(path, ["train.epochs=many"])
    with pytest.raises(cfg.ConfigError, match="expected KEY=VALUE"):
        cfg.load(path, ["train.epochs"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {epoch: 3}\n", r"unknown key 'train.epoch' \(did you mean 'epochs'\?\)"),
        ("optim: {name: rmsprop}\n", r"optim.name: expected one of \['sgd', 'adam', 'adamw'\]"),
        ("optim: {lr: -1}\n", r"optim.lr: expected a value >= 0, got -1.0"),
        ("data: {batch_size: 0}\n", r"data.batch_size: expected a value > 0"),
        ("data: {val_fraction: 1.5}\n", r"data.val_fraction: expected a fraction in \[0, 1\]"),
        ("train: 3\n", r"train: expected a mapping, got 3 \(int\)"),
        ("optim: {nesterov: 1}\n", r"optim.nesterov: expected true or false"),
        ("- a\n- b\n", r"expected a mapping at the top level, got list"),
        ("train: {epochs: [\n", r"line \d+, column \d+: YAML syntax error"),
        ("pruning: {schedule: plateau}\ndata: {val_fraction: 0}\n", r"data.val_fraction is 0"),
    ],
)
def test_bad_configs_give_one_line_errors(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(cfg.ConfigError, match=message) as info:
        cfg.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(cfg.ConfigError, match="config file not found"):
        cfg.load(tmp_path / "nope.yaml")


def test_dump_round_trip(tmp_path):
    c = cfg.from_dict({"method": "neq", "neq": {"eps": 0.01}, "schedule": {"milestones": [5, 9]}})
    again = cfg.load(write(tmp_path, cfg.dump(c)))
    assert again == c
