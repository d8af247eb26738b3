"""The hierarchical exchange (torch.ops.fastmoe.exchange_hierarchical, FMoE(ep_exchange=...)) over gloo at W = 4,
treated as 2 nodes of 2 ranks (and as 4 x 1 and 1 x 4): bit for bit the flat exchange, forward and backward.
The bodies (hierarchical_cases.py) run in one set of 4 processes; each test reads its part of the results."""

import hierarchical_cases
import pytest
from dist_harness import run_workers

import fastmoe


@pytest.fixture(scope="module")
def results():
    return run_workers(4, hierarchical_cases.all_cases, timeout=150.0)


def test_exchange_equals_flat_bitwise_forward_and_backward(results):
    # the comparisons raise in the workers; here: every rank received rows in some case
    assert all(per_rank["exchange"] > 0 for per_rank in results)


def test_layer_equals_flat_layer(results):
    """Fused experts, and module experts with ep_chunks=2; rank 1 has no tokens. The hierarchical layers (given
    ep_local_size=2, and ep_exchange='auto' with LOCAL_WORLD_SIZE=2) equal the flat one bit for bit in the workers."""
    for per_rank in results:
        assert per_rank["layers"] == [[("flat", None), ("hierarchical", 2), ("hierarchical", 2)]] * 2


def test_bad_arguments_raise_naming_them(results):
    for per_rank in results:
        messages = per_rank["bad arguments"]
        assert "ep_local_size=3 must divide the 4 ranks" in messages["local size"]
        assert "ep_local_size=3 must divide the 4 ranks" in messages["local size auto"]
        assert "local_size=3 must divide the 4 ranks" in messages["groups"]
        assert "node_group '0' has 4 ranks and rail_group" in messages["group sizes"]
        assert "needs node_group and rail_group, got node_group=''" in messages["empty group"]
        assert "got 2" in messages["splits"] and "world_size=4" in messages["splits"]
        assert "peer_counts must be [2, node peers, nodes] int64 on the CPU, got [2, 3]" in messages["peer counts"]


def test_bad_exchange_choice_raises_on_one_process():
    with pytest.raises(ValueError, match="ep_exchange must be 'flat', 'hierarchical' or 'auto', got ep_exchange='ri"):
        fastmoe.FMoE(2, 8, ep_exchange="ring")
    with pytest.raises(ValueError, match="ep_exchange='hierarchical' needs expert parallelism"):
        fastmoe.FMoE(2, 8, ep_exchange="hierarchical")
    with pytest.raises(ValueError, match="ep_local_size must be >= 1, got ep_local_size=0"):
        fastmoe.FMoE(2, 8, ep_local_size=0)
    assert fastmoe.FMoE(2, 8).ep_exchange == "flat"  # auto on one process
