"""measure_latency: round-robin medians; the CPU clock leaves out time spent off the CPU."""

import time

import pytest
import torch
from torch import nn

from neuronwise.latency import measure_latency


class Sleeper(nn.Module):
    """Waits without computing: wall time passes, the process uses (almost) no CPU."""

    def forward(self, x):
        time.sleep(0.02)
        return x


def test_cpu_clock_leaves_out_time_off_the_cpu():
    x = torch.zeros(1)
    (wall,) = measure_latency([Sleeper()], x, repeats=3, warmup=0)
    (cpu,) = measure_latency([Sleeper()], x, repeats=3, warmup=0, clock="cpu")
    assert wall >= 0.02  # sleep never returns early
    assert cpu < 0.01


def test_models_are_timed_in_eval_mode_and_restored():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(self.training)
            return x

    probe = Probe().train()
    assert len(measure_latency([probe, Probe()], torch.zeros(1), repeats=2, warmup=1)) == 2
    assert seen == [False] * 6 and probe.training  # 1 + 2 rounds of two models


def test_invalid_clock_and_repeats():
    with pytest.raises(ValueError, match="clock"):
        measure_latency([nn.Identity()], torch.zeros(1), clock="gpu")
    with pytest.raises(ValueError, match="repeats"):
        measure_latency([nn.Identity()], torch.zeros(1), repeats=0)
