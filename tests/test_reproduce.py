"""scripts/reproduce.py: its steps are the commands of docs/RESULTS.md, and it resumes run dirs."""

import importlib.util
import json
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
    config = tmp_path / "c.yaml"
    config.write_text("model: {name: lenet300}\n")
    fresh = reproduce.command("dense-lenet300-mnist", "run", (str(config),), tmp_path, 1)
    assert fresh[3:] == ["run", str(config), "--run-dir", str(tmp_path / "dense-lenet300-mnist"),
                         "--set", "train.threads=1"]
    (tmp_path / "dense-lenet300-mnist").mkdir()
    (tmp_path / "dense-lenet300-mnist" / "config.yaml").write_text("train: {epochs: 3}\n")
    again = reproduce.command("dense-lenet300-mnist", "run", (str(config),), tmp_path, None)
    assert "--resume" in again and "--set" not in again
    assert reproduce.state("dense-lenet300-mnist", "run", tmp_path) == "started"
    (tmp_path / "dense-lenet300-mnist" / "metrics.jsonl").write_text('{"epoch": 2}\n')
    assert reproduce.state("dense-lenet300-mnist", "run", tmp_path) == "epoch 2 of 3"
    seeded = reproduce.command("s", "study", ("c.yaml", "--set", "base.train.seed=1"), tmp_path, 2)
    assert seeded[3:] == ["study", "c.yaml", "--study-dir", str(tmp_path / "s"),
                          "--set", "base.train.seed=1", "--set", "base.train.threads=2"]
    study = tmp_path / "study-lenet300-mnist"
    (study / "dense").mkdir(parents=True)
    assert reproduce.state("study-lenet300-mnist", "study", tmp_path) == "started"
    (study / "study.md").write_text("# report\n")
    assert reproduce.state("study-lenet300-mnist", "study", tmp_path) == "done"


def test_list_and_unknown_filter(tmp_path, capsys):
    reproduce = _reproduce()
    assert reproduce.main(["--records", str(tmp_path), "--list", "--only", "lenet5-mnist"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all("lenet5-mnist" in line and "not started" in line for line in lines)
    assert reproduce.main(["--runs", str(tmp_path), "--only", "no-such-step"]) == 2


def test_needs_follow_simplify_and_init_from():
    reproduce = _reproduce()
    names = {name for name, _, _ in reproduce.STEPS}
    by_name = {(name, kind): (name, kind, args) for name, kind, args in reproduce.STEPS}
    assert reproduce.needs(by_name["serene-lenet5-mnist-fast", "simplify"], names) == {
        "serene-lenet5-mnist-fast"}
    assert reproduce.needs(by_name["iterative-lenet5-fashion", "run"], names) == {
        "dense-lenet5-fashion"}
    assert reproduce.needs(by_name["lobster-lenet5-fashion-strong", "run"], names) == set()
    # A needed step outside the selection (--only) is not waited for.
    assert reproduce.needs(by_name["iterative-lenet5-fashion", "run"], set()) == set()


def test_parallel_steps_start_after_what_they_need(tmp_path, monkeypatch, capsys):
    reproduce = _reproduce()
    steps = [("dense-a", "run", ("dense.yaml",)), ("fine-a", "run", ("fine.yaml",)),
             ("other", "run", ("other.yaml",)), ("fine-a", "simplify", ())]
    configs = {"dense.yaml": {}, "other.yaml": {},
               "fine.yaml": {"model": {"init_from": "runs/dense-a/best.pt"}}}
    monkeypatch.setattr(reproduce, "read_yaml", lambda path: configs[path])
    monkeypatch.setattr(reproduce, "STEPS", tuple(steps))
    events = []

    class Process:  # finishes on its second poll
        def __init__(self, line, **kwargs):
            self.name = line[line.index("--run-dir") + 1] if "--run-dir" in line else line[-3]
            self.kind = "simplify" if "simplify" in line else "run"
            self.polls = 0
            events.append(("start", Path(self.name).name, self.kind))

        def poll(self):
            self.polls += 1
            if self.polls < 2:
                return None
            events.append(("end", Path(self.name).name, self.kind))
            return 0

    monkeypatch.setattr(reproduce.subprocess, "Popen", Process)
    monkeypatch.setattr(reproduce.time, "sleep", lambda seconds: None)
    assert reproduce.main(["--runs", str(tmp_path), "--jobs", "2"]) == 0
    position = {event: i for i, event in enumerate(events)}
    assert position["start", "fine-a", "run"] > position["end", "dense-a", "run"]
    assert position["start", "fine-a", "simplify"] > position["end", "fine-a", "run"]
    # "other" needs nothing: it runs beside dense-a, not after it.
    assert position["start", "other", "run"] < position["end", "dense-a", "run"]
    assert (tmp_path / "dense-a.log").exists() and (tmp_path / "fine-a.simplify.log").exists()


def test_list_reads_the_quoted_records(capsys, monkeypatch):
    """By default --list reads docs/results/runs, where the records RESULTS.md quotes are."""
    reproduce = _reproduce()
    monkeypatch.chdir(ROOT)
    assert reproduce.main(["--list", "--only", "dense-lenet300-mnist", "--only",
                           "study-lenet300-mnist"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.endswith(" done") for line in lines)


def test_benchmark_steps_keep_their_output_and_wait_for_the_runs_they_read(tmp_path):
    reproduce = _reproduce()
    steps = {name: (kind, args) for name, kind, args in reproduce.STEPS}
    outputs = {args[1] for kind, args in steps.values() if kind == "bench"}
    assert {"lobster_overhead.txt", "data_path.txt", "structured_baselines.txt"} <= outputs
    # Every benchmark output RESULTS.md or a guide links to has a step; every step's output is kept.
    pages = [ROOT / "docs/RESULTS.md", *sorted((ROOT / "docs/guide").glob("*.md"))]
    linked = {name for page in pages
              for name in re.findall(r"\((?:\.\./)?results/([\w.-]+\.txt)\)", page.read_text())}
    assert linked - {"neq_optimizers.txt"} <= outputs  # that one is the neq-optimizers script's
    assert all((ROOT / "docs/results" / output).exists() for output in outputs)
    line = reproduce.command("bench-data-path", "bench", steps["bench-data-path"][1], tmp_path, 1)
    assert line[:2] == ["sh", "-c"] and "> docs/results/data_path.txt.part &&" in line[2]
    names = {name for name, _, _ in reproduce.STEPS}
    step = ("bench-structured-baselines", *steps["bench-structured-baselines"])
    assert reproduce.needs(step, names) == {"serene-lenet300-mnist-fast", "dense-lenet300-mnist"}


def test_results_states_how_many_single_run_records_carry_a_dirty_commit():
    """The count RESULTS.md gives is that of the records (comparison runs excluded: all clean)."""
    runs = ROOT / "docs" / "results" / "runs"
    comparisons = {line.split(",")[3] for line in
                   (ROOT / "docs" / "results" / "comparisons.csv").read_text().splitlines()[1:]}
    infos = [p for p in runs.rglob("run_info.json") if p.relative_to(runs).parts[0] not in comparisons]
    dirty = [p for p in infos if "+dirty" in json.loads(p.read_text()).get("commit", "")]
    text = " ".join((ROOT / "docs" / "RESULTS.md").read_text().split())
    found = re.search(r"(\d+) of the (\d+) `run_info.json` copied for these single runs carry a "
                      r"`\+dirty` commit", text)
    assert found and (int(found[1]), int(found[2])) == (len(dirty), len(infos))
    clean = [runs / name / "run_info.json" for name in comparisons]
    assert all("+dirty" not in json.loads(p.read_text())["commit"] for p in clean)


def test_a_run_waits_for_the_run_its_set_init_from_reads():
    reproduce = _reproduce()
    names = {name for name, _, _ in reproduce.STEPS}
    steps = {name: (name, kind, args) for name, kind, args in reproduce.STEPS}
    # The config reads runs/serene-vit-fashion-small-neurons/last.pt; --set replaces it per seed.
    assert reproduce.needs(steps["finetune-vit-fashion-small"], names) == {
        "serene-vit-fashion-small-neurons"}
    assert reproduce.needs(steps["finetune-vit-fashion-small-s2"], names) == {
        "serene-vit-fashion-small-neurons-s2"}


def test_paths_under_runs_follow_the_runs_option(tmp_path):
    reproduce = _reproduce()
    steps = {name: (kind, args) for name, kind, args in reproduce.STEPS}
    # The config's init_from (runs/dense-lenet300-mnist/best.pt) is set under --runs.
    line = reproduce.command("iterative-lenet300-mnist", *steps["iterative-lenet300-mnist"],
                             tmp_path, None)
    assert line[-2:] == ["--set", f"model.init_from={tmp_path}/dense-lenet300-mnist/best.pt"]
    # A step's own --set of it moves, and is the only one.
    seeded = reproduce.command("finetune-vit-fashion-small-s2",
                               *steps["finetune-vit-fashion-small-s2"], tmp_path, None)
    sets = [a for a in seeded if a.startswith("model.init_from=")]
    assert sets == [f"model.init_from={tmp_path}/serene-vit-fashion-small-neurons-s2/last.pt"]
    bench = reproduce.command("bench-structured-baselines", *steps["bench-structured-baselines"],
                              tmp_path, None)
    assert f"{tmp_path}/serene-lenet300-mnist-fast" in bench[2] and " runs/" not in bench[2]
    # With the default folder nothing moves.
    default = reproduce.command("iterative-lenet300-mnist", *steps["iterative-lenet300-mnist"],
                                Path("runs"), None)
    assert not any(a.startswith("model.init_from=") for a in default)
