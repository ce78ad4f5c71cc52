"""scripts/reproduce.py: its steps are the commands of docs/RESULTS.md, and it resumes run dirs."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_run_quoted_in_results_is_a_step_with_the_same_config():
    reproduce = _reproduce()
    steps = {(name, args[0]) for name, kind, args in reproduce.STEPS if kind in ("run", "study")}
    results = (ROOT / "docs" / "RESULTS.md").read_text()
    quoted = set(re.findall(r"neuronwise (?:run|study) (\S+) --(?:run|study)-dir runs/([\w.-]+)",
                            results))
    assert quoted, "RESULTS.md quotes no neuronwise run command"
    assert {(name, config) for config, name in quoted} <= steps
    for _, kind, args in reproduce.STEPS:
        for path in args[:2]:
            if path.endswith((".yaml", ".py")):
                assert (ROOT / path).is_file(), path


def test_commands_resume_existing_runs_and_pass_threads(tmp_path):
    reproduce = _reproduce()
    fresh = reproduce.command("dense-lenet300-mnist", "run", ("c.yaml",), tmp_path, 1)
    assert fresh[3:] == ["run", "c.yaml", "--run-dir", str(tmp_path / "dense-lenet300-mnist"),
                         "--set", "train.threads=1"]
    (tmp_path / "dense-lenet300-mnist").mkdir()
    (tmp_path / "dense-lenet300-mnist" / "config.yaml").write_text("train: {epochs: 3}\n")
    again = reproduce.command("dense-lenet300-mnist", "run", ("c.yaml",), tmp_path, None)
    assert "--resume" in again and "--set" not in again
    assert reproduce.state("dense-lenet300-mnist", "run", tmp_path) == "started"
    (tmp_path / "dense-lenet300-mnist" / "metrics.jsonl").write_text('{"epoch": 2}\n')
    assert reproduce.state("dense-lenet300-mnist", "run", tmp_path) == "epoch 2 of 3"


def test_list_and_unknown_filter(tmp_path, capsys):
    reproduce = _reproduce()
    assert reproduce.main(["--runs", str(tmp_path), "--list", "--only", "lenet5-mnist"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all("lenet5-mnist" in line and "not started" in line for line in lines)
    assert reproduce.main(["--runs", str(tmp_path), "--only", "no-such-step"]) == 2
