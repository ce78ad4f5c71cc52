"""Check that a run's report.html renders in headless Chromium: every embedded plot decodes.

    python scripts/check_report_html.py RUN_DIR_OR_REPORT_HTML [--chromium PATH]

Loads a copy of the page with a probe script appended; the probe writes, after the load event,
how many <img> elements decoded to a non-empty bitmap. Exit codes: 0 rendered, 1 a plot or the
title failed, 77 no Chromium found (skipped, as automake's convention), 2 usage errors.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SKIPPED = 77
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const ok = images.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0);
  document.body.setAttribute("data-probe", ok.length + "/" + images.length);
});
</script>"""


def find_chromium(explicit: str | None) -> str | None:
    if explicit:
        return shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


def render(chromium: str, page: Path, timeout: float = 60) -> str:
    """The DOM of ``page`` after load, as headless Chromium serialises it."""
    with tempfile.TemporaryDirectory() as scratch:
        probe = Path(scratch) / "report.html"
        probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                         encoding="utf-8")
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu",
                   "--disable-dev-shm-usage", f"--user-data-dir={scratch}/profile",
                   "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
        result = subprocess.run(command, check=False, capture_output=True, text=True,
                                timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"chromium exited with {result.returncode}: {result.stderr[-500:]}")
    return result.stdout


def check(dom: str) -> list[str]:
    """Problems found in the rendered DOM (empty when the report rendered)."""
    problems = []
    if not re.search(r"<title>neuronwise report: [^<]+</title>", dom):
        problems.append("no report title")
    probe = re.search(r'data-probe="(\d+)/(\d+)"', dom)
    if probe is None:
        problems.append("the probe did not run (page did not finish loading)")
    else:
        decoded, total = map(int, probe.groups())
        if total == 0:
            problems.append("no embedded plot")
        elif decoded != total:
            problems.append(f"only {decoded} of {total} plots decoded")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="run directory (holding report.html) or the HTML file")
    parser.add_argument("--chromium", help="Chromium executable (default: searched on PATH)")
    args = parser.parse_args(argv)
    page = Path(args.target)
    page = page / "report.html" if page.is_dir() else page
    if not page.is_file():
        print(f"{page}: not found (run `neuronwise report RUN_DIR` first)", file=sys.stderr)
        return 2
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("skipped: no Chromium found (apt-get install chromium)", file=sys.stderr)
        return SKIPPED
    problems = check(render(chromium, page))
    for problem in problems:
        print(f"{page}: {problem}", file=sys.stderr)
    if not problems:
        print(f"{page}: rendered, every plot decoded")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
