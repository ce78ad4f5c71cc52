"""SeReNe, LOBSTER, NEq and PSP-entropy on torchvision's ResNet-18 and MobileNetV3-small under DDP:
torchrun, 2 CPU processes (gloo), a couple of steps each on different data per rank; afterwards
the ranks hold the same parameters, masks, frozen sets and entropies.

The launched workers run this file as a script (``_worker``), with the library objects driven by
hand (no trainer): DDP's gradient averaging, the all-reduced sensitivities, validation losses,
NEq similarities and PSP counts are what must keep the ranks together.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import _assert_identical, _free_port, _launch  # the same launcher

try:
    from neuronwise.integrations.torchvision import models as _torchvision

    _torchvision()
except ImportError as error:
    pytest.skip(f"torchvision not available: {error}", allow_module_level=True)

FAMILIES = ("resnet18", "mobilenet_v3_small")
METHODS = ("serene", "lobster", "neq", "psp")
SIZE = 32  # tiny inputs: both families downsample by 32 and end in global pooling
# One coupled channel group each: ResNet-18's first stream (conv1 and both layer1 blocks' conv2,
# no downsample there); MobileNetV3-small's stem channel, its depthwise conv and SE scale.
STREAMS = {"resnet18": ("conv1", "layer1.0.conv2", "layer1.1.conv2"),
           "mobilenet_v3_small": ("features.0.0", "features.1.block.0.0",
                                  "features.1.block.1.fc2")}


def _data(rank: int, count: int = 2):
    """This rank's own batch: ranks see different samples."""
    generator = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(count, 3, SIZE, SIZE, generator=generator),
            torch.randint(0, 10, (count,), generator=generator))


def _build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(_torchvision(), family)(num_classes=10)


def _train(ddp, optimizer, x, y, regularizer=None, steps: int = 2) -> None:
    import torch.nn.functional as F

    import neuronwise as nw

    for _ in range(steps):
        optimizer.zero_grad()
        logits = ddp(x)
        if isinstance(regularizer, nw.SeReNe):
            regularizer.compute(logits)
        F.cross_entropy(logits, y).backward()
        optimizer.step()
        if regularizer is not None:
            regularizer.step()


def _run(family: str, method: str, rank: int) -> dict:
    """A couple of steps of ``method`` on ``family``; what every rank must agree on."""
    import torch.nn.functional as F
    from torch import nn

    import neuronwise as nw
    from neuronwise import distributed

    model = _build(family)
    stream = [model.get_submodule(name) for name in STREAMS[family]]
    with torch.no_grad():  # channel 5 zeroed in the whole group, channel 6 in all but its last
        for i, layer in enumerate(stream):
            layer.weight[5] = 0
            if i < len(stream) - 1:
                layer.weight[6] = 0
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = _data(rank)
    out: dict = {}

    def evaluate() -> float:
        """1 + the share of zero weights + 0.001 × the loss reduced over ranks (at most 10): on
        a random network the loss alone jumps (a layer going silent, BN statistics of 2-sample
        batches) or stays flat, and the bisection would run to its 1e-10 end (30+ trials); this
        one stops in a few."""
        model.eval()
        with torch.no_grad():
            loss = F.cross_entropy(model(x), y).reshape(1)
            weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
            zeros = sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights)
        model.train()
        return 1 + zeros + 1e-3 * min(float(distributed.all_reduce_mean(loss)), 10.0)

    if method in ("serene", "lobster"):
        convs = (nn.Linear, nn.Conv2d)
        if method == "serene":  # a neuron mask over coupled groups, built through the wrapper
            mask = nw.ParameterMask(ddp, convs, granularity="neurons", example_input=x[:1])
            regularizer = nw.SeReNe(ddp, lam=0.5, mask=mask)
        else:
            regularizer = nw.Lobster(ddp, lam=0.5)
        # Linear/Conv2d weights only (BN γ ≈ 1 would put the first trial far up) and a wide
        # tolerance: a few bisection trials, each a forward and a state restore of the model
        pruner = nw.PruneOnPlateau(model, evaluate, patience=0, tolerance=0.9, modules=convs,
                                   mask=regularizer.mask)
        _train(ddp, optimizer, x, y, regularizer, steps=1)
        result = pruner.step(evaluate())
        out["pruned"] = torch.tensor([result.threshold, result.total - result.remaining])
        _train(ddp, optimizer, x, y, regularizer, steps=1)
        masks = regularizer.mask.masks
        out["masks"] = [m.clone() for m in masks]
        if method == "serene":
            regularizer.remove()
            index = {id(p): i for i, p in enumerate(regularizer.mask.params)}
            out["stream"] = {name: ~masks[index[id(layer.weight)]].flatten(1).any(dim=1)
                             for name, layer in zip(STREAMS[family], stream)}
    elif method == "neq":
        val_inputs = _data(10 + rank, count=2)[0]  # Ξ split across ranks
        neq = nw.NEq(ddp, val_inputs, eps=2e-4)
        neq.attach(optimizer)
        for _ in range(2):  # warm-up epoch, then one epoch with a frozen set
            _train(ddp, optimizer, x, y, steps=1)
            neq.step()
        out["frozen"] = {k: v.clone() for k, v in neq.frozen.items()}
        neq.remove()
    else:
        _train(ddp, optimizer, x, y)
        entropy = nw.psp_entropy(ddp, [(x, y)], num_classes=10)
        out["entropy"] = {name: layer.per_unit for name, layer in entropy.items()}
    out["params"] = {k: v.detach().clone() for k, v in model.named_parameters()}
    return out


def _worker(out: Path) -> int:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        results = {f"{family}/{method}": _run(family, method, rank)
                   for family in FAMILIES for method in METHODS}
        # torch 2.13 aborts at exit when the process group goes under a live DDP wrapper, and
        # a wrapper sits in a reference cycle: only a collection frees it.
        gc.collect()
        live = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel)
                   for o in gc.get_objects())
        torch.save({"results": results, "live_wrappers": live}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    return 0


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_torchvision")
    _launch([f"--master-port={_free_port()}", __file__, out], out)
    saved = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [s["live_wrappers"] for s in saved] == [0, 0]  # none outlived the process group
    return [s["results"] for s in saved]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_ranks_agree_after_training_on_different_data(ranks, family, method):
    key = f"{family}/{method}"
    rank0, rank1 = ranks[0][key], ranks[1][key]
    _assert_identical(rank0, rank1, key)
    if method in ("serene", "lobster"):
        assert rank0["pruned"][1] > 0  # a pruning decision was taken (and taken alike)
    elif method == "neq":
        frozen = torch.cat([f.flatten() for f in rank0["frozen"].values()]).float().mean()
        assert 0 < frozen < 1  # partly frozen sets, so that their equality says something
    else:
        assert len(rank0["entropy"]) > 10
        assert all(torch.isfinite(h).all() for h in rank0["entropy"].values())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_neuron_mask_built_through_the_ddp_wrapper_masks_a_coupled_group_together(ranks,
                                                                                   family):
    """Channel 5, zero in every member, was pruned again and masked in all of them; channel 6,
    alive in the group's last member, is masked in none (its zeroed rows stay free)."""
    masked = [rows.nonzero().flatten().tolist()
              for rows in ranks[0][f"{family}/serene"]["stream"].values()]
    assert masked[0] == masked[1] == masked[2]
    assert 5 in masked[0] and 6 not in masked[0]


if __name__ == "__main__":
    sys.exit(_worker(Path(sys.argv[1])))
