"""Sparse deployment on CPU: dense PyTorch, simplify alone, ``nw.deploy`` and ONNX Runtime (dense).

For each model and batch size (1, 32, 256), ``nw.deploy`` is run for that batch size, then four
models are timed interleaved in this process (``neuronwise.latency.measure_latency``: medians of
round-robin rounds, so background load hits all alike): the dense PyTorch model, the simplified
model, the deployed model, and ONNX Runtime running the dense model (``export_onnx``; intra-op
threads = torch's). Speed-ups are ratios of medians measured in the same rounds.

Models:
- ``--lenet300 RUN`` / ``--lenet5 RUN``: a trained LOBSTER LeNet-300-100 / LeNet-5 run directory
  (``neuronwise run ...``; its ``last.pt``).
- without run directories (or with ``--synthetic``): both models with a synthetic LOBSTER-like
  mask (``lobster_like``: LeNet-300 at 2.6 % with 156 of 410 neurons, LeNet-5 at 0.88 % with 96
  of 580), stated as such in the output.
- controls: LeNet-300 dense (100 %) and with a random 50 % mask: deploy must not be slower;
  LeNet-300 with a random 2 % mask (almost no dead neurons): the CSR kernel's own worth.

    python benchmarks/sparse_deploy.py --lenet300 runs/lobster-lenet300-mnist-fast \
        [--lenet5 RUN] [--repeats 100] [--runs 2] [--clock cpu] [--threads 1] [--output FILE]

Each run deploys the model anew for each batch size and times everything interleaved; ``--runs``
repeats that, so a ratio is seen more than once on this noisy machine. ``--clock cpu`` times
process CPU time instead of wall time: on an oversubscribed machine, millisecond calls that get
descheduled cost whole scheduler slices, and wall-time medians jump between two modes.
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
from neuronwise.experiment.rundir import load_checkpoint
from neuronwise.experiment.tools import load_run_model
from neuronwise.io import atomic_write_text
from neuronwise.simplify import export_onnx

EXAMPLE = torch.zeros(1, 1, 28, 28)
# Synthetic LOBSTER-like masks: alive outputs and density of the alive-to-alive connections per
# layer; the split over layers is our assumption. LeNet-5 matches the final level of the LOBSTER
# LeNet-5/Fashion-MNIST run in docs/RESULTS.md (96 of 580 neurons, 3,747 non-zeros = 0.87 %);
# LeNet-300 that of the quick LOBSTER LeNet-300/MNIST schedule (156 of 410 neurons, 7,027
# non-zeros = 2.64 %, docs/results/runs/lobster-lenet300-mnist-fast).
SYNTHETIC_MASKS = {
    "lenet5": {"conv1": (8, 0.60), "conv2": (28, 0.25), "fc1": (50, 0.08),
               "classifier": (10, 0.85)},
    "lenet300": {"fc1": (100, 0.075), "fc2": (46, 0.15), "classifier": (10, 0.60)},
}


def lobster_like(name: str, seed: int = 0) -> nn.Module:
    """Registry model ``name`` whose weights are those of a fresh model under a LOBSTER-like mask
    (``SYNTHETIC_MASKS``): dead neurons have no incoming or outgoing weights (and a zero bias),
    alive ones keep a random fraction of their connections from alive inputs."""
    torch.manual_seed(seed)
    model = nw.models.create(name).eval()
    generator = torch.Generator().manual_seed(seed)
    alive_inputs = torch.ones(1, dtype=torch.bool)
    with torch.no_grad():
        for layer_name, (alive, density) in SYNTHETIC_MASKS[name].items():
            layer = getattr(model, layer_name)
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
    """The run directory with the epoch of its ``last.pt`` and that epoch's test error."""
    epoch = load_checkpoint(Path(run_dir) / "last.pt")["epoch"]
    records = [json.loads(line) for line in
               (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    record = next((r for r in records if r["epoch"] == epoch), None)
    if record is None:
        return f"{run_dir}, epoch {epoch}"
    return f"{run_dir}, epoch {epoch}, test error {100 - record['test_accuracy']:.2f} %"


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


def report(name: str, model: nn.Module, args: argparse.Namespace, folder: Path) -> list[str]:
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
    runs = args.runs
    for run in range(1, runs + 1):
        # each run deploys anew (the timed choices too) and times all models interleaved
        rows, deployed = compare_latency(model, EXAMPLE, repeats=args.repeats, extra=extra,
                                         clock=args.clock)
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
    parser.add_argument("--synthetic", action="store_true",
                        help="the synthetic masks also when run directories are given")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--runs", type=int, default=2,
                        help="independent measurements per model (deploy and timing each)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or process CPU time (leaves out time descheduled)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: keep)")
    parser.add_argument("--no-controls", action="store_true", help="skip the dense/50 %% controls")
    parser.add_argument("--output", help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models: list[tuple[str, nn.Module]] = []
    for name, run_dir in (("lenet300", args.lenet300), ("lenet5", args.lenet5)):
        title = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5"}[name]
        if run_dir:
            models.append((f"LOBSTER {title} ({run_summary(run_dir)})", load_run_model(run_dir)[1]))
        if args.synthetic or not (args.lenet300 or args.lenet5):
            models.append((f"{title}, synthetic LOBSTER-like mask (not a trained model)",
                           lobster_like(name)))
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
             f"median {args.clock} time of {args.repeats} interleaved rounds per batch size, "
             f"{args.runs} runs per model; the deployed model picks its own thread count (its "
             f"choices are timed in wall time)"), ""]
    with tempfile.TemporaryDirectory() as folder:
        for name, model in models:
            print(f"measuring: {name}", file=sys.stderr, flush=True)
            lines += report(name, model, args, Path(folder))
    text = "\n".join(lines) + "\n"
    if args.output:
        atomic_write_text(args.output, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
