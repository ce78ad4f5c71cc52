"""What a resumed run continues with, resuming from nothing, and the messages and leftovers of
mistakes on the command line (the run itself is checked bit for bit in test_reliability.py)."""

import json

import pytest
from test_reliability import QUICK

from neuronwise.experiment.cli import main, quickstart_config_path


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def files(run) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


def one_line(err: str) -> str:
    assert err.startswith("neuronwise: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_a_resume_continues_the_recorded_run_and_only_set_values_change_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "quickstart", "--run-dir", run, *QUICK, "--set", "train.epochs=2")[0] == 0
    recorded = files(run)

    import yaml

    default = yaml.safe_load(quickstart_config_path().read_text())["train"]["epochs"]
    # Neither the quickstart's own config nor a CONFIG file takes the run back to its epochs.
    for argv in (["run", "--run-dir", run, "--resume"],
                 ["quickstart", "--run-dir", run, "--resume"],
                 ["run", quickstart_config_path(), "--run-dir", run, "--resume", *QUICK]):
        code, out, _ = cli(capsys, *argv)
        assert code == 0
        assert f"nothing to do: the run in {run} has already finished its 2 epochs" in out
    assert f"quickstart.yaml sets train.epochs={default}; the resumed run keeps its recorded 2" in out
    assert files(run) == recorded

    code, out, _ = cli(capsys, "run", "--run-dir", run, "--resume", "--set", "train.epochs=3")
    assert code == 0 and "resumed with train.epochs: 2 -> 3 (given on the command line)" in out
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3]
    assert "epochs: 3" in (run / "config.yaml").read_text()
    after = files(run)

    # Fewer epochs than done, a setting that would make it another run, a CONFIG of another run:
    # one line each, and the run's files untouched.
    code, _, err = cli(capsys, "run", "--run-dir", run, "--resume", "--set", "train.epochs=1")
    assert code == 2 and "train.epochs: 1 is fewer than the 3 epochs" in one_line(err)
    code, _, err = cli(capsys, "run", "--run-dir", run, "--resume", "--set", "optim.lr=0.5")
    assert code == 2
    assert ("--set optim.lr=0.5: a resumed run keeps its recorded optim.lr (0.1); only "
            "train.epochs, train.threads, train.checkpoint_every, train.channels_last, "
            "train.compile, data.root, model.init_from may change") in one_line(err)
    code, _, err = cli(capsys, "run", quickstart_config_path(), "--run-dir", run, "--resume")
    assert code == 2
    assert "describes another run than" in one_line(err) and "differs in data.batch_size" in err
    assert files(run) == after


def test_resume_with_nothing_to_resume_starts_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, _ = cli(capsys, "quickstart", "--run-dir", run, "--resume", *QUICK,
                       "--set", "train.epochs=1")
    assert code == 0
    assert f"{run}: nothing to resume (no run there yet); starting the run" in out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    # Without a CONFIG there is nothing to start from: one line, and no directory left behind.
    code, _, err = cli(capsys, "run", "--run-dir", tmp_path / "other", "--resume")
    assert code == 2 and "no CONFIG given to start the run" in one_line(err)
    assert not (tmp_path / "other").exists()
    code, _, err = cli(capsys, "run", "--run-dir", tmp_path / "other")
    assert code == 2 and "CONFIG is needed to start a run" in one_line(err)


@pytest.mark.parametrize("override, message", [
    ("train.epochz=1", "--set train.epochz=1: unknown key 'train.epochz' (did you mean 'epochs'?)"),
    ("optim.name=lbfgs", "--set optim.name=lbfgs: optim.name: expected one of"),
    ("train.epochs=-1", "--set train.epochs=-1: train.epochs: expected a value >= 0, got -1"),
])
def test_a_bad_set_is_blamed_on_set_not_on_the_file(tmp_path, capsys, override, message):
    code, _, err = cli(capsys, "quickstart", "--run-dir", tmp_path / "run", "--set", override)
    assert code == 2 and message in one_line(err) and "quickstart.yaml" not in err
    # A mistake in the file itself still names the file.
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  epochz: 1\n")
    code, _, err = cli(capsys, "run", config, "--run-dir", tmp_path / "run", "--set", override)
    assert code == 2 and f"{config}: unknown key 'train.epochz'" in one_line(err)


@pytest.mark.parametrize("override, message", [
    ("model.name=lenet9000", "lenet9000"),
    ("data.name=imagenet21k", "data.name: unknown dataset 'imagenet21k'"),
    ("train.device=nodevice", "train.device: 'nodevice' is not usable here"),
])
def test_a_run_that_fails_before_writing_leaves_no_run_directory(tmp_path, capsys, override,
                                                                   message):
    code, _, err = cli(capsys, "quickstart", "--run-dir", tmp_path / "runs" / "run",
                       "--set", override)
    assert code == 2 and message in one_line(err)
    assert not (tmp_path / "runs" / "run").exists()


def test_zero_epochs_on_a_new_run_says_that_nothing_was_trained(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, _ = cli(capsys, "quickstart", "--run-dir", run, *QUICK, "--set", "train.epochs=0")
    assert code == 0
    assert out.strip().endswith("nothing trained: train.epochs is 0 (data, model and method were "
                                f"set up); run directory: {run}")
    assert "already finished" not in out


def test_run_info_keeps_every_command_of_a_resumed_run(tmp_path, capsys, monkeypatch):
    import sys

    run = tmp_path / "run"
    commands = [["quickstart", "--run-dir", str(run), *QUICK, "--set", "train.epochs=1"],
                ["run", "--run-dir", str(run), "--resume", "--set", "train.epochs=2"],
                ["run", "--run-dir", str(run), "--resume", "--set", "train.epochs=2"]]  # no-op
    for argv in commands:
        monkeypatch.setattr(sys, "argv", ["neuronwise", *argv])
        assert cli(capsys, *argv)[0] == 0
    info = json.loads((run / "run_info.json").read_text())
    # The third command trained nothing, so it is not a command that produced the run.
    assert [c["command"] for c in info["commands"]] == [
        "neuronwise " + " ".join(argv) for argv in commands[:2]]
    assert info["command"] == info["commands"][0]["command"]
    assert all(c["started"] and "torch" in c for c in info["commands"])


def test_a_moved_study_resumes_its_stages(tmp_path):
    """A stage starts from the study's dense checkpoint by absolute path; moved elsewhere, the
    study still resumes (model.init_from is read only when a run starts)."""
    import shutil

    from neuronwise.experiment.study import run_study, study_from_dict

    study = study_from_dict({
        "name": "tiny", "dense_epochs": 1, "budget_epochs": 2, "iterative_rounds": 1,
        "base": {"data": {"name": "digits", "batch_size": 128, "limit_test": 100},
                 "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
                 "train": {"seed": 0, "threads": 1}},
        "stages": {"gradual": {"pruning": {"patience": 0}}},
        "analysis": {"draws": 1, "landscape_points": 2, "limit": 100},
        "transfer": {"dataset": "digits", "epochs": 1},
    })
    first, moved = tmp_path / "first" / "tiny", tmp_path / "moved" / "tiny"
    lines: list[str] = []
    run_study(study, first, log=lines.append)
    shutil.move(first, moved)
    lines.clear()
    run_study(study, moved, log=lines.append)
    assert not any("] epoch " in line for line in lines)  # nothing trained again
    assert "[gradual] finished (2 epochs): skipped" in lines
