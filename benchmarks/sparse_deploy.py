"""Sparse deployment on CPU: dense PyTorch, simplify alone, ``nw.deploy`` and ONNX Runtime (dense).

For each model and batch size (1, 32, 256), ``nw.deploy`` is run for that batch size, then four
models are timed interleaved in this process (``neuronwise.latency.measure_latency``: medians of
round-robin rounds, so background load hits all alike): the dense PyTorch model, the simplified
model, the deployed model, and ONNX Runtime running the dense model (``export_onnx``; intra-op
threads = torch's). Speed-ups are ratios of medians measured in the same rounds.

Models:
- ``--lenet300 RUN``: a trained LOBSTER LeNet-300-100 run directory (``neuronwise run ...``).
- ``--lenet5 RUN``: a trained LOBSTER LeNet-5 run directory; without it, a LeNet-5 with a
  synthetic LOBSTER-like mask at 0.87 % (see ``lobster_like_lenet5``), stated as such.
- controls: LeNet-300 dense (100 %) and with a random 50 % mask: deploy must not be slower;
  LeNet-300 with a random 2 % mask (almost no dead neurons): the CSR kernel's own worth.

    python benchmarks/sparse_deploy.py --lenet300 runs/lobster-lenet300-mnist-fast \
        [--lenet5 RUN] [--repeats 100] [--runs 2] [--threads 1] [--output FILE]

Each run deploys the model anew for each batch size and times everything interleaved; ``--runs``
repeats that, so a ratio is seen more than once on this noisy machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import neuronwise as nw
from neuronwise.experiment.deployment import compare_latency, mac_counts
from neuronwise.experiment.tools import load_run_model
from neuronwise.io import atomic_write_text
from neuronwise.simplify import export_onnx

EXAMPLE = torch.zeros(1, 1, 28, 28)
# Alive outputs and density of the alive-to-alive connections per layer. Chosen to match the
# final level of the LOBSTER LeNet-5/Fashion-MNIST run in docs/RESULTS.md (96 of 580 neurons
# alive, 3,747 non-zero parameters = 0.87 %); the split over layers is our assumption.
LENET5_MASK = {"conv1": (8, 0.60), "conv2": (28, 0.25), "fc1": (50, 0.08), "classifier": (10, 0.85)}


def lobster_like_lenet5(seed: int = 0) -> nn.Module:
    """A LeNet-5 whose weights are those of a fresh model under a LOBSTER-like mask: dead neurons
    have no incoming or outgoing weights (and a zero bias), alive ones keep a random fraction of
    their connections from alive inputs."""
    torch.manual_seed(seed)
    model = nw.models.create("lenet5").eval()
    generator = torch.Generator().manual_seed(seed)
    alive_inputs = torch.ones(1, dtype=torch.bool)
    with torch.no_grad():
        for name, (alive, density) in LENET5_MASK.items():
            layer = getattr(model, name)
            rows = layer.weight.shape[0]
            keep = torch.zeros(rows, dtype=torch.bool)
            keep[torch.randperm(rows, generator=generator)[:alive]] = True
            inputs = alive_inputs.repeat_interleave(layer.weight[0].numel()
                                                    // alive_inputs.numel())
            mask = torch.rand(layer.weight.shape, generator=generator) < density
            mask &= keep.view(-1, *[1] * (layer.weight.dim() - 1))
            mask &= inputs.view(1, *layer.weight.shape[1:])
            layer.weight.mul_(mask)
            layer.bias.mul_(keep)
            alive_inputs = keep
    return model


def random_mask(model: nn.Module, density: float, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(torch.rand(m.weight.shape, generator=generator) < density)
    return model.eval()


def run_summary(run_dir: str) -> str:
    """The run directory with the epoch and test error of its last record (that of ``last.pt``)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    if not lines:
        return run_dir
    last = json.loads(lines[-1])
    return (f"{run_dir}, epoch {last['epoch']}, test error "
            f"{100 - last['test_accuracy']:.2f} %")


class OnnxRuntime(nn.Module):
    """An ONNX Runtime session behind ``nn.Module.__call__`` (so it is timed like the others)."""

    def __init__(self, model: nn.Module, folder: Path, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        path = folder / f"{id(model)}.onnx"
        export_onnx(model, EXAMPLE, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor):
        return self.session.run(None, {self.input_name: x.numpy()})[0]


def report(name: str, model: nn.Module, repeats: int, runs: int, folder: Path) -> list[str]:
    sparsity = nw.metrics.sparsity_report(model)
    macs = mac_counts(model, EXAMPLE)
    ort = OnnxRuntime(model, folder, torch.get_num_threads())
    extra = {"ORT dense": lambda batch: ort}
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        # how much of a conv net's speed-up the memory format alone gives (no sparsity used)
        channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
        extra["dense channels-last"] = lambda batch: channels_last
    alive, total = nw.metrics.count_neurons(model)["total"]
    others = ["dense", "simplified", *extra]
    lines = [f"## {name}",
             (f"remaining parameters {sparsity['nonzero']:,} of {sparsity['total']:,} "
              f"({sparsity['remaining_percent']:.2f} %, paper convention), "
              f"neurons {alive}/{total}; MACs dense {macs['dense']:,}, simplified "
              f"{macs['simplified']:,} (x{macs['dense'] / macs['simplified']:.2f}), non-zero "
              f"{macs['nonzero']:,} (x{macs['dense'] / max(1, macs['nonzero']):.2f})")]
    for run in range(1, runs + 1):
        # each run deploys anew (the timed choices too) and times all models interleaved
        rows, deployed = compare_latency(model, EXAMPLE, repeats=repeats, extra=extra)
        lines += ["", f"run {run} of {runs}:", "",
                  "| batch | deployed ms (threads, layout) | "
                  + " | ".join(f"{o} ms (deployed speed-up)" for o in others) + " |",
                  "|---" * (2 + len(others)) + "|"]
        for row in rows:
            layout = "NHWC" if deployed[row["batch"]].channels_last else "NCHW"
            cells = [f"{row[f'{o}_ms']:.4f} ({row[f'speedup_vs_{o}']:.2f}x)" for o in others]
            lines.append(f"| {row['batch']} | {row['deployed_ms']:.4f} ({row['threads']}, "
                         f"{layout}) | " + " | ".join(cells) + " |")
    for batch, module in deployed.items():
        lines += ["", f"per-layer choice at batch {batch} (run {runs}):", "```", module.table(),
                  "```"]
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        difference = float((model(x) - deployed[32](x)).abs().max())
    lines += [f"max |output difference| (batch-32 deployment, 8 random inputs): {difference:.3g}",
              ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lenet300", help="LOBSTER LeNet-300-100 run directory")
    parser.add_argument("--lenet5", help="LOBSTER LeNet-5 run directory (default: synthetic mask)")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--runs", type=int, default=2,
                        help="independent measurements per model (deploy and timing each)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: keep)")
    parser.add_argument("--no-controls", action="store_true", help="skip the dense/50 % controls")
    parser.add_argument("--output", help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models: list[tuple[str, nn.Module]] = []
    if args.lenet300:
        models.append((f"LOBSTER LeNet-300-100 ({run_summary(args.lenet300)})",
                       load_run_model(args.lenet300)[1]))
    if args.lenet5:
        models.append((f"LOBSTER LeNet-5 ({run_summary(args.lenet5)})",
                       load_run_model(args.lenet5)[1]))
    else:
        models.append(("LeNet-5, synthetic LOBSTER-like mask (not a trained model)",
                       lobster_like_lenet5()))
    if not args.no_controls:
        models.append(("control: LeNet-300-100 dense", random_mask(nw.models.create("lenet300"), 1.0)))
        models.append(("control: LeNet-300-100, random 50 % mask",
                       random_mask(nw.models.create("lenet300"), 0.5)))
        # unstructured sparsity without dead neurons: what the CSR kernel alone is worth
        models.append(("control: LeNet-300-100, random 2 % mask (no dead neurons)",
                       random_mask(nw.models.create("lenet300"), 0.02)))
    command = "python benchmarks/sparse_deploy.py " + " ".join(sys.argv[1:] if argv is None
                                                               else argv)
    lines = [f"# Sparse deployment: {command}",
             (f"torch {torch.__version__}, torch threads {torch.get_num_threads()} (caller), "
             f"median of {args.repeats} interleaved rounds per batch size, {args.runs} runs per "
             f"model; the deployed model picks its own thread count"), ""]
    with tempfile.TemporaryDirectory() as folder:
        for name, model in models:
            print(f"measuring: {name}", file=sys.stderr, flush=True)
            lines += report(name, model, args.repeats, args.runs, Path(folder))
    text = "\n".join(lines) + "\n"
    if args.output:
        atomic_write_text(args.output, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
