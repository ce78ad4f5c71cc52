"""The README's training-loop snippet runs exactly as written, in a fresh namespace (no
stand-ins), and shows LOBSTER pruning."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_loop_block() -> str:
    section = README.read_text(encoding="utf-8").split("## In your own training loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_training_loop_runs_as_written_and_prunes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(readme_loop_block(), str(README), "exec"), {"__name__": "__main__"})  # noqa: S102
    counts = {name: int(n.replace(",", "")) for name, n in re.findall(
        r"^(parameters|non-zero parameters) +([\d,]+) +paper", output.getvalue(), re.MULTILINE)}
    assert 0 < counts["non-zero parameters"] < counts["parameters"]
