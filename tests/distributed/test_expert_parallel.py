"""Expert parallelism across processes: gloo on CPU (always), NCCL on GPUs (when there are enough of them).

Each test spawns W ranks (tests/distributed/dist_harness.py) running a body from ep_cases.py, which compares the
expert-parallel layer with a single-process layer holding every expert with the same weights."""

import ep_cases
import pytest
import torch
from dist_harness import run_workers

import fastmoe


def _nccl_skip_reason(world: int):
    if not torch.cuda.is_available():
        return "NCCL runs need CUDA devices; none here"
    if torch.cuda.device_count() < world:
        return f"NCCL at world size {world} needs {world} GPUs, found {torch.cuda.device_count()}"
    if not fastmoe.with_cuda:
        return "this fastmoe build has no CUDA ops"
    return None


def backends(world: int):
    reason = _nccl_skip_reason(world)
    return [
        pytest.param("gloo", id="gloo"),
        pytest.param("nccl", id="nccl", marks=pytest.mark.skipif(reason is not None, reason=reason or "")),
    ]


def run(world, backend, body, *args, timeout=180.0):
    return run_workers(world, body, backend, *args, backend=backend, timeout=timeout)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", backends(2))
def test_exchange_moves_rows_bitwise(world, backend):
    if backend == "nccl" and _nccl_skip_reason(world):
        pytest.skip(_nccl_skip_reason(world))
    received = run(world, backend, ep_cases.exchange_bitwise)
    assert received[world - 1] == 0  # the last rank received nothing, by construction
    assert sum(received) >= 23  # at least the one very uneven split


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", backends(2))
def test_ep_matches_single_process(world, backend):
    if backend == "nccl" and _nccl_skip_reason(world):
        pytest.skip(_nccl_skip_reason(world))
    tokens = [7, 0, 13, 4][:world]  # rank 1 has no tokens
    got = run(world, backend, ep_cases.equivalence, tokens, "naive", True)
    assert got == tokens


@pytest.mark.parametrize("backend", backends(2))
def test_ep_all_tokens_to_one_remote_expert(backend):
    got = run(2, backend, ep_cases.equivalence, [9, 6], "fixed", True)
    assert got == [9, 6]


@pytest.mark.parametrize("backend", backends(2))
def test_ep_module_experts_and_gshard(backend):
    """Per-expert nn.Modules (the Python loop) and a capacity-limited gate across ranks."""
    got = run(2, backend, ep_cases.equivalence, [11, 5], "gshard", False)
    assert got == [11, 5]


def test_config_mismatch_raises_on_every_rank():
    messages = run(2, "gloo", ep_cases.config_mismatch, timeout=30.0)
    for message in messages:
        assert "rank 1 has num_expert=3 but rank 0 has num_expert=2" in message


@pytest.mark.parametrize(
    "world,ep_size", [pytest.param(2, 2, id="ep2"), pytest.param(4, 2, id="dp2xep2"), pytest.param(4, 4, id="ep4")]
)
def test_dp_ep_gradients_after_optimizer_steps(world, ep_size):
    losses = run(world, "gloo", ep_cases.dp_ep_training, ep_size)
    assert len(losses) == world and all(loss == loss for loss in losses)  # finite, one per rank
