"""FastMoE-style scripts under expert parallelism: 2 ranks on gloo (tests/distributed/dist_harness.py), each
compared with the single-process layer holding every expert (bodies in compat_cases.py)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

import compat_cases  # noqa: E402
from dist_harness import run_workers  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")


def test_custom_expert_with_fastmoe_forward_signature_under_ep():
    rows = run_workers(2, compat_cases.custom_expert_signature)
    assert all(r > 0 for r in rows), rows  # both ranks' experts ran


def test_two_argument_expert_fn_override_under_ep():
    assert run_workers(2, compat_cases.expert_fn_override) == [4, 11]


def test_dict_and_list_inputs_under_ep():
    assert run_workers(2, compat_cases.pytree_inputs) == [7, 3]


def test_dc_gate_counts_capacity_over_the_group():
    (dc0, gshard0), (dc1, gshard1) = run_workers(2, compat_cases.dc_gate)
    # Rank 1's two tokens choose the same experts: its own batch allows one slot per expert (GShardGate), the
    # group's capacity has room for them (DCGate).
    assert dc1 < gshard1, (dc1, gshard1)
    assert dc0 + dc1 != gshard0 + gshard1


def test_allreduce_gradients_takes_fastmoe_options():
    results = run_workers(2, compat_cases.allreduce_options)
    assert results[0] == results[1]
    got = results[0]
    assert got["mean"] == (1.5, 60000.0)  # fp16: divided before the sum, which stays finite
    assert got["sum"] == (3.0, 3000.0)
    assert got["after"][0] == 1.5 and got["after"][1] == float("inf")  # fp16 sum overflows before the division
    assert got["after_fp32"] == (1.5, 60000.0)  # summed in fp32, divided, rounded back once
    assert got["params_alias"] == (3.0, 4.0)
    assert "no_scale" in got["bad"] and "'yes'" in got["bad"]
