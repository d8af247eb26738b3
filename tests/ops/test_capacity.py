"""capacity_limit: keeps exactly the highest-scored assignments of each expert, bitwise against a plain PyTorch
reference, deterministic, on every device; edge cases and bad input."""

import pytest
import torch

from conftest import ALL_FLOAT_DTYPES, assert_bitwise_equal, make_generator, mentions, random_topk_idx
from fastmoe import ops


def reference_capacity_limit(topk_idx, topk_score, expert_capacity):
    """Plain PyTorch: per expert, order its pairs by (score descending, NaN last, pair id ascending) with a
    stable sort and keep the first expert_capacity[e]."""
    flat_idx = topk_idx.reshape(-1).cpu()
    score = topk_score.reshape(-1).double().cpu()
    score = torch.where(score == 0, torch.zeros_like(score), score)  # -0 ties with +0
    kept = flat_idx.clone()
    for e in range(expert_capacity.numel()):
        pairs = torch.nonzero(flat_idx == e).flatten()
        if pairs.numel() <= int(expert_capacity[e]):
            continue
        s = score[pairs]
        # Stable sorts: first by score descending with NaN last, pair order kept among equals.
        key = torch.where(torch.isnan(s), torch.full_like(s, float("inf")), -s)
        order = torch.sort(key, stable=True).indices
        kept[pairs[order[int(expert_capacity[e]) :]]] = -1
    dropped = int(((flat_idx >= 0) & (kept < 0)).sum())
    return kept.view_as(topk_idx), dropped


@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(device, dtype, seed):
    gen = make_generator(seed)
    num_tokens, k, num_experts = 97, 3, 6
    topk_idx = random_topk_idx(num_tokens, k, num_experts, gen, drop_prob=0.1)
    # Coarse scores so ties are common and the pair-id tie-break is exercised.
    topk_score = (torch.randint(0, 8, (num_tokens, k), generator=gen).to(dtype) / 8).to(dtype)
    capacity = torch.randint(0, 60, (num_experts,), generator=gen)
    kept, num_dropped = ops.capacity_limit(topk_idx.to(device), topk_score.to(device), capacity.to(device))
    want, want_dropped = reference_capacity_limit(topk_idx, topk_score, capacity)
    assert kept.device.type == device and num_dropped.device.type == device
    assert num_dropped.dim() == 0 and num_dropped.dtype == torch.int64
    assert_bitwise_equal(kept.cpu(), want, "kept_idx")
    assert int(num_dropped) == want_dropped
    # Each expert keeps min(count, capacity) assignments.
    counts = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts)
    kept_counts = torch.bincount(kept.cpu()[kept.cpu() >= 0], minlength=num_experts)
    assert torch.equal(kept_counts, torch.minimum(counts, capacity))


def test_keeps_the_highest_scores_and_breaks_ties_by_position(device):
    # Expert 0 gets pairs 0, 2, 3, 5 with scores .1 .9 .5 .9; capacity 2 keeps the two .9s (pair 2 before 5).
    topk_idx = torch.tensor([[0, 1], [0, 0], [1, 0]])
    topk_score = torch.tensor([[0.1, 0.3], [0.9, 0.5], [0.2, 0.9]])
    kept, num_dropped = ops.capacity_limit(topk_idx.to(device), topk_score.to(device), torch.tensor([2, 1]).to(device))
    assert kept.cpu().tolist() == [[-1, 1], [0, -1], [-1, 0]]
    assert int(num_dropped) == 3


def test_nan_scores_are_dropped_first_and_already_dropped_slots_stay(device):
    topk_idx = torch.tensor([[0, -1], [0, 0]])
    topk_score = torch.tensor([[float("nan"), 5.0], [-1.0, 2.0]])
    kept, num_dropped = ops.capacity_limit(topk_idx.to(device), topk_score.to(device), torch.tensor([2]).to(device))
    assert kept.cpu().tolist() == [[-1, -1], [0, 0]]
    assert int(num_dropped) == 1


@pytest.mark.parametrize(
    "case",
    ["zero-tokens", "zero-capacity", "ample-capacity", "all-to-one-expert", "all-dropped"],
)
def test_edge_cases(device, case):
    gen = make_generator(5)
    num_experts = 4
    topk_idx = random_topk_idx(40, 2, num_experts, gen, drop_prob=0.0)
    capacity = torch.full((num_experts,), 10)
    if case == "zero-tokens":
        topk_idx = topk_idx[:0]
    elif case == "zero-capacity":
        capacity.zero_()
    elif case == "ample-capacity":
        capacity.fill_(1000)
    elif case == "all-to-one-expert":
        topk_idx.fill_(2)
    elif case == "all-dropped":
        topk_idx.fill_(-1)
    topk_score = torch.rand(topk_idx.shape, generator=gen)
    kept, num_dropped = ops.capacity_limit(topk_idx.to(device), topk_score.to(device), capacity.to(device))
    want, want_dropped = reference_capacity_limit(topk_idx, topk_score, capacity)
    assert_bitwise_equal(kept.cpu(), want, "kept_idx")
    assert int(num_dropped) == want_dropped


def test_deterministic_and_non_contiguous(device):
    gen = make_generator(9)
    topk_idx = random_topk_idx(64, 4, 8, gen, drop_prob=0.2)
    topk_score = torch.rand(4, 64, generator=gen).t()  # non-contiguous view
    capacity = torch.full((8,), 12)
    first = ops.capacity_limit(topk_idx.to(device), topk_score.to(device), capacity.to(device))[0]
    second = ops.capacity_limit(topk_idx.to(device), topk_score.contiguous().to(device), capacity.to(device))[0]
    assert_bitwise_equal(first, second, "kept_idx")


def test_scores_keep_their_gradient_path():
    topk_idx = torch.tensor([[0, 1], [0, 1]])
    topk_score = torch.rand(2, 2, requires_grad=True)
    kept, _ = ops.capacity_limit(topk_idx, topk_score, torch.tensor([1, 1]))
    assert not kept.requires_grad
    (topk_score * (kept >= 0)).sum().backward()
    assert topk_score.grad is not None


IDX = torch.tensor([[0, 1]])
SCORE = torch.rand(1, 2)
CAP = torch.tensor([1, 1])


@pytest.mark.parametrize(
    "args, match",
    [
        ((IDX.int(), SCORE, CAP), mentions("topk_idx", "Int")),
        ((torch.tensor([0, 1]), torch.rand(2), torch.tensor([1, 1])), mentions("topk_idx", "[2]")),
        ((torch.tensor([[0, 1]]), torch.rand(1, 3), torch.tensor([1, 1])), mentions("topk_score", "[1, 3]")),
        ((IDX, torch.ones(1, 2, dtype=torch.long), CAP), mentions("topk_score", "Long")),
        ((torch.tensor([[0, 1]]), torch.rand(1, 2), torch.tensor([1.0, 1.0])), mentions("expert_capacity", "Float")),
        ((torch.tensor([[0, 1]]), torch.rand(1, 2), torch.tensor([[1, 1]])), mentions("expert_capacity", "[1, 2]")),
        ((IDX, SCORE, torch.tensor([], dtype=torch.long)), mentions("expert_capacity", "[0]")),
        ((torch.tensor([[0, 2]]), torch.rand(1, 2), torch.tensor([1, 1])), mentions("expert id", "2")),
        ((torch.tensor([[0, -2]]), torch.rand(1, 2), torch.tensor([1, 1])), mentions("expert id", "-2")),
        ((torch.tensor([[0, 1]]), torch.rand(1, 2), torch.tensor([1, -3])), mentions("expert_capacity[1]", "-3")),
        ((IDX, SCORE.to("meta"), CAP), mentions("topk_score", "meta")),
    ],
    ids=[
        "idx-int32",
        "idx-1d",
        "score-shape",
        "score-int",
        "capacity-float",
        "capacity-2d",
        "capacity-empty",
        "id-too-large",
        "id-below-minus-one",
        "capacity-negative",
        "device-mismatch",
    ],
)
def test_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        ops.capacity_limit(*args)
