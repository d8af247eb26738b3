"""route_topk: ids, scores and gradients against torch.topk/softmax references, ties, edge cases."""

import pytest
import torch

from conftest import (
    LOW_PRECISION_DTYPES,
    assert_bitwise_equal,
    assert_within_policy,
    distinct_logits,
    grads,
    leaf,
    make_generator,
    randn,
)
from fastmoe import ops
from fastmoe.testing import reference_route_topk

SCORE_FNS = ["topk_softmax", "softmax_topk"]

# (num_tokens, num_experts, k): plain, E not a multiple of 8, k = E, one expert, top-1 of many.
SHAPES = [
    pytest.param(37, 8, 2, id="T37-E8-k2"),
    pytest.param(20, 13, 3, id="T20-E13-k3"),
    pytest.param(16, 4, 4, id="T16-E4-k4(k=E)"),
    pytest.param(9, 1, 1, id="T9-E1-k1"),
    pytest.param(40, 6, 1, id="T40-E6-k1"),
]


def torch_route_topk(logits: torch.Tensor, k: int, score_fn: str):
    """The plain-PyTorch routing (torch.topk + torch.softmax), in the dtype of ``logits``."""
    if score_fn == "topk_softmax":
        values, idx = torch.topk(logits, k, dim=-1)
        return idx, torch.softmax(values, dim=-1)
    values, idx = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
    return idx, values


@pytest.mark.parametrize("score_fn", SCORE_FNS)
@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
@pytest.mark.parametrize("num_tokens,num_experts,k", SHAPES)
def test_matches_torch_reference(device, dtype, score_fn, num_tokens, num_experts, k):
    gen = make_generator(1)
    logits = distinct_logits(num_tokens, num_experts, gen, dtype=dtype, device=device)
    grad_score = randn(num_tokens, k, gen=gen, dtype=dtype, device=device)

    logits_op, logits_lp, logits_64 = leaf(logits), leaf(logits), leaf(logits.double())
    idx, score = ops.route_topk(logits_op, k, score_fn)
    _, score_lp = torch_route_topk(logits_lp, k, score_fn)
    idx_64, score_64 = torch_route_topk(logits_64, k, score_fn)

    assert idx.dtype == torch.int64 and score.dtype == dtype
    assert idx.device == logits.device and score.device == logits.device
    assert_bitwise_equal(idx, idx_64, "topk_idx")
    assert_within_policy(score, score_64, score_lp, "topk_score")

    (grad_op,) = grads(score, [logits_op], grad_score)
    (grad_lp,) = grads(score_lp, [logits_lp], grad_score)
    (grad_64,) = grads(score_64, [logits_64], grad_score.double())
    assert_within_policy(grad_op, grad_64, grad_lp, "grad_logits")


@pytest.mark.parametrize("num_experts", [64, 128])
def test_softmax_topk_fp32_many_experts(num_experts):
    """softmax_topk in fp32 at realistic expert counts (the "fine" benchmark has E = 64) meets the policy.

    The full softmax over E logits is where a sequential fp32 sum loses accuracy against PyTorch's vectorised
    one, so this is checked at E >= 64, with gaussian logits as a real gate produces them."""
    gen = make_generator(11)
    logits = randn(64, num_experts, gen=gen, dtype=torch.float32)
    grad_score = randn(64, 2, gen=gen, dtype=torch.float32)
    logits_op, logits_lp, logits_64 = leaf(logits), leaf(logits), leaf(logits.double())
    idx, score = ops.route_topk(logits_op, 2, "softmax_topk")
    idx_64, score_64 = torch_route_topk(logits_64, 2, "softmax_topk")
    _, score_lp = torch_route_topk(logits_lp, 2, "softmax_topk")
    assert_bitwise_equal(idx, idx_64, "topk_idx")
    assert_within_policy(score, score_64, score_lp, "topk_score")
    (grad_op,) = grads(score, [logits_op], grad_score)
    (grad_lp,) = grads(score_lp, [logits_lp], grad_score)
    (grad_64,) = grads(score_64, [logits_64], grad_score.double())
    assert_within_policy(grad_op, grad_64, grad_lp, "grad_logits")


@pytest.mark.parametrize("score_fn", SCORE_FNS)
@pytest.mark.parametrize("num_tokens,num_experts,k", [(6, 5, 1), (6, 5, 2), (5, 7, 3), (4, 4, 4), (3, 1, 1)])
def test_gradcheck_fp64(score_fn, num_tokens, num_experts, k):
    logits = leaf(distinct_logits(num_tokens, num_experts, make_generator(2)))
    assert torch.autograd.gradcheck(lambda x: ops.route_topk(x, k, score_fn)[1], (logits,))


@pytest.mark.parametrize("score_fn", SCORE_FNS)
def test_matches_shipped_reference_fp64(score_fn):
    logits = distinct_logits(30, 6, make_generator(3))
    idx, score = ops.route_topk(logits, 3, score_fn)
    ref_idx, ref_score = reference_route_topk(logits, 3, score_fn)
    assert_bitwise_equal(idx, ref_idx, "topk_idx")
    torch.testing.assert_close(score, ref_score, rtol=0, atol=1e-15)


@pytest.mark.parametrize("score_fn", SCORE_FNS)
def test_ties_go_to_lower_expert_id(score_fn):
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 2.0, 0.0, 2.0], [3.0, -1.0, 3.0, 3.0, 5.0]])
    idx, score = ops.route_topk(logits, 3, score_fn)
    assert idx.tolist() == [[0, 1, 2], [1, 2, 4], [4, 0, 2]]
    if score_fn == "topk_softmax":
        torch.testing.assert_close(score[0], torch.full((3,), 1 / 3))
    else:
        torch.testing.assert_close(score[0], torch.full((3,), 1 / 5))


def test_nan_ranks_first():
    logits = torch.tensor([[0.0, float("nan"), 1.0, 2.0]])
    idx, _ = ops.route_topk(logits, 2, "topk_softmax")
    assert idx.tolist() == [[1, 3]]


@pytest.mark.parametrize("score_fn", SCORE_FNS)
def test_unselected_logits_gradient(score_fn):
    """topk_softmax gives unselected logits exactly zero gradient; softmax_topk gives them a nonzero one."""
    logits = leaf(distinct_logits(12, 6, make_generator(4)))
    idx, score = ops.route_topk(logits, 2, score_fn)
    (grad,) = grads(score, [logits], torch.randn(12, 2, dtype=torch.float64, generator=make_generator(5)))
    selected = torch.zeros_like(grad, dtype=torch.bool).scatter_(1, idx, True)
    if score_fn == "topk_softmax":
        assert (grad[~selected] == 0).all()
    else:
        assert (grad[~selected] != 0).all()


@pytest.mark.parametrize("score_fn", SCORE_FNS)
def test_zero_tokens(device, score_fn):
    logits = torch.empty(0, 5, device=device, requires_grad=True)
    idx, score = ops.route_topk(logits, 2, score_fn)
    assert idx.shape == (0, 2) and idx.dtype == torch.int64
    assert score.shape == (0, 2) and score.dtype == torch.float32
    (grad,) = grads(score, [logits], torch.empty(0, 2, device=device))
    assert grad.shape == (0, 5)


def test_k_equals_num_experts():
    """With k = E both score functions are the full softmax, sorted, and the ids are a permutation."""
    logits = distinct_logits(15, 6, make_generator(6))
    idx_a, score_a = ops.route_topk(logits, 6, "topk_softmax")
    idx_b, score_b = ops.route_topk(logits, 6, "softmax_topk")
    assert_bitwise_equal(idx_a, idx_b, "topk_idx")
    assert (idx_a.sort(dim=1).values == torch.arange(6)).all()
    expected = torch.softmax(logits, dim=-1).gather(1, idx_a)
    torch.testing.assert_close(score_a, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(score_b, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(score_a.sum(dim=1), torch.ones(15, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("score_fn", SCORE_FNS)
def test_non_contiguous_logits(device, score_fn, layout):
    """A transposed view or a strided slice gives the same ids, scores and gradients as a contiguous copy."""
    gen = make_generator(7)
    base = distinct_logits(13, 11, gen, dtype=torch.float32, device=device)
    grad_score = randn(13, 3, gen=gen, dtype=torch.float32, device=device)
    if layout == "transposed":
        owner = leaf(base.t().contiguous())  # [E, T] storage
        view = owner.t()
    else:
        owner = leaf(torch.stack([base, -base], dim=2))  # [T, E, 2]: the [..., 0] slice has stride 2
        view = owner[..., 0]
    assert not view.is_contiguous()
    contiguous = leaf(base)
    idx_v, score_v = ops.route_topk(view, 3, score_fn)
    idx_c, score_c = ops.route_topk(contiguous, 3, score_fn)
    assert_bitwise_equal(idx_v, idx_c, "topk_idx")
    assert_bitwise_equal(score_v, score_c, "topk_score")
    (grad_v,) = grads(score_v, [view], grad_score)
    (grad_c,) = grads(score_c, [contiguous], grad_score)
    assert_bitwise_equal(grad_v, grad_c, "grad_logits")


@pytest.mark.parametrize("score_fn", SCORE_FNS)
def test_saves_logits_only_where_the_backward_reads_them(device, score_fn):
    """topk_softmax's gradient comes from the scores alone: route_topk keeps only the logits' sizes (one value,
    strides 0) for its backward, so the [T, E] logits are freed with the caller's last use; softmax_topk recomputes
    the probabilities and keeps them whole. route_topk_backward given such a sizes-only tensor for topk_softmax
    gives the gradient it gives with the logits themselves, bit for bit."""
    gen = make_generator(11)
    logits = leaf(distinct_logits(10, 7, gen, dtype=torch.float32, device=device))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        idx, score = ops.route_topk(logits, 3, score_fn)
    kept = [t for t in saved if t.shape == logits.shape]
    assert len(kept) == 1, [tuple(t.shape) for t in saved]
    if score_fn == "topk_softmax":
        assert kept[0].stride() == (0, 0), kept[0].stride()
    else:
        assert kept[0].untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    grad_score = randn(10, 3, gen=gen, dtype=torch.float32, device=device)
    (grad,) = grads(score, [logits], grad_score)
    with torch.no_grad():
        direct = torch.ops.fastmoe.route_topk_backward(grad_score, logits, idx, score, score_fn)
        assert_bitwise_equal(grad, direct, "grad_logits")
        if score_fn == "topk_softmax":
            sizes_only = logits.new_empty(()).expand(logits.shape)
            assert_bitwise_equal(
                torch.ops.fastmoe.route_topk_backward(grad_score, sizes_only, idx, score, score_fn),
                direct,
                "sizes-only logits",
            )


def test_wrapper_is_the_registered_op():
    logits = distinct_logits(7, 5, make_generator(9))
    for score_fn in SCORE_FNS:
        a = ops.route_topk(logits, 2, score_fn)
        b = torch.ops.fastmoe.route_topk(logits, 2, score_fn)
        assert_bitwise_equal(a[0], b[0])
        assert_bitwise_equal(a[1], b[1])
