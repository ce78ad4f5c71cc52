"""The CLI end to end on the embedded digits data: runs, resume, reports, and bad input."""

import json
import subprocess
import sys

import pytest
import torch

from neuronwise.experiment.cli import main

QUICK = ["--set", "train.epochs=2", "--set", "data.batch_size=64"]


def run_cli(*argv):
    return main([str(a) for a in argv])


def files_snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_quickstart_writes_a_complete_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("quickstart", "--run-dir", run, *QUICK) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and str(run) in out
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "run_info.json"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    state = torch.load(run / "best.pt", weights_only=True)
    assert "model" in state
    assert run_cli("report", run) == 0
    assert (run / "report.md").read_text().startswith("# Report")
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in (run / "report.html").read_text()


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("quickstart", "--run-dir", run, *QUICK) == 0
    before = files_snapshot(run)
    capsys.readouterr()
    assert run_cli("quickstart", "--run-dir", run, *QUICK) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds a run" in err and "--resume" in err
    assert run_cli("quickstart", "--run-dir", run, "--resume", *QUICK, "--set", "optim.lr=0.5") == 2
    assert "belongs to another config (differs in optim.lr)" in capsys.readouterr().err
    assert files_snapshot(run) == before
    # How this machine computes is not part of the run: threads and checkpoint spacing may change.
    assert run_cli("quickstart", "--run-dir", run, "--resume", *QUICK, "--set", "train.threads=1",
                   "--set", "train.checkpoint_every=3", "--set", "train.epochs=4") == 0


def test_resume_continues_exactly(tmp_path):
    """2 epochs + resume to 4 gives the same weights and metrics as 4 epochs in one go."""
    settings = ["--set", "data.batch_size=64", "--set", "optim.momentum=0.9"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_cli("quickstart", "--run-dir", whole, *settings, "--set", "train.epochs=4") == 0
    assert run_cli("quickstart", "--run-dir", split, *settings, "--set", "train.epochs=2") == 0
    assert run_cli("quickstart", "--run-dir", split, "--resume", *settings,
                   "--set", "train.epochs=4") == 0
    a = torch.load(whole / "last.pt", weights_only=True)
    b = torch.load(split / "last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key

    def strip(path):
        records = [json.loads(x) for x in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in records]

    assert strip(whole / "metrics.jsonl") == strip(split / "metrics.jsonl")
    # The run's record follows the resumed length: both config.yaml files now say 4 epochs.
    assert (whole / "config.yaml").read_text() == (split / "config.yaml").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["quickstart", "--set", "model.name=lenet9000"], "lenet9000"),
        (["quickstart", "--set", "data.name=imagenet21k"], "imagenet21k"),
        (["quickstart", "--set", "optim.name=lbfgs"], "optim.name"),
        (["quickstart", "--set", "train.epochz=1"], "did you mean 'epochs'"),
        (["run", "missing.yaml"], "config file not found"),
        (["report", "no/such/run"], "run directory not found"),
        (["quickstart", "--resume"], "--resume needs --run-dir"),
    ],
)
def test_user_mistakes_give_one_line_and_exit_2(tmp_path, capsys, argv, message):
    if "--resume" not in argv and argv[0] == "quickstart":
        argv = argv + ["--run-dir", str(tmp_path / "r")]
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and "Traceback" not in err


def test_missing_real_data_is_a_clear_error(tmp_path, capsys):
    code = run_cli("quickstart", "--run-dir", tmp_path / "r", "--set", "data.name=mnist",
                   "--set", "model.name=lenet300", "--data-root", tmp_path / "empty")
    assert code == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and err.strip().count("\n") == 0


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert run_cli("quickstart", "--run-dir", run, *QUICK) == 0
    good = (run / "last.pt").read_bytes()
    from neuronwise.experiment import trainer

    monkeypatch.setattr(trainer.F, "cross_entropy", lambda *a, **k: torch.tensor(float("nan")))
    code = run_cli("quickstart", "--run-dir", run, "--resume", "--set", "data.batch_size=64",
                   "--set", "train.epochs=3")
    assert code == 1
    assert "not finite" in capsys.readouterr().err
    assert (run / "last.pt").read_bytes() == good


def test_python_dash_m_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "neuronwise", "--help"], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0 and "quickstart" in result.stdout


@pytest.mark.parametrize(
    "settings",
    [
        ["method=neq", "neq.val_size=0.05"],
        ["method=none", "pruning.schedule=oneshot", "pruning.sparsity=0.5"],
        ["method=none", "pruning.schedule=iterative", "pruning.fraction=0.3"],
        ["method=none", "pruning.schedule=gradual", "pruning.end_epoch=2"],
    ],
    ids=["neq", "oneshot", "iterative", "gradual"],
)
def test_every_method_runs_and_resumes_exactly(tmp_path, settings):
    flags = ["--set", "data.batch_size=128"] + [x for s in settings for x in ("--set", s)]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_cli("quickstart", "--run-dir", whole, *flags, "--set", "train.epochs=3") == 0
    assert run_cli("quickstart", "--run-dir", split, *flags, "--set", "train.epochs=2") == 0
    assert run_cli("quickstart", "--run-dir", split, "--resume", *flags,
                   "--set", "train.epochs=3") == 0
    a = torch.load(whole / "last.pt", weights_only=True)
    b = torch.load(split / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    records = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    if "method=neq" in settings:
        assert all("frozen_percent" in r and "backward_flops" in r for r in records)
    if any("sparsity" in s or "schedule=iterative" in s for s in settings):
        assert records[-1]["remaining_percent_paper"] < 100.0


def test_serene_run_then_simplify_and_export(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    flags = ["--set", "method=serene", "--set", "serene.lam=0.05", "--set", "pruning.patience=0",
             "--set", "pruning.granularity=neurons", "--set", "data.batch_size=128"]
    assert run_cli("quickstart", "--run-dir", run, *flags, "--set", "train.epochs=3") == 0
    capsys.readouterr()
    assert run_cli("simplify", run, "--export", tmp_path / "model.onnx", "--explain") == 0
    out = capsys.readouterr().out
    explained = out[out.index("dead neurons kept by simplify: "):].splitlines()
    # Every listed layer line names the blocking node and its reason.
    assert all(" blocked by " in line for line in explained[1:])
    assert all(("by output:" in line) == ("model output" in line) for line in explained[1:])
    assert "latency batch 256" in out and (tmp_path / "model.onnx").stat().st_size > 0
    summary = json.loads((run / "simplify.json").read_text())
    assert summary["simplified"]["params_all"] <= summary["dense"]["params_all"]
    assert summary["max_abs_output_difference"] < 1e-4
    per_layer = summary["neurons_per_layer"]
    assert sum(n["alive"] for n in per_layer.values()) == summary["dense"]["neurons_alive"]
    assert sum(n["total"] for n in per_layer.values()) == summary["dense"]["neurons_total"]
    assert "alive neurons per layer" in out
    from neuronwise.simplify import load_simplified

    small = load_simplified(run / "simplified.pt")
    x = torch.randn(4, 1, 8, 8)
    assert small(x).shape == (4, 10)


def test_datasets_command_reports_verified_and_missing_files(tmp_path, capsys, real_data_root):
    assert run_cli("datasets", "--data-root", real_data_root) == 0
    lines = capsys.readouterr().out.splitlines()
    mnist = [line for line in lines if line.startswith("mnist ")]
    assert len(mnist) == 4 and all(" verified " in line for line in mnist)
    assert run_cli("datasets", "--data-root", tmp_path) == 0
    empty = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mnist ")]
    assert len(empty) == 4 and all(" missing " in line for line in empty)
