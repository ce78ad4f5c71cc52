"""Report tables: the per-compression-level rule (official LOBSTER log rule); NEq plots."""

import json

import pytest

from neuronwise.experiment.cli import main
from neuronwise.experiment.report import compression_levels, levels_table, summarize, write_report


def record(epoch, nonzero, val, test):
    return {"epoch": epoch, "nonzero_paper": nonzero, "params_paper": 100,
            "remaining_percent_paper": float(nonzero), "val_accuracy": val, "test_accuracy": test}


def test_each_level_reports_its_best_validation_epoch():
    # Line e's accuracies describe the model of line e - 1's count (pruning follows evaluation):
    # epoch 4 measured the 100-parameter model, epochs 5-6 the 40-parameter one, the 10-parameter
    # model of epoch 6 was never measured.
    history = [record(1, 100, 90.0, 91.0), record(2, 100, 95.0, 94.0), record(3, 100, 93.0, 99.0),
               record(4, 40, 96.0, 97.0), record(5, 40, 92.0, 90.0), record(6, 10, 92.0, 95.0)]
    levels = compression_levels(history)
    assert [(r["nonzero_paper"], r["epoch"]) for r in levels] == [(100, 4), (40, 5)]
    rows = levels_table(history)
    assert rows[2] == "| 100 | 100.000 | 1.0x | 3.00 | 4 |"
    assert rows[3] == "| 40 | 40.000 | 2.5x | 10.00 | 5 |"  # ties keep the first epoch
    assert len(rows) == 4
    assert history[3]["nonzero_paper"] == 40  # the records themselves are not changed


def test_without_validation_a_level_is_its_last_epoch():
    nan = float("nan")
    history = [record(1, 100, nan, 91.0), record(2, 100, nan, 93.0), record(3, 50, nan, 92.0),
               record(4, 50, nan, 94.0)]
    assert [r["epoch"] for r in compression_levels(history)] == [3, 4]


# ---------------------------------------------------------------- NEq plots and overhead

NEQ_PLOTS = ("frozen_layers.png", "velocity.png")


def run_record(epoch, **extra):
    return {**record(epoch, 100, 90.0, 91.0), "nonzero_all": 100, "neurons_alive": 10,
            "neurons_total": 10, "train_time_s": 2.0, "train_loss": 0.5, **extra}


def neq_record(epoch, frozen_a, frozen_b):
    speeds = [0.0, 1e-5 / epoch, 1e-4 / epoch, 1e-3 / epoch, 1e-2 / epoch, 0.05, 0.1]
    return run_record(epoch, frozen_percent=(frozen_a + frozen_b) / 2,
                      frozen_per_layer={"fc1": frozen_a, "fc2": frozen_b}, neq_time_s=0.05,
                      velocity_quantiles=dict(zip(("p0", "p10", "p25", "p50", "p75", "p90",
                                                   "p100"), speeds)))


def write_run(folder, history):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    return folder


def test_neq_report_plots_layers_and_velocities_and_states_the_probe_overhead(tmp_path):
    history = [neq_record(1, 0.0, 0.0), neq_record(2, 20.0, 60.0), neq_record(3, 50.0, 90.0)]
    run = write_run(tmp_path / "neq", history)
    markdown = write_report(run).read_text()
    for name in NEQ_PLOTS:
        assert (run / name).read_bytes()[:4] == b"\x89PNG", name
        assert f"({name})" in markdown
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == markdown.count("![")  # every plot embedded
    rows = dict(summarize(history))
    # 0.05 s of probe pass per 2 s of training.
    assert rows["mean NEq probe pass per epoch (% of training time)"] == "0.05 s (2.50%)"


def test_reports_without_neq_records_are_unchanged(tmp_path):
    history = [run_record(1), run_record(2)]
    run = write_run(tmp_path / "dense", history)
    write_report(run)
    assert not any((run / name).exists() for name in (*NEQ_PLOTS, "frozen.png"))
    assert not any("NEq" in key for key, _ in summarize(history))


def test_neq_run_records_layers_velocities_and_probe_time(tmp_path):
    run = tmp_path / "run"
    assert main(["quickstart", "--run-dir", str(run), "--set", "method=neq",
                 "--set", "train.epochs=3", "--set", "data.batch_size=128"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        layers = r["frozen_per_layer"]
        assert list(layers) == ["features.0", "features.2"]  # the classifier is not hooked
        # frozen_percent is the neuron-weighted mean of the layers (128 and 64 neurons).
        assert (128 * layers["features.0"] + 64 * layers["features.2"]) / 192 == pytest.approx(
            r["frozen_percent"])
        speeds = list(r["velocity_quantiles"].values())
        assert list(r["velocity_quantiles"]) == ["p0", "p10", "p25", "p50", "p75", "p90", "p100"]
        assert speeds == sorted(speeds) and speeds[0] >= 0
        assert 0 < r["neq_time_s"] < r["epoch_time_s"]
    assert records[0]["frozen_per_layer"] == {"features.0": 0.0, "features.2": 0.0}  # warm-up
    write_report(run)
    assert all((run / name).is_file() for name in NEQ_PLOTS)


def test_tensorboard_gets_every_number_of_the_records_with_nested_tags(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = tmp_path / "run"
    assert main(["quickstart", "--run-dir", str(run), "--set", "method=neq",
                 "--set", "train.epochs=2", "--set", "data.batch_size=128"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"test_accuracy", "frozen_per_layer/features.0", "velocity_quantiles/p50"} <= tags
    assert "epoch" not in tags
    values = [e.value for e in events.Scalars("frozen_per_layer/features.2")]
    assert values == pytest.approx([r["frozen_per_layer"]["features.2"] for r in records])
    assert [e.step for e in events.Scalars("test_accuracy")] == [1, 2]
