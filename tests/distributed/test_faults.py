"""Distributed faults on gloo: when one rank fails in the middle of a forward or backward pass, or its process
dies, every other rank raises a clear error within FASTMOE_COMM_TIMEOUT instead of hanging."""

import fault_cases
import pytest
from dist_harness import nccl_skip_reason, run_workers

TIMEOUT_S = 5


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("gloo", id="gloo"),
        pytest.param(
            "nccl",
            id="nccl",
            marks=pytest.mark.skipif(nccl_skip_reason(2) is not None, reason=nccl_skip_reason(2) or ""),
        ),
    ],
)
@pytest.mark.parametrize("where", ["forward-linger", "backward-linger", "forward-exit", "backward-exit"])
def test_survivors_raise_within_the_timeout(where, backend):
    world = 3 if where.endswith("linger") and backend == "gloo" else 2
    results = run_workers(world, fault_cases.fail_in_step, backend, where, TIMEOUT_S, timeout=120.0, may_die={1})
    if where.endswith("exit"):
        assert results[1] is None, "rank 1 was to die without a result"
    survivors = [result for result in results if result is not None and result[0] != 1]
    assert len(survivors) == world - 1
    for rank, elapsed, message in survivors:
        assert elapsed < 6 * TIMEOUT_S, f"rank {rank} took {elapsed:.1f} s to raise"
        lowered = message.lower()
        assert any(word in lowered for word in ("timed out", "timeout", "closed", "connection", "aborted")), (
            f"rank {rank}: the error does not say what happened: {message!r}"
        )
