"""Hot-expert replication (FMoE(ep_replicate=...), torch.ops.fastmoe.replicate_experts and plan_replication) over
gloo at W = 2 and 4: the copies and their gradients bit for bit, layers under a skewed router equal to the
unreplicated layer within the numerics policy, a balanced router copies nothing. The bodies (replication_cases.py)
run in one set of processes per W; each test reads its part of the results. The copies alone also run at W = 3,
where the broadcast tree is not full."""

import pytest
import replication_cases
import torch
from dist_harness import run_workers

import fastmoe


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"W{w}")
def results(request):
    return run_workers(request.param, replication_cases.all_cases, timeout=150.0)


def test_copies_equal_the_owners_weights_and_send_gradients_back(results):
    for per_rank in results:  # the comparisons raise in the workers
        assert per_rank["copies"][-1] == [] and len(per_rank["copies"]) == 5


def test_copies_at_three_ranks_where_the_tree_is_not_full():
    # round 1 (step 1): owner -> owner + 1; round 2 (step 2): only the owner sends (to owner + 2), its neighbour
    # would reach past the last rank
    per_rank = run_workers(3, replication_cases.copies_and_their_gradients, timeout=120.0)
    assert per_rank == [[[0], [5], [1, 2], list(range(6)), []]] * 3, per_rank


def test_a_skewed_router_copies_experts_and_keeps_the_result(results):
    for per_rank in results:
        copied = per_rank["layers"]
        for case in ("fp64 chunks=1", "fp64 chunks=2", "fp32"):
            assert copied[case], f"{case}: nothing copied, so the copies' path went untested"
            if len(results) == 4:
                assert 0 in copied[case], f"{case}: copied {copied[case]}, not the hot expert 0"
        assert copied["balanced"] == [], f"a balanced router copied {copied['balanced']}"
    # every rank runs the same policy on the same loads
    assert all(per_rank["layers"] == results[0]["layers"] for per_rank in results)


def test_fastmoes_linear_subclass_copies_and_refusals_name_the_cause(results):
    for per_rank in results:
        copied, messages = per_rank["subclass"]
        assert copied, "the FMoELinear subclass copied nothing under the skewed router"
        assert (
            "has ep_replicate_rates=(1000000000.0, 2000000000.0) but rank 0 has ep_replicate_rates="
            in (messages["rates"])
        ), messages
        assert "experts.htoh4.weight holds (1, 12, 8) here (expected [num_expert=2, ...])" in messages["sharded"]


def test_policy_op_finds_a_hot_expert_that_per_rank_totals_hide():
    # W = 2, 2 experts each; both ranks route 1000 slots, 700 of them to expert 3 (rank 1's)
    load = torch.tensor([[100, 100, 100, 700], [100, 100, 100, 700]])
    assert torch.ops.fastmoe.plan_replication(load, 2, 1e-6, 1e-8, 1e-5, 1) == [3]
    # then expert 0 evens out the compute (1100 and 900 slots become 1000 each), its copy crossing the other way
    assert torch.ops.fastmoe.plan_replication(load, 2, 1e-6, 1e-8, 1e-5, 4) == [0, 3]
    assert torch.ops.fastmoe.plan_replication(load, 2, 1e-6, 1e-8, 1e-5, 0) == []
    assert torch.ops.fastmoe.plan_replication(load, 2, 1e-6, 1e-8, 1e3, 4) == []  # copies too dear
    with pytest.raises(RuntimeError, match=r"load must be \[world, world \* num_local=2\], got \[2, 3\]"):
        torch.ops.fastmoe.plan_replication(load[:, :3], 2, 1e-6, 1e-8, 1e-5, 4)
    with pytest.raises(RuntimeError, match="load must hold integer slot counts, got dtype Float"):
        torch.ops.fastmoe.plan_replication(load.float(), 2, 1e-6, 1e-8, 1e-5, 4)
    with pytest.raises(RuntimeError, match=r"load\[1\]\[0\] must be >= 0, got -1"):
        torch.ops.fastmoe.plan_replication(torch.tensor([[1, 1], [-1, 1]]), 1, 1e-6, 1e-8, 1e-5, 4)


def test_copies_on_one_process_are_the_rows():
    w = torch.arange(12.0).view(4, 3)
    assert torch.equal(torch.ops.fastmoe.replicate_experts(w, [1, 3], 4, ""), w[[1, 3]])
    with pytest.raises(RuntimeError, match=r"experts must be ascending global ids in \[0, 4\), got \[3, 1\]"):
        torch.ops.fastmoe.replicate_experts(w, [3, 1], 4, "")
    with pytest.raises(RuntimeError, match=r"weight must be \[num_local=2, ...\], got \[4, 3\]"):
        torch.ops.fastmoe.replicate_experts(w, [1], 2, "")


def test_bad_replication_arguments_are_named():
    with pytest.raises(ValueError, match="ep_replicate must be a non-negative int, got -1"):
        fastmoe.FMoETransformerMLP(2, 8, 12, ep_replicate=-1)
    with pytest.raises(ValueError, match=r"ep_replicate=1 copies experts between the ranks .* has none"):
        fastmoe.FMoETransformerMLP(2, 8, 12, ep_replicate=1)
    with pytest.raises(ValueError, match=r"ep_replicate_rates must be \(gemm_flops, link_bytes\), .* got \(1.0,\)"):
        fastmoe.FMoETransformerMLP(2, 8, 12, ep_replicate_rates=(1.0,))
    with pytest.raises(ValueError, match=r"ep_replicate_rates must be .* got \(1000000000.0, -1\)"):
        fastmoe.FMoETransformerMLP(2, 8, 12, ep_replicate_rates=(1e9, -1))
    with pytest.raises(ValueError, match=r"ep_replicate_rates must be .* finite numbers, got \(1000000000.0, inf\)"):
        fastmoe.FMoETransformerMLP(2, 8, 12, ep_replicate_rates=(1e9, float("inf")))


def test_rates_without_replication_are_refused(one_rank_group):
    import torch.distributed as dist

    with pytest.raises(
        ValueError, match=r"ep_replicate_rates=\(1000000000.0, 1000000000.0\) prices hot-expert replication"
    ):
        fastmoe.FMoETransformerMLP(2, 8, 12, world_size=1, moe_group=dist.group.WORLD, ep_replicate_rates=(1e9, 1e9))


def test_module_experts_cannot_be_replicated(one_rank_group):
    import torch.distributed as dist

    with pytest.raises(NotImplementedError, match="ep_replicate=1 copies the weights of fused experts"):
        fastmoe.FMoE(
            2, 8, world_size=1, moe_group=dist.group.WORLD, expert=lambda d: torch.nn.Linear(d, d), ep_replicate=1
        )
