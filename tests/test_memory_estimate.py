"""benchmarks/memory_estimate.py: its estimate of a step's peak memory against the CPU allocator's measured peak."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import memory_estimate  # noqa: E402


@pytest.mark.slow
def test_estimate_is_within_a_factor_of_two_of_a_measured_cpu_peak(tmp_path):
    check = memory_estimate.quick_check(str(tmp_path))
    assert 0.5 <= check["ratio"] <= 2.0, check


def test_grad_checkpointing_keeps_layer_inputs_only():
    stacks = memory_estimate.svitt_stacks(32, 4, 0.7, 32, qa=False)
    plain = memory_estimate.estimate_gib(stacks, 0, 0, 2, False, context=0.0)
    ckpt = memory_estimate.estimate_gib(stacks, 0, 0, 2, True, context=0.0)
    assert ckpt < plain / 3
