"""The documentation is current and runnable.

- docs/cli.md and docs/config.md equal what the generator makes from the parser and the schema;
- the site builds with mkdocs (strict: no broken links) when mkdocs is installed;
- every ```python block of README.md and docs/**/*.md runs, page by page in one namespace, with
  tiny stand-ins for the names a snippet assumes (``model``, ``train_loader``, ``val_loss``, ...);
- scripts/check_report_html.py renders a real report in headless Chromium (skips without it).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neuronwise as nw
from neuronwise.experiment import docgen

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted(DOCS.glob("guide/*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize("name", ["cli.md", "config.md"])
def test_generated_reference_is_current(name):
    generated = docgen.pages()[name]
    assert (DOCS / name).read_text(encoding="utf-8") == generated, (
        f"docs/{name} is stale: run python -m neuronwise.experiment.docgen"
    )


def test_docgen_check_reports_a_stale_page(tmp_path, capsys):
    assert docgen.main([str(tmp_path)]) == 0
    assert docgen.main([str(tmp_path), "--check"]) == 0
    (tmp_path / "config.md").write_text("old\n")
    assert docgen.main([str(tmp_path), "--check"]) == 1
    assert "config.md" in capsys.readouterr().out


def test_cli_reference_lists_every_subcommand_and_flag():
    text = docgen.cli_reference()
    parser = docgen.build_parser()
    for name, _, sub in docgen._subcommands(parser):
        assert f"## `neuronwise {name}`" in text
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in text, (name, flag)


def test_config_reference_lists_every_key_with_its_default():
    text = docgen.config_reference()
    flat = docgen.schema.flatten(docgen.config_module.Config().to_dict())
    for key, value in flat.items():
        assert re.search(rf"\| `{re.escape(key)}` \| [^|]+ \| `{re.escape(repr(value))}` \|", text), key


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs not installed")
def test_mkdocs_builds_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(tmp_path / "site")], check=False, capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "guide" / "lobster" / "index.html").is_file()


# ---------------------------------------------------------------------------- doc snippets


def _batches(count: int, size: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(count)
    return [(torch.randn(size, 1, 28, 28, generator=generator), torch.arange(size) % 10)
            for _ in range(count)]


def _stand_ins() -> dict:
    """The names that guide snippets use without defining them, on LeNet-300-100, 28×28 inputs."""
    torch.manual_seed(0)
    model = nw.models.create("lenet300")
    loader = _batches(2)  # two samples per class: entropies that differ between units

    def val_loss(net: nn.Module | None = None) -> float:
        net = net or model
        with torch.no_grad():
            return sum(F.cross_entropy(net(x), y).item() for x, y in loader) / len(loader)

    def train_one_epoch(net: nn.Module, opt: torch.optim.Optimizer) -> None:
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()

    return {
        "torch": torch, "F": F, "nn": nn, "nw": nw, "model": model, "net": model, "epochs": 1,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.01),
        "train_loader": loader, "val_loader": loader, "test_loader": loader, "loader": loader,
        "x": loader[0][0], "example": torch.zeros(1, 1, 28, 28), "val_inputs": loader[0][0][:4],
        "val_loss": val_loss, "evaluate": val_loss, "train_one_epoch": train_one_epoch,
        "dense_model": nw.models.create("lenet300"), "pruned": model,
    }


# Guide snippets known to fail, reported to their owners rather than edited here. Each must still
# fail (the test says when one is fixed); the page then reports xfail with the reason.
KNOWN_BROKEN = {
}


def _skip_reason(code: str) -> str | None:
    if "fetch(" in code or "download(" in code:
        return "downloads from the network"
    if "lightning" in code and importlib.util.find_spec("lightning") is None:
        return "the 'lightning' extra is not installed"
    return None


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("page", [p for p in PAGES if BLOCK.search(p.read_text())], ids=_page_id)
def test_python_snippets_run(page, tmp_path, monkeypatch, request):
    blocks = BLOCK.findall(page.read_text(encoding="utf-8"))
    if any('data.load("mnist"' in b for b in blocks):
        monkeypatch.setenv("NEURONWISE_DATA", str(request.getfixturevalue("real_data_root")))
    monkeypatch.chdir(tmp_path)  # snippets that save files write them here
    # A snippet may register a model: keep the registry as it was.
    monkeypatch.setattr(nw.models, "_REGISTRY", dict(nw.models._REGISTRY))
    namespace = _stand_ins()
    skipped = []
    broken = []
    for index, code in enumerate(blocks, start=1):
        reason = _skip_reason(code)
        if reason:
            skipped.append(f"block {index}: {reason}")
            continue
        if not torch.cuda.is_available():
            code = code.replace('device="cuda"', 'device="cpu"')
        known = KNOWN_BROKEN.get((_page_id(page), index))
        try:
            # Running the documentation's own code is the point of this test.
            exec(compile(code, f"{_page_id(page)}[block {index}]", "exec"), namespace)  # noqa: S102
        except Exception as error:  # noqa: BLE001 - any failure of a snippet is reported
            if known is None:
                pytest.fail(f"{_page_id(page)} block {index} failed: {type(error).__name__}: "
                            f"{error}\n{code}")
            broken.append(f"block {index}: {known}")
        else:
            assert known is None, f"block {index} runs now: remove it from KNOWN_BROKEN"
    assert len(skipped) < len(blocks), skipped
    if broken:
        pytest.xfail("; ".join(broken))


# ---------------------------------------------------------------------------- report in Chromium


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "check_report_html", ROOT / "scripts" / "check_report_html.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_renders_in_headless_chromium(tmp_path, capsys):
    script = _load_script()
    chromium = script.find_chromium(None)
    if chromium is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium)")
    from neuronwise.experiment.cli import main

    run = tmp_path / "run"
    assert main(["quickstart", "--run-dir", str(run), "--set", "train.epochs=1"]) == 0
    assert main(["report", str(run)]) == 0
    assert script.main([str(run)]) == 0
    # A broken plot is caught: the check can fail.
    page = (run / "report.html").read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    assert script.main([str(broken)]) == 1
    assert "plots decoded" in capsys.readouterr().err


def test_report_check_skips_cleanly_without_chromium(tmp_path, monkeypatch, capsys):
    script = _load_script()
    page = tmp_path / "report.html"
    page.write_text("<html><body></body></html>")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert script.main([str(page)]) == script.SKIPPED
    assert "skipped" in capsys.readouterr().err
