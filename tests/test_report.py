"""Report tables: the per-compression-level rule (official LOBSTER log rule)."""

from neuronwise.experiment.report import compression_levels, levels_table


def record(epoch, nonzero, val, test):
    return {"epoch": epoch, "nonzero_paper": nonzero, "params_paper": 100,
            "remaining_percent_paper": float(nonzero), "val_accuracy": val, "test_accuracy": test}


def test_each_level_reports_its_best_validation_epoch():
    history = [record(1, 100, 90.0, 91.0), record(2, 100, 95.0, 94.0), record(3, 100, 93.0, 99.0),
               record(4, 40, 92.0, 90.0), record(5, 40, 92.0, 95.0), record(6, 10, 80.0, 81.0)]
    levels = compression_levels(history)
    assert [(r["nonzero_paper"], r["epoch"]) for r in levels] == [(100, 2), (40, 4), (10, 6)]
    rows = levels_table(history)
    assert rows[2] == "| 100 | 100.000 | 1.0x | 6.00 | 2 |"
    assert rows[3] == "| 40 | 40.000 | 2.5x | 10.00 | 4 |"  # ties keep the first epoch


def test_without_validation_a_level_is_its_last_epoch():
    nan = float("nan")
    history = [record(1, 100, nan, 91.0), record(2, 100, nan, 93.0), record(3, 50, nan, 92.0)]
    assert [r["epoch"] for r in compression_levels(history)] == [2, 3]
