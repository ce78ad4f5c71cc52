"""An epoch's record as a log line and as TensorBoard scalars."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .methods import Metric


def scalars(record: dict, prefix: str = "") -> list[tuple[str, float]]:
    """The numbers of a record as (tag, value); nested dicts give ``key/subkey`` tags."""
    out = []
    for key, value in record.items():
        if isinstance(value, dict):
            out += scalars(value, f"{prefix}{key}/")
        elif key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((prefix + key, value))
    return out


def format_record(record: dict, declared: Iterable[Metric] = ()) -> str:
    """The epoch's log line; each declared metric with a ``console`` format adds its part when
    its entry is present and not ``False``."""
    val = "-" if math.isnan(record["val_loss"]) else f"{record['val_loss']:.4f}"
    line = (f"epoch {record['epoch']:>4}  train loss {record['train_loss']:.4f}  "
            f"val loss {val}  test acc {record['test_accuracy']:.2f}%  "
            f"remaining params {record['remaining_percent_paper']:.2f}%  "
            f"neurons {record['neurons_alive']}/{record['neurons_total']}  "
            f"lr {record['lr']:.3g}  {record['epoch_time_s']:.1f}s")
    for metric in declared:
        if metric.console and metric.key in record and record[metric.key] is not False:
            line += "  " + metric.console.format(**record)
    return line


def open_tensorboard(folder: Path) -> Any:
    """A ``SummaryWriter`` on ``folder``, or ``None`` without the optional tensorboard extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder))


def write_scalars(writer: Any, record: dict) -> None:
    for key, value in scalars(record):
        writer.add_scalar(key, value, record["epoch"])
