"""make_plan and counts_to_offsets: bitwise against reference_plan, the plan's invariants and edge cases."""

import pytest
import torch

from conftest import assert_bitwise_equal, make_generator, random_topk_idx
from fastmoe import ops
from fastmoe.testing import reference_plan

# (num_tokens, k, num_experts, drop_prob)
CASES = [
    pytest.param(30, 2, 8, 0.0, id="T30-k2-E8"),
    pytest.param(17, 3, 5, 0.0, id="T17-k3-E5"),
    pytest.param(12, 4, 4, 0.0, id="T12-k4-E4(k=E)"),
    pytest.param(25, 1, 1, 0.0, id="T25-k1-E1"),
    pytest.param(40, 2, 16, 0.3, id="T40-k2-E16-drops"),
    pytest.param(9, 3, 3, 1.0, id="T9-k3-E3-all-dropped"),
    pytest.param(0, 2, 4, 0.0, id="T0-k2-E4"),
]


def check_plan(plan, topk_idx, num_experts):
    expected = reference_plan(topk_idx.cpu(), num_experts)
    for name, got, want in zip(
        ("expert_counts", "expert_offsets", "sorted_pair", "pair_pos"), plan, expected, strict=True
    ):
        assert got.device == topk_idx.device, name
        assert_bitwise_equal(got, want, name)


@pytest.mark.parametrize("num_tokens,k,num_experts,drop_prob", CASES)
def test_matches_reference_plan(device, num_tokens, k, num_experts, drop_prob):
    topk_idx = random_topk_idx(num_tokens, k, num_experts, make_generator(1), drop_prob, device=device)
    plan = ops.make_plan(topk_idx, num_experts)
    assert isinstance(plan, ops.Plan)
    assert plan.expert_counts.shape == (num_experts,)
    assert plan.expert_offsets.shape == (num_experts + 1,)
    assert plan.sorted_pair.shape == (num_tokens * k,)
    assert plan.pair_pos.shape == (num_tokens, k)
    assert all(t.dtype == torch.int64 for t in plan)
    check_plan(plan, topk_idx, num_experts)


@pytest.mark.parametrize("num_tokens,k,num_experts,drop_prob", CASES)
def test_plan_invariants(num_tokens, k, num_experts, drop_prob):
    """Counts, offsets, a stable expert-ordered permutation, pair_pos its inverse, -1 tails, dropped slots."""
    topk_idx = random_topk_idx(num_tokens, k, num_experts, make_generator(2), drop_prob)
    counts, offsets, sorted_pair, pair_pos = ops.make_plan(topk_idx, num_experts)
    flat = topk_idx.reshape(-1)
    assert counts.tolist() == [int((flat == e).sum()) for e in range(num_experts)]
    assert offsets[0] == 0 and (offsets[1:] - offsets[:-1] == counts).all()
    routed = int(offsets[-1])
    assert routed == int((flat >= 0).sum())
    head, tail = sorted_pair[:routed], sorted_pair[routed:]
    assert (tail == -1).all()
    for e in range(num_experts):
        block = head[offsets[e] : offsets[e + 1]]
        assert (flat[block] == e).all()
        assert (block[1:] > block[:-1]).all(), "pairs inside an expert must keep their order (stable)"
    flat_pos = pair_pos.reshape(-1)
    assert (flat_pos[flat < 0] == -1).all()
    assert (sorted_pair[flat_pos[flat >= 0]] == torch.nonzero(flat >= 0).reshape(-1)).all()


def test_hand_written_example():
    topk_idx = torch.tensor([[2, 0], [0, -1], [2, 1]])
    counts, offsets, sorted_pair, pair_pos = ops.make_plan(topk_idx, 4)
    assert counts.tolist() == [2, 1, 2, 0]
    assert offsets.tolist() == [0, 2, 3, 5, 5]
    assert sorted_pair.tolist() == [1, 2, 5, 0, 4, -1]
    assert pair_pos.tolist() == [[3, 0], [1, -1], [4, 2]]


def test_every_token_to_one_expert():
    topk_idx = torch.full((11, 1), 2, dtype=torch.int64)
    counts, offsets, sorted_pair, pair_pos = ops.make_plan(topk_idx, 5)
    assert counts.tolist() == [0, 0, 11, 0, 0]
    assert offsets.tolist() == [0, 0, 0, 11, 11, 11]
    assert sorted_pair.tolist() == list(range(11))
    assert pair_pos.reshape(-1).tolist() == list(range(11))


def test_expert_with_no_tokens():
    topk_idx = random_topk_idx(20, 2, 6, make_generator(3))
    topk_idx = torch.where(topk_idx == 3, torch.full_like(topk_idx, -1), topk_idx)
    plan = ops.make_plan(topk_idx, 6)
    assert plan.expert_counts[3] == 0 and plan.expert_offsets[3] == plan.expert_offsets[4]
    check_plan(plan, topk_idx, 6)


def test_more_experts_than_used():
    """num_experts larger than any id used: trailing experts get count 0."""
    topk_idx = random_topk_idx(10, 2, 3, make_generator(4))
    plan = ops.make_plan(topk_idx, 9)
    assert plan.expert_counts[3:].eq(0).all() and plan.expert_offsets[3:].eq(20).all()
    check_plan(plan, topk_idx, 9)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_topk_idx(layout):
    topk_idx = random_topk_idx(14, 3, 7, make_generator(5), drop_prob=0.2)
    view = topk_idx.t().contiguous().t() if layout == "transposed" else torch.stack([topk_idx] * 2, 2)[..., 1]
    assert not view.is_contiguous()
    for got, want in zip(ops.make_plan(view, 7), ops.make_plan(topk_idx, 7), strict=True):
        assert_bitwise_equal(got, want)


def test_deterministic():
    topk_idx = random_topk_idx(50, 2, 8, make_generator(6), drop_prob=0.1)
    for got, want in zip(ops.make_plan(topk_idx, 8), ops.make_plan(topk_idx, 8), strict=True):
        assert_bitwise_equal(got, want)


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0], [7], []], ids=["mixed", "one-zero", "one", "empty"])
def test_counts_to_offsets(device, counts):
    expert_counts = torch.tensor(counts, dtype=torch.int64, device=device)
    offsets = ops.counts_to_offsets(expert_counts)
    assert offsets.device == expert_counts.device and offsets.dtype == torch.int64
    expected = [0]
    for c in counts:
        expected.append(expected[-1] + c)
    assert offsets.tolist() == expected


def test_counts_to_offsets_matches_make_plan():
    plan = ops.make_plan(random_topk_idx(33, 2, 5, make_generator(7), drop_prob=0.2), 5)
    assert_bitwise_equal(ops.counts_to_offsets(plan.expert_counts), plan.expert_offsets)


@pytest.mark.parametrize("op", ["permute", "unpermute_combine", "unpermute_combine_backward"])
def test_ops_reject_a_plan_whose_halves_are_not_inverses(op):
    """permute reads sorted_pair and its backward pair_pos (the combine the other way round): a hand-made plan
    whose halves disagree would give a forward from one and a backward from the other, so the ops refuse it."""
    topk_idx = torch.tensor([[0, 1], [1, 0], [0, -1]])
    plan = ops.make_plan(topk_idx, 2)
    swapped = plan.sorted_pair.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # rows 0 and 1 exchange pairs in sorted_pair only
    x, rows, score = torch.randn(3, 4), torch.randn(6, 4), torch.rand(3, 2)
    calls = {
        "permute": lambda sp: torch.ops.fastmoe.permute(x, sp, plan.pair_pos),
        "unpermute_combine": lambda sp: torch.ops.fastmoe.unpermute_combine(rows, sp, plan.pair_pos, score),
        "unpermute_combine_backward": lambda sp: torch.ops.fastmoe.unpermute_combine_backward(
            x, rows, sp, plan.pair_pos, score, True
        ),
    }
    calls[op](plan.sorted_pair)  # the plan make_plan wrote is accepted
    with pytest.raises(RuntimeError, match=r"sorted_pair and pair_pos are not inverses: pair_pos\[\d, \d\] = \d"):
        calls[op](swapped)
