"""Expert parallelism across processes: gloo on CPU (always), NCCL on GPUs (when there are enough of them).

Each test spawns W ranks (tests/distributed/dist_harness.py) running a body from ep_cases.py, which compares the
expert-parallel layer with a single-process layer holding every expert with the same weights."""

import ep_cases
import pytest
from dist_harness import nccl_skip_reason, run_workers

from conftest import NN_TESTING_LIB as NN_LIB
from conftest import needs_nn_testing_lib as needs_nn_lib


def backends(world: int):
    reason = nccl_skip_reason(world)
    return [
        pytest.param("gloo", id="gloo"),
        pytest.param("nccl", id="nccl", marks=pytest.mark.skipif(reason is not None, reason=reason or "")),
    ]


def run(world, backend, body, *args, timeout=180.0):
    return run_workers(world, body, backend, *args, backend=backend, timeout=timeout)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", backends(2))
def test_exchange_moves_rows_bitwise(world, backend):
    if backend == "nccl" and nccl_skip_reason(world):
        pytest.skip(nccl_skip_reason(world))
    received = run(world, backend, ep_cases.exchange_bitwise)
    assert received[world - 1] == 0  # the last rank received nothing, by construction
    assert sum(received) >= 23  # at least the one very uneven split


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", backends(2))
def test_ep_matches_single_process(world, backend):
    if backend == "nccl" and nccl_skip_reason(world):
        pytest.skip(nccl_skip_reason(world))
    tokens = [7, 0, 13, 4][:world]  # rank 1 has no tokens
    got = run(world, backend, ep_cases.equivalence, tokens, "naive", True)
    assert got == tokens


@pytest.mark.parametrize("backend", backends(2))
def test_ep_rows_cast_before_the_exchange_under_autocast(backend):
    assert run(2, backend, ep_cases.autocast_early_cast) == [9, 13]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "modules"])
@pytest.mark.parametrize("backend", backends(2))
def test_ep_chunks_match_single_process(backend, fused):
    """ep_chunks=3: the tokens in three chunks, each on its own CUDA stream on GPUs. Rank 1 has two tokens, so
    one of its chunks is empty while rank 0's are not."""
    got = run(2, backend, ep_cases.equivalence, [11, 2], "naive", fused, 2, 2, ep_cases.torch.float64, 3)
    assert got == [11, 2]


@pytest.mark.parametrize("backend", backends(1))
def test_ep_chunks_on_a_one_rank_group(backend):
    """The same on a one-rank group (the exchanges are copies): on one GPU this runs the chunks' streams."""
    assert run(1, backend, ep_cases.equivalence, [37], "naive", True, 2, 4, ep_cases.torch.float64, 2) == [37]


@pytest.mark.parametrize("backend", backends(2))
def test_ep_all_tokens_to_one_remote_expert(backend):
    got = run(2, backend, ep_cases.equivalence, [9, 6], "fixed", True)
    assert got == [9, 6]


@pytest.mark.parametrize("backend", backends(2))
def test_ep_module_experts_on_an_idle_rank(backend):
    assert run(2, backend, ep_cases.module_experts_idle_rank) == [5, 4]


@pytest.mark.parametrize("backend", backends(2))
def test_ep_module_experts_and_gshard(backend):
    """Per-expert nn.Modules (the Python loop) and a capacity-limited gate across ranks."""
    got = run(2, backend, ep_cases.equivalence, [11, 5], "gshard", False)
    assert got == [11, 5]


@pytest.mark.parametrize("backend", backends(2))
def test_config_mismatch_raises_on_every_rank(backend):
    messages = run(2, backend, ep_cases.config_mismatch, timeout=60.0 if backend == "nccl" else 30.0)
    for message in messages:
        assert "rank 1 has num_expert=3 but rank 0 has num_expert=2" in message


@pytest.mark.parametrize(
    "world,ep_size", [pytest.param(2, 2, id="ep2"), pytest.param(4, 2, id="dp2xep2"), pytest.param(4, 4, id="ep4")]
)
@pytest.mark.parametrize("backend", backends(2))
def test_dp_ep_gradients_after_optimizer_steps(world, ep_size, backend):
    if backend == "nccl" and nccl_skip_reason(world):
        pytest.skip(nccl_skip_reason(world))
    losses = run(world, backend, ep_cases.dp_ep_training, ep_size)
    assert len(losses) == world and all(loss == loss for loss in losses)  # finite, one per rank


@needs_nn_lib
@pytest.mark.parametrize("backend", backends(2))
def test_cpp_transformer_mlp_expert_parallel(backend):
    counts = run(2, backend, ep_cases.cpp_transformer_mlp, NN_LIB)
    assert counts == [8, 8]  # y, grad_x and 6 parameter gradients compared on each rank


@needs_nn_lib
def test_cpp_config_mismatch_raises_on_every_rank():
    messages = run(2, "gloo", ep_cases.cpp_transformer_mlp, NN_LIB, True, timeout=30.0)
    for message in messages:
        assert "rank 1 has num_experts=3 but rank 0 has num_experts=2" in message


@pytest.mark.parametrize("world", [2, 4])
def test_scored_experts_match_weighted(world):
    """Gated experts applying the routing scores themselves (row_scores, give scored) under expert parallelism,
    with and without hot-expert copies, and with ranks that receive no rows, against the weighted combine: gloo,
    fp64."""
    copied = run(world, "gloo", ep_cases.scored_experts)
    assert all(per_rank[0] == [] and per_rank[2] == [] for per_rank in copied)  # replication off
    assert all(per_rank[1] == copied[0][1] for per_rank in copied)  # one plan on every rank
    assert copied[0][1], "no expert was copied: the replicas' scored path went untested"
