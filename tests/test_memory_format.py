"""``train.channels_last``: NHWC conv weights in the trainer, and every method on NHWC tensors.

A ReLU net's gradient is discontinuous: the floating-point reordering of NHWC kernels can flip a
pre-activation within ~1e-6 of zero and change a training trajectory. So runs in the two layouts
are not compared end to end; instead the methods' updates are compared on identical inputs (small
batches, where no pre-activation lies that close to zero), and NHWC runs must resume exactly.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import neuronwise as nw
from neuronwise.experiment import trainer as trainer_module
from neuronwise.experiment.cli import main
from neuronwise.experiment.tools import simplify_run

CONV = ["model.name=resnet20", "data.batch_size=128", "train.threads=1", "pruning.schedule=none"]
METHODS = {
    "none": ["method=none"],
    "lobster": ["method=lobster", "lobster.lam=1e-3"],
    "serene": ["method=serene", "serene.lam=1e-3"],
    "neq": ["method=neq", "neq.val_size=0.05", "neq.eps=0.05", "neq.skip_frozen_grads=true"],
}


def run(run_dir, *settings, resume=False):
    flags = [x for s in (*CONV, *settings) for x in ("--set", s)]
    return main(["quickstart", "--run-dir", str(run_dir), *flags] + (["--resume"] if resume else []))


def final_state(run_dir):
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


def test_conv_weights_train_in_nhwc(tmp_path, monkeypatch):
    seen = []
    run_epoch = trainer_module.Trainer._run_epoch

    def record_layout(self, epoch):
        weight = self.model.get_submodule("conv1").weight  # resnet20's stem
        seen.append(weight.is_contiguous(memory_format=torch.channels_last))
        return run_epoch(self, epoch)

    monkeypatch.setattr(trainer_module.Trainer, "_run_epoch", record_layout)
    assert run(tmp_path / "nhwc", "train.epochs=2", "train.channels_last=true") == 0
    assert seen == [True, True]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_resumes_exactly_in_nhwc(tmp_path, method):
    whole, split = tmp_path / "whole", tmp_path / "split"
    settings = [*METHODS[method], "train.channels_last=true"]
    assert run(whole, *settings, "train.epochs=2") == 0
    assert run(split, *settings, "train.epochs=1") == 0
    assert run(split, *settings, "train.epochs=2", resume=True) == 0
    a, b = final_state(whole), final_state(split)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_may_switch_the_layout(tmp_path):
    assert run(tmp_path, "train.epochs=1") == 0
    assert run(tmp_path, "train.epochs=2", "train.channels_last=true", resume=True) == 0
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]


def _twins():
    """A LeNet-5 and its NHWC copy, and a small batch (no pre-activation near zero)."""
    torch.manual_seed(0)
    nchw = nw.models.create("lenet5", num_classes=10)
    nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    return nchw, nhwc, x, y


def _assert_same_parameters(nchw, nhwc):
    for (name, a), b in zip(nchw.named_parameters(), nhwc.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("method", ["lobster", "serene-lower-bound", "serene-full"])
def test_regularizer_steps_agree_across_layouts(method):
    nchw, nhwc, x, y = _twins()
    for model in (nchw, nhwc):
        if method == "lobster":
            regularizer = nw.Lobster(model, lam=0.1)
        else:
            regularizer = nw.SeReNe(model, lam=0.1, variant=method.removeprefix("serene-"))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            optimizer.zero_grad()
            logits = model(x)
            F.cross_entropy(logits, y).backward(retain_graph=method != "lobster")
            if method != "lobster":
                regularizer.compute(logits)
            optimizer.step()
            regularizer.step()
    assert nhwc.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    _assert_same_parameters(nchw, nhwc)


def test_neq_freezes_the_same_neurons_across_layouts():
    nchw, nhwc, x, y = _twins()
    probe = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    frozen = []
    for model in (nchw, nhwc):
        neq = nw.NEq(model, probe, eps=0.05, skip_frozen_grads=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        neq.attach(optimizer)
        neq.step()
        for _ in range(3):
            for _ in range(2):
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
            neq.step()
        frozen.append({name: mask.clone() for name, mask in neq.frozen.items()})
    assert frozen[0].keys() == frozen[1].keys()
    assert all(torch.equal(frozen[0][k], frozen[1][k]) for k in frozen[0])
    assert any(mask.any() for mask in frozen[0].values())  # something was frozen
    _assert_same_parameters(nchw, nhwc)


def test_simplify_times_conv_nets_in_both_layouts(tmp_path):
    assert run(tmp_path, "train.epochs=1", "method=serene", "serene.lam=0.05",
               "pruning.schedule=plateau", "pruning.patience=0", "pruning.granularity=neurons") == 0
    out = simplify_run(tmp_path, repeats=2)
    summary = json.loads((tmp_path / "simplify.json").read_text())
    for layout in ("", "channels_last_"):
        for batch in (1, 256):
            timing = summary[f"latency_{layout}batch{batch}_ms"]
            assert timing["dense"] > 0 and timing["simplified"] > 0
    assert "latency channels last batch 256" in out
