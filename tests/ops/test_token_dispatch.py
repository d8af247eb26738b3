"""fastmoe::TokenDispatch's scored experts on one process: row_scores holds each routed row's score (0 on the tail
rows of dropped slots), and experts that scale their rows by it (swiglu's scale) and give their output scored get
the weighted combine's output and gradients. The expert-parallel form, with hot-expert copies, is
tests/distributed/test_expert_parallel.py::test_scored_experts_match_weighted; the layers using it are
tests/integrations."""

import pytest
import torch

from conftest import assert_ways_agree, assert_within_policy, both_ways, make_generator, randn

TokenDispatch = torch.classes.fastmoe.TokenDispatch
T, D, H, E, K = 13, 8, 6, 4, 3


def routing(device, dtype=torch.float64, drop=True, seed=0):
    """[T, K] distinct experts per token with some slots dropped (-1), scores in [0.25, 1.25]."""
    gen = make_generator(seed)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    if drop:
        idx[torch.rand(T, K, generator=gen) < 0.2] = -1
    score = torch.rand(T, K, generator=gen, dtype=torch.float64) + 0.25
    return idx.to(device), score.to(device=device, dtype=dtype)


def weights(device, dtype, seed=1):
    gen = make_generator(seed)
    return randn(E, 2 * H, D, gen=gen, dtype=dtype, device=device), randn(E, D, H, gen=gen, dtype=dtype, device=device)


def test_row_scores_are_the_routed_pairs_scores(device):
    idx, score = routing(device)
    x = randn(T, D, gen=make_generator(2), dtype=torch.float64, device=device)
    tokens = TokenDispatch(x, idx, score, E, 1, "", 1, False, "")
    rows, scores = tokens.rows(0), tokens.row_scores(0)
    assert scores.shape == (rows.shape[0],) and scores.dtype == score.dtype
    offsets = tokens.expert_offsets(0).cpu()
    routed = int(offsets[-1])
    assert routed == int((idx >= 0).sum()) and routed < T * K  # some slots were dropped
    # each routed row is the copy of one token's input; its score is that token's score for that row's expert
    for r in range(routed):
        expert = int(torch.searchsorted(offsets[1:], r, right=True))
        t = int((x == rows[r]).all(dim=1).nonzero()[0])
        (slot,) = (idx[t] == expert).nonzero()[0].tolist()
        assert scores[r] == score[t, slot], f"row {r}: token {t}, expert {expert}"
    assert torch.equal(scores[routed:], torch.zeros_like(scores[routed:]))


@pytest.mark.parametrize("drop", [False, True], ids=["all-routed", "dropped-slots"])
def test_scored_experts_match_weighted_fp64(device, drop):
    """fp64: the two ways agree to rounding in the output and in every gradient (x, scores, both weights)."""
    idx, score = routing(device, drop=drop)
    w_in, w_out = weights(device, torch.float64)
    gen = make_generator(3)
    x = randn(T, D, gen=gen, dtype=torch.float64, device=device)
    grad = randn(T, D, gen=gen, dtype=torch.float64, device=device)
    assert_ways_agree(both_ways(x, idx, score, w_in, w_out, grad), rtol=1e-12, atol=1e-12, what=f"drop={drop}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scored_experts_within_policy_low_precision(device, dtype):
    """In fp32 and bf16 (scores in fp32, as the gates give them) the scored way is as accurate as the weighted one
    (docs/numerics.md: its error against fp64 at most twice the weighted way's), in the output and every
    gradient; the two round the scaled activation instead of the expert's output."""
    idx, score = routing(device, dtype=torch.float32)
    w_in, w_out = weights(device, torch.float64)
    gen = make_generator(4)
    x = randn(T, D, gen=gen, dtype=torch.float64, device=device)
    grad = randn(T, D, gen=gen, dtype=torch.float64, device=device)
    exact = both_ways(x, idx, score.double(), w_in, w_out, grad)[False]
    low = both_ways(x.to(dtype), idx, score, w_in.to(dtype), w_out.to(dtype), grad.to(dtype))
    names = ("y", "grad x", "grad topk_score", "grad w_in", "grad w_out")
    exact_values, weighted_values = (exact[0], *exact[1]), (low[False][0], *low[False][1])
    scored_values = (low[True][0], *low[True][1])
    for name, want, weighted, scored in zip(names, exact_values, weighted_values, scored_values, strict=True):
        assert_within_policy(scored, want, weighted, f"{dtype} {name}")


def test_no_tokens(device):
    idx, score = routing(device)
    x = torch.zeros(0, D, dtype=torch.float64, device=device)
    tokens = TokenDispatch(x, idx[:0], score[:0], E, 1, "", 1, False, "")
    assert tokens.row_scores(0).shape == (0,)


def test_bad_chunk_and_no_replicas(device):
    idx, score = routing(device)
    x = torch.zeros(T, D, dtype=torch.float64, device=device)
    tokens = TokenDispatch(x, idx, score, E, 1, "", 1, False, "")
    with pytest.raises(RuntimeError, match=r"chunk must be in \[0, 1\), got 1"):
        tokens.row_scores(1)
    with pytest.raises(RuntimeError, match="no expert is replicated"):
        tokens.replica_scores()
