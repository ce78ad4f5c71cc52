"""The method registry: a method defined in this file runs through `neuronwise run`, `--resume`
and `neuronwise report` like a built-in one; the trainer and the report name no method; the
experiment layer has no import cycle."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
import torch
from torch import nn

import neuronwise as nw
from neuronwise.experiment import config as cfg
from neuronwise.experiment import methods
from neuronwise.experiment.cli import main
from neuronwise.experiment.methods import MethodCallback, MethodContext, Metric, registry
from neuronwise.experiment.schema import setting

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "src" / "neuronwise" / "experiment"


# ------------------------------------------------------------------ a method of this test file
@dataclass
class TaylorConfig:
    fraction: float = setting(0.25, "share of the surviving weights removed per epoch",
                              bounds="in [0, 1]")


class TaylorPruning(MethodCallback):
    """Each epoch removes the ``fraction`` of surviving Linear weights with the smallest
    first-order Taylor importance Σ_steps |w·∂L/∂w| (accumulated in ``after_backward``)."""

    metrics = (Metric("taylor_pruned_percent", "Linear weights removed by Taylor pruning (%)",
                      plot="line", file="taylor.png", summary="mean",
                      summary_label="mean Taylor-pruned weights", unit="%",
                      console="taylor {taylor_pruned_percent:.1f}%"),)

    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.fraction = fraction

    @classmethod
    def from_config(cls, config: TaylorConfig, regularizer=None) -> TaylorPruning:
        return cls(config.fraction)

    def setup(self, context: MethodContext) -> None:
        super().setup(context)
        self.method = nw.ParameterMask(context.model, (nn.Linear,))
        self.weights = [p for p in self.method.params if p.dim() == 2]
        self.importance = [torch.zeros_like(w) for w in self.weights]

    def after_backward(self) -> None:
        for score, weight in zip(self.importance, self.weights):
            score += (weight.detach() * weight.grad).abs()

    def after_optimizer_step(self) -> None:
        self.method.apply()

    def on_epoch_end(self, record: dict) -> None:
        alive = torch.cat([(w != 0).flatten() for w in self.weights])
        scores = torch.cat([s.flatten() for s in self.importance])
        count = int(self.fraction * int(alive.sum()))
        order = torch.argsort(torch.where(alive, scores, torch.inf), stable=True)[:count]
        keep = torch.ones_like(alive)
        keep[order] = False
        start = 0
        with torch.no_grad():
            for weight in self.weights:
                weight.mul_(keep[start:start + weight.numel()].view_as(weight))
                start += weight.numel()
        self.method.update()
        for score in self.importance:
            score.zero_()
        zeros = sum(int((w == 0).sum()) for w in self.weights)
        record["taylor_pruned_percent"] = 100.0 * zeros / sum(w.numel() for w in self.weights)

    def state_dict(self) -> dict:
        return {"mask": self.method.state_dict(), "importance": self.importance}

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state["mask"])
        for score, saved in zip(self.importance, state["importance"]):
            score.copy_(saved)


@pytest.fixture
def taylor():
    methods.register("taylor", TaylorPruning, config=TaylorConfig)
    yield
    methods.unregister("taylor")


def _config(tmp_path, fraction=0.25) -> Path:
    path = tmp_path / "taylor.yaml"
    path.write_text(
        "name: taylor\ndata: {name: digits, val_fraction: 0.1, batch_size: 64}\n"
        "model: {name: mlp}\noptim: {name: sgd, lr: 0.1, momentum: 0.9}\n"
        f"method: taylor\ntaylor: {{fraction: {fraction}}}\ntrain: {{epochs: 3, seed: 0}}\n")
    return path


def _records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in records]


def test_a_method_registered_here_runs_resumes_and_reports(tmp_path, taylor, capsys):
    config = _config(tmp_path)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["run", str(config), "--run-dir", str(straight)]) == 0
    assert "taylor 25.0%" in capsys.readouterr().out  # the declared console format
    assert main(["run", str(config), "--run-dir", str(resumed), "--set", "train.epochs=2"]) == 0
    assert main(["run", "--run-dir", str(resumed), "--resume", "--set", "train.epochs=3"]) == 0
    assert _records(resumed) == _records(straight)  # resumed exactly, importance included

    # Independent expectation: each epoch removes int(0.25·survivors) of the Linear weights.
    model = cfg.load(config)
    assert model.method == "taylor" and model.taylor.fraction == 0.25
    weights = torch.load(straight / "last.pt", weights_only=True)["model"]
    total = sum(v.numel() for k, v in weights.items() if k.endswith("weight") and v.dim() == 2)
    alive, expected = total, []
    for _ in range(3):
        alive -= int(0.25 * alive)
        expected.append(100.0 * (total - alive) / total)
    assert [r["taylor_pruned_percent"] for r in _records(straight)] == pytest.approx(expected)
    zeros = sum(int((v == 0).sum()) for k, v in weights.items()
                if k.endswith("weight") and v.dim() == 2)
    assert zeros == total - alive  # the mask held through the optimizer's momentum

    assert main(["report", str(straight)]) == 0
    report = (straight / "report.md").read_text()
    assert "(taylor.png)" in report and (straight / "taylor.png").read_bytes()[:4] == b"\x89PNG"
    mean = sum(expected) / 3
    assert f"| mean Taylor-pruned weights | {mean:.2f}% |" in report


def test_a_registered_section_is_validated_like_the_others(tmp_path, taylor):
    with pytest.raises(cfg.ConfigError, match=r"taylor.fraction: expected a fraction in \[0, 1\]"):
        cfg.load(_config(tmp_path, fraction=2))
    with pytest.raises(cfg.ConfigError, match=r"unknown key 'taylor.fractoin'"):
        cfg.from_dict({"method": "taylor", "taylor": {"fractoin": 0.1}})
    assert cfg.from_dict({}).taylor == TaylorConfig()


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(cfg.ConfigError, match=r"method: expected one of \['none', 'lobster', "
                                              r"'serene', 'neq', 'finetune'\], got 'taylor'"):
        cfg.from_dict({"method": "taylor"})
    with pytest.raises(cfg.ConfigError, match=r"pruning.schedule: expected one of \['none', "
                                              r"'plateau', 'oneshot', 'iterative', 'gradual'\]"):
        cfg.from_dict({"pruning": {"schedule": "random"}})


def _register_taylor() -> None:
    methods.register("taylor", TaylorPruning, config=TaylorConfig)


def test_entry_points_register_when_the_registry_is_first_read(monkeypatch):
    point = metadata.EntryPoint("taylor", f"{__name__}:_register_taylor", methods.ENTRY_POINT_GROUP)
    groups = {methods.ENTRY_POINT_GROUP: [point]}
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: groups.get(group, []))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert methods.names("method")[-1] == "taylor"
        assert cfg.from_dict({"method": "taylor"}).taylor == TaylorConfig()
    finally:
        methods.unregister("taylor")


def test_registration_is_checked():
    with pytest.raises(TypeError, match="expected a MethodCallback subclass"):
        methods.register("bad", object)
    with pytest.raises(ValueError, match="already registered"):
        methods.register("lobster", TaylorPruning, config=TaylorConfig)
    with pytest.raises(ValueError, match="expected an identifier"):
        methods.register("none", TaylorPruning)
    with pytest.raises(ValueError, match="a top-level config key"):
        methods.register("train", TaylorPruning, config=TaylorConfig)
    assert set(registry.RESERVED) == {f.name for f in dataclasses.fields(cfg.Config)}


def test_callbacks_are_built_in_loop_order_and_share_the_mask():
    config = cfg.from_dict({"method": "serene", "pruning": {"schedule": "plateau"}})
    regularizer, schedule = methods.build_callbacks(config)
    assert (regularizer.name, schedule.name) == ("serene", "pruning")
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    context = MethodContext(model, [optimizer], torch.device("cpu"), torch.zeros(1, 4),
                            validation_loss=lambda: 1.0)
    regularizer.setup(context)
    schedule.setup(context)
    assert schedule.method.mask is regularizer.method.mask
    assert schedule.modules == (nn.Linear, nn.Conv2d)  # SeReNe's, not the default set


# ------------------------------------------------------------------ the layer stays method-free
def test_trainer_and_report_name_no_method():
    words = {r.name for r in methods.registrations()} | {
        "frozen", "velocity", "pruned", "pruning", "threshold", "magnitude"}
    for name in ("trainer.py", "report.py", "records.py"):
        text = (EXPERIMENT / name).read_text(encoding="utf-8").lower()
        found = sorted(w for w in words if re.search(rf"\b{re.escape(w)}\b", text))
        assert not found, f"{name} names {found}"


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports at run time, at any depth of the file (lazy
    imports inside functions too; ``if TYPE_CHECKING:`` blocks are for annotations only)."""
    module = package + "." + ".".join(path.relative_to(EXPERIMENT).with_suffix("").parts)
    module = module.removesuffix(".__init__")
    base = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                origin = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{origin}.{node.module}" if node.module else origin
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            found |= {target, *names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith(package)}


def test_the_experiment_layer_has_no_import_cycle():
    package = "neuronwise.experiment"
    files = {}
    for path in EXPERIMENT.rglob("*.py"):
        name = package + "." + ".".join(path.relative_to(EXPERIMENT).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = path
    # A module importing the package it belongs to (its __init__) is how a package is built.
    graph = {name: {m for m in _imports(path, package)
                    if m in files and m != name and not name.startswith(m + ".")}
             for name, path in files.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("schedule", ["plateau", "oneshot", "iterative", "gradual"])
def test_the_pruning_importance_reaches_every_schedule(schedule):
    config = cfg.from_dict({"pruning": {"schedule": schedule, "importance": "taylor"}})
    (callback,) = methods.build_callbacks(config)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    callback.setup(MethodContext(model, [torch.optim.SGD(model.parameters(), lr=0.1)],
                                 torch.device("cpu"), torch.zeros(1, 4), lambda: 1.0))
    chosen = callback.method.importance if callback.method is not None else callback.importance
    assert chosen is nw.pruning.get_importance("taylor")
    with pytest.raises(cfg.ConfigError, match=r"pruning.importance: expected one of \[.*'taylor'"):
        cfg.from_dict({"pruning": {"importance": "random"}})
