"""Measured backward time of NEq's ``skip_frozen_grads`` path next to what could be saved at most.

For LeNet-300 (784 inputs), LeNet-5 (1×28×28) and ResNet-20 (3×32×32) from ``neuronwise.models``,
with a share of each hooked layer's neurons frozen (random draw, ``selection="random"``; "all" =
every hooked neuron, i.e. all but the classifier), times ``loss.backward()`` of the fast path
(fully frozen layers without ``requires_grad``, partly frozen Conv2d/Linear computing weight
gradients of active rows only where that pays) against the full backward of the same model,
interleaved round after round, the order alternating; medians over rounds. Columns:

- ``wall``, ``CPU``: measured saving, 1 − the median over rounds of the fast/full backward time
  ratio (the two ran back to back), by the wall clock and by the CPU time of the benchmarking
  thread. With one CPU thread the backward runs on that thread, and its CPU time leaves out the
  time the scheduler gives other processes: on a shared machine the steadier estimate of what an
  idle machine would show. Rows "0 %" run the same code on both sides: they show the noise.
- ``(a) §5``: METHODS §5's FLOPs accounting, backward = 2 × forward per layer × (1 − frozen
  fraction): both the weight- and the input-gradient work of a frozen neuron count as saved.
- ``(b)``: the physically avoidable share of the backward autograd runs
  (``neuronwise.neq.backward.avoidable_backward_flops``): weight-gradient FLOPs of frozen neurons
  plus input-gradient FLOPs that no trainable parameter upstream needs.
- ``wall/(b)``, ``CPU/(b)``: how much of (b) the fast path realises.

Both (a) and (b) count only Conv2d, BatchNorm, LayerNorm and Linear FLOPs; the measured time also
holds the ReLU, pooling and loss backward, which no freezing of a later layer removes.
The forward is timed too, since the fast path adds a hook per partly frozen layer.

``--layers`` adds the per-layer table behind the switch-over rule of ``split_pays``: one layer's
backward (input gradient where the model needs it) through autograd against the split backward,
at several active shares; CPU time of the thread on CPU.

    python benchmarks/neq_backward.py [--device cuda] [--batch 32 100] [--rounds 20] [--threads 1]
        [--models lenet300 lenet5 resnet20] [--layers]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from neuronwise import metrics, models
from neuronwise.neq import NEq
from neuronwise.neq.backward import ActiveRowsGrad, avoidable_backward_flops, split_pays

SETUPS = {
    "lenet300": {"in_channels": 1, "image_size": 28},
    "lenet5": {"in_channels": 1, "image_size": 28},
    "resnet20": {"in_channels": 3, "image_size": 32},
}
FROZEN = [("0 %", 0.0), ("50 %", 0.5), ("90 %", 0.9), ("all", 1.0)]
LAYER_SHARES = (0.125, 0.25, 0.5, 0.75)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(variants: dict, rounds: int, warmup: int) -> dict[str, list]:
    """Run each variant once per round, alternating the order; the results per variant."""
    results: dict[str, list] = {key: [] for key in variants}
    items = list(variants.items())
    for _ in range(warmup):
        for _, run in items:
            run()
    for round_ in range(rounds):
        # Alternate which variant goes first so that drifting load hits both alike.
        for key, run in items if round_ % 2 == 0 else items[::-1]:
            results[key].append(run())
    return results


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def _timed_step(model, x, y, device) -> tuple[float, float, float]:
    """(forward, backward, backward CPU) seconds of one training iteration.

    The CPU time of this thread leaves out the time the scheduler gives other processes, so on a
    loaded machine it is the steadier estimate; it covers all the work only on CPU with one
    thread (there the autograd engine runs the backward on the calling thread).
    """
    model.zero_grad(set_to_none=True)
    _sync(device)
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    _sync(device)
    middle, middle_cpu = _clocks()
    loss.backward()
    _sync(device)
    end, end_cpu = _clocks()
    return middle - start, end - middle, end_cpu - middle_cpu


def bench(name: str, frozen: float, batch: int, args, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    setup = SETUPS[name]
    full = models.create(name, num_classes=10, **setup).to(device)
    if args.channels_last:
        full.to(memory_format=torch.channels_last)
    fast = copy.deepcopy(full)
    size = (setup["in_channels"], setup["image_size"], setup["image_size"])
    neq = NEq(
        fast,
        torch.randn(8, *size, device=device),
        selection="random",
        trained_fraction=1.0 - frozen,
        skip_frozen_grads=True,
    )
    neq.step()  # after the warm-up epoch: the frozen set of the next epoch
    example = torch.randn(1, *size, device=device)
    fractions = neq.frozen_per_layer()
    physical = avoidable_backward_flops(full, example, fractions)
    x = torch.randn(batch, *size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    steps = {
        "full": lambda: _timed_step(full, x, y, device),
        "fast": lambda: _timed_step(fast, x, y, device),
    }
    times = _interleaved(steps, args.rounds, args.warmup)
    med = {k: [statistics.median(t[i] for t in v) for i in (0, 1, 2)] for k, v in times.items()}

    def saving(i: int) -> float:
        # Paired per round: both variants ran back to back under the same load.
        return 1 - statistics.median(f[i] / d[i] for f, d in zip(times["fast"], times["full"]))

    return {
        "frozen": neq.frozen_fraction(),
        "full_fwd": med["full"][0],
        "fast_fwd": med["fast"][0],
        "full_bwd": med["full"][1],
        "fast_bwd": med["fast"][1],
        "wall": saving(1),
        "cpu": saving(2),
        "accounted": 1 - neq.backward_flops(example) / metrics.backward_flops(full, example),
        "avoidable": physical["avoidable"] / physical["dense"],
    }


def _layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, bool]]:
    """Per hooked Conv2d/Linear: its input in a training forward, and whether it needs a gradient."""
    inputs: dict[str, tuple[torch.Tensor, bool]] = {}

    def record(name: str, args: tuple) -> None:
        inputs.setdefault(name, (args[0].detach(), args[0].requires_grad))

    handles = [
        module.register_forward_hook(functools.partial(lambda n, m, a, o: record(n, a), name))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and name != "classifier"
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def _layer_backward(layer, x, grad, active, split: bool | None, device) -> float:
    """Seconds of one layer's backward: autograd's (``split`` None) or :class:`ActiveRowsGrad`'s."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    out = layer(x)
    if split is not None:
        conv = None
        if isinstance(layer, nn.Conv2d):
            conv = (list(layer.stride), list(layer.padding), list(layer.dilation))
        out = ActiveRowsGrad.apply(out.detach(), x, layer.weight, layer.bias, active, conv, split)
    _sync(device)
    start = time.thread_time() if device.type == "cpu" else time.perf_counter()
    out.backward(grad)
    _sync(device)
    return (time.thread_time() if device.type == "cpu" else time.perf_counter()) - start


def bench_layers(names: list[str], batch: int, args, device: torch.device) -> None:
    print(
        f"\nper layer, batch {batch}: one layer's backward (input gradient where the model needs "
        "it), autograd vs split at a random active share; medians of CPU time (wall-clock off CPU); "
        "rule = split_pays"
    )
    print(
        f"{'layer':22} {'input':>16} {'rows':>5} {'active':>6} {'autograd ms':>11} "
        f"{'split ms':>9} {'split/full':>10} {'rule':>6}"
    )
    seen = set()
    for name in names:
        setup = SETUPS[name]
        torch.manual_seed(0)
        model = models.create(name, num_classes=10, **setup).to(device)
        size = (setup["in_channels"], setup["image_size"], setup["image_size"])
        for layer_name, (x, needs_input) in _layer_inputs(model, torch.randn(batch, *size)).items():
            layer = model.get_submodule(layer_name)
            key = (str(layer), tuple(x.shape), needs_input)
            if key in seen:
                continue
            seen.add(key)
            x = x.to(device).requires_grad_(needs_input)
            rows = layer.weight.shape[0]
            with torch.no_grad():
                output = layer(x)
            grad = torch.randn_like(output)
            for share in LAYER_SHARES:
                count = max(1, round(share * rows))
                active = torch.randperm(rows, device=device)[:count].sort()[0]
                run = functools.partial(_layer_backward, layer, x, grad, active, device=device)
                times = _interleaved(
                    {"full": functools.partial(run, None), "split": functools.partial(run, True)},
                    args.rounds,
                    args.warmup,
                )
                full, split = (statistics.median(times[k]) for k in ("full", "split"))
                rule = "split" if split_pays(layer, count, x, output) else "full"
                print(
                    f"{name + '.' + layer_name:22} {'×'.join(map(str, x.shape)):>16} {rows:5d} "
                    f"{count:6d} {1e3 * full:11.3f} {1e3 * split:9.3f} {split / full:10.2f} "
                    f"{rule:>6}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 100])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (quieter when 1)")
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--layers", action="store_true", help="also time single layers")
    parser.add_argument("--channels-last", action="store_true",
                        help="conv weights in NHWC layout (train.channels_last)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"NEq skip_frozen_grads vs full backward — {label}, torch {torch.__version__}, "
        f"{args.threads} thread(s), medians of {args.rounds} interleaved rounds"
        + (", channels-last" if args.channels_last else "")
    )
    print(
        f"{'model':9} {'batch':>5} {'frozen':>6} {'bwd full ms':>11} {'bwd fast ms':>11} "
        f"{'wall':>6} {'CPU':>6} {'(a) §5':>6} {'(b)':>6} {'wall/(b)':>8} {'CPU/(b)':>7} "
        f"{'fwd full ms':>11} {'fwd fast ms':>11}"
    )
    for name in args.models:
        for batch in args.batch:
            for label_, frozen in FROZEN:
                r = bench(name, frozen, batch, args, device)
                wall, cpu = r["wall"], r["cpu"]
                ratios = [
                    f"{v / r['avoidable']:.2f}" if r["avoidable"] else "–" for v in (wall, cpu)
                ]
                print(
                    f"{name:9} {batch:5d} {label_:>6} {1e3 * r['full_bwd']:11.2f} "
                    f"{1e3 * r['fast_bwd']:11.2f} {100 * wall:5.1f}% {100 * cpu:5.1f}% "
                    f"{100 * r['accounted']:5.1f}% {100 * r['avoidable']:5.1f}% {ratios[0]:>8} "
                    f"{ratios[1]:>7} {1e3 * r['full_fwd']:11.2f} {1e3 * r['fast_fwd']:11.2f}"
                )
    print(
        "bwd ms: wall-clock medians; wall, CPU = 1 − median over rounds of fast/full backward "
        "time, wall-clock and CPU time of this thread; (a) = METHODS §5 backward-FLOPs saving; (b) = avoidable share of "
        "the backward FLOPs autograd runs"
    )
    if args.layers:
        for batch in args.batch:
            bench_layers(args.models, batch, args, device)
    print("rerun: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
