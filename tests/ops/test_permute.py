"""permute and unpermute_combine: data movement bitwise, weighted combine and gradients within the policy,
gradcheck, dropped slots, identity, non-contiguous inputs and empty inputs."""

import pytest
import torch

from conftest import (
    ALL_FLOAT_DTYPES,
    LOW_PRECISION_DTYPES,
    assert_bitwise_equal,
    assert_within_policy,
    grads,
    leaf,
    make_generator,
    randn,
    random_topk_idx,
    reference_combine,
    reference_permute,
)
from fastmoe import ops

# (num_tokens, k, num_experts, d, drop_prob)
CASES = [
    pytest.param(24, 2, 4, 16, 0.0, id="T24-k2-E4-d16"),
    pytest.param(19, 3, 5, 13, 0.25, id="T19-k3-E5-d13-drops"),
    pytest.param(10, 4, 4, 8, 0.0, id="T10-k4-E4-d8(k=E)"),
    pytest.param(15, 1, 1, 13, 0.0, id="T15-k1-E1-d13(one-expert)"),
    pytest.param(12, 2, 3, 13, 1.0, id="T12-k2-E3-d13-all-dropped"),
    pytest.param(0, 2, 4, 8, 0.0, id="T0-k2-E4-d8"),
]


def make_case(num_tokens, k, num_experts, d, drop_prob, dtype, device, seed=0):
    """(plan, x [T, d], y_sorted [T*k, d], topk_score [T, k], grad_y [T, d], grad_x_sorted [T*k, d])."""
    gen = make_generator(seed)
    topk_idx = random_topk_idx(num_tokens, k, num_experts, gen, drop_prob, device=device)
    plan = ops.make_plan(topk_idx, num_experts)
    x = randn(num_tokens, d, gen=gen, dtype=dtype, device=device)
    y_sorted = randn(num_tokens * k, d, gen=gen, dtype=dtype, device=device)
    topk_score = torch.softmax(randn(num_tokens, k, gen=gen), dim=-1).to(dtype=dtype, device=device)
    grad_y = randn(num_tokens, d, gen=gen, dtype=dtype, device=device)
    grad_x_sorted = randn(num_tokens * k, d, gen=gen, dtype=dtype, device=device)
    return plan, x, y_sorted, topk_score, grad_y, grad_x_sorted


# ------------------------------------------------------------------------------------------------ permute


@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES)
@pytest.mark.parametrize("num_tokens,k,num_experts,d,drop_prob", CASES)
def test_permute_forward_bitwise(device, dtype, num_tokens, k, num_experts, d, drop_prob):
    plan, x, *_ = make_case(num_tokens, k, num_experts, d, drop_prob, dtype, device)
    x_sorted = ops.permute(x, plan)
    assert x_sorted.device == x.device
    assert_bitwise_equal(x_sorted, reference_permute(x, plan.sorted_pair, k), "x_sorted")


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
@pytest.mark.parametrize("num_tokens,k,num_experts,d,drop_prob", CASES)
def test_permute_backward(device, dtype, num_tokens, k, num_experts, d, drop_prob):
    plan, x, _, _, _, grad_x_sorted = make_case(num_tokens, k, num_experts, d, drop_prob, dtype, device)
    x_op, x_lp, x_64 = leaf(x), leaf(x), leaf(x.double())
    (grad_op,) = grads(ops.permute(x_op, plan), [x_op], grad_x_sorted)
    (grad_lp,) = grads(reference_permute(x_lp, plan.sorted_pair, k), [x_lp], grad_x_sorted)
    (grad_64,) = grads(reference_permute(x_64, plan.sorted_pair, k), [x_64], grad_x_sorted.double())
    assert_within_policy(grad_op, grad_64, grad_lp, "grad_x")


def test_permute_backward_k1_bitwise():
    """With k = 1 the backward is pure data movement (one slot per token): bitwise."""
    plan, x, _, _, _, grad_x_sorted = make_case(21, 1, 4, 13, 0.2, torch.float32, "cpu")
    x_op, x_ref = leaf(x), leaf(x)
    (grad_op,) = grads(ops.permute(x_op, plan), [x_op], grad_x_sorted)
    (grad_ref,) = grads(reference_permute(x_ref, plan.sorted_pair, 1), [x_ref], grad_x_sorted)
    assert_bitwise_equal(grad_op, grad_ref, "grad_x")


@pytest.mark.parametrize("num_tokens,k,num_experts,d,drop_prob", [(7, 2, 3, 5, 0.0), (6, 3, 4, 3, 0.3)])
def test_permute_gradcheck_fp64(num_tokens, k, num_experts, d, drop_prob):
    plan, x, *_ = make_case(num_tokens, k, num_experts, d, drop_prob, torch.float64, "cpu", seed=1)
    assert torch.autograd.gradcheck(lambda inp: ops.permute(inp, plan), (leaf(x),))


# ------------------------------------------------------------------------------------------------ combine


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
@pytest.mark.parametrize("num_tokens,k,num_experts,d,drop_prob", CASES)
def test_combine_matches_reference(device, dtype, num_tokens, k, num_experts, d, drop_prob):
    plan, _, y_sorted, topk_score, grad_y, _ = make_case(num_tokens, k, num_experts, d, drop_prob, dtype, device)
    ins_op = [leaf(y_sorted), leaf(topk_score)]
    ins_lp = [leaf(y_sorted), leaf(topk_score)]
    ins_64 = [leaf(y_sorted.double()), leaf(topk_score.double())]
    y_op = ops.unpermute_combine(ins_op[0], plan, ins_op[1])
    y_lp = reference_combine(ins_lp[0], plan.pair_pos, ins_lp[1])
    y_64 = reference_combine(ins_64[0], plan.pair_pos, ins_64[1])
    assert y_op.device == y_sorted.device
    assert_within_policy(y_op, y_64, y_lp, "y")
    g_op, g_lp, g_64 = (
        grads(y_op, ins_op, grad_y),
        grads(y_lp, ins_lp, grad_y),
        grads(y_64, ins_64, grad_y.double()),
    )
    assert_within_policy(g_op[0], g_64[0], g_lp[0], "grad_y_sorted")
    assert_within_policy(g_op[1], g_64[1], g_lp[1], "grad_topk_score")


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
@pytest.mark.parametrize("num_tokens,k,num_experts,d,drop_prob", CASES)
def test_combine_without_scores(device, dtype, num_tokens, k, num_experts, d, drop_prob):
    plan, _, y_sorted, _, grad_y, _ = make_case(num_tokens, k, num_experts, d, drop_prob, dtype, device)
    y_op_in, y_lp_in, y_64_in = leaf(y_sorted), leaf(y_sorted), leaf(y_sorted.double())
    y_op = ops.unpermute_combine(y_op_in, plan)
    y_lp = reference_combine(y_lp_in, plan.pair_pos)
    y_64 = reference_combine(y_64_in, plan.pair_pos)
    assert_within_policy(y_op, y_64, y_lp, "y")
    (g_op,), (g_lp,) = grads(y_op, [y_op_in], grad_y), grads(y_lp, [y_lp_in], grad_y)
    assert_bitwise_equal(g_op, g_lp, "grad_y_sorted")  # weights of 1: the backward is a permute


@pytest.mark.parametrize(
    "num_tokens,k,num_experts,d,drop_prob", [(7, 2, 3, 5, 0.0), (6, 3, 4, 3, 0.3), (5, 4, 4, 2, 0.0)]
)
def test_combine_gradcheck_fp64(num_tokens, k, num_experts, d, drop_prob):
    plan, _, y_sorted, topk_score, *_ = make_case(num_tokens, k, num_experts, d, drop_prob, torch.float64, "cpu", 2)
    assert torch.autograd.gradcheck(lambda y, s: ops.unpermute_combine(y, plan, s), (leaf(y_sorted), leaf(topk_score)))
    assert torch.autograd.gradcheck(lambda y: ops.unpermute_combine(y, plan), (leaf(y_sorted),))


def test_combine_grads_only_where_required():
    """Only the inputs that require grad receive one, and the score gradient matches the reference."""
    plan, _, y_sorted, topk_score, grad_y, _ = make_case(9, 2, 3, 4, 0.0, torch.float64, "cpu")
    y_in = leaf(y_sorted)
    s_in = topk_score.clone()
    ops.unpermute_combine(y_in, plan, s_in).backward(grad_y)
    assert y_in.grad is not None and s_in.grad is None

    s_in, s_ref = leaf(topk_score), leaf(topk_score)
    ops.unpermute_combine(y_sorted, plan, s_in).backward(grad_y)
    reference_combine(y_sorted, plan.pair_pos, s_ref).backward(grad_y)
    torch.testing.assert_close(s_in.grad, s_ref.grad, rtol=0, atol=1e-14)


def test_combine_without_scores_keeps_no_expert_output(device):
    """Without weights the combine's backward is a permute of grad_y: it saves only the experts' output's sizes
    (one value, strides 0), so that output is freed after the forward; with weights it saves the output, which
    the score gradient reads. Twice backward (create_graph) still works without weights."""
    plan, _, y_sorted, topk_score, grad_y, _ = make_case(19, 3, 5, 13, 0.25, torch.float32, device)

    def saved_by(*args):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = ops.unpermute_combine(*args)
        return out, saved

    def holds(saved, t):
        return any(s.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for s in saved if s.numel())

    y_in = leaf(y_sorted)
    y, saved = saved_by(y_in, plan)
    assert saved, "the combine saved nothing: the hook did not see its saves"
    assert not holds(saved, y_in), "the combine without weights keeps the experts' output for its backward"
    (g,) = torch.autograd.grad(y, [y_in], grad_y, create_graph=True)
    assert_bitwise_equal(g, ops.permute(grad_y, plan), "grad_y_sorted")
    y_weighted = leaf(y_sorted)
    _, saved_weighted = saved_by(y_weighted, plan, leaf(topk_score))
    assert holds(saved_weighted, y_weighted), "the weighted combine must keep the output for the score gradient"


def test_combine_backward_op_direct():
    """unpermute_combine_backward: grad_y_sorted is grad_y permuted and scaled; grad_score is filled only when
    asked for and is an empty [0] tensor otherwise."""
    plan, _, y_sorted, topk_score, grad_y, _ = make_case(9, 2, 3, 5, 0.3, torch.float64, "cpu")
    y_ref, s_ref = leaf(y_sorted), leaf(topk_score)
    expected = grads(reference_combine(y_ref, plan.pair_pos, s_ref), [y_ref, s_ref], grad_y)
    backward = torch.ops.fastmoe.unpermute_combine_backward
    g_rows, g_score = backward(grad_y, y_sorted, plan.sorted_pair, plan.pair_pos, topk_score, True)
    torch.testing.assert_close(g_rows, expected[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(g_score, expected[1], rtol=0, atol=1e-14)
    g_rows_only, g_none = backward(grad_y, y_sorted, plan.sorted_pair, plan.pair_pos, topk_score, False)
    assert_bitwise_equal(g_rows_only, g_rows)
    assert g_none.shape == (0,)


# -------------------------------------------------------------------------------------------- dropped slots


def test_dropped_slots():
    """-1 slots: permute writes zero tail rows, the combine ignores whatever the tail holds, their score and
    tail-row gradients are exactly zero, and x gets gradient only through routed slots."""
    num_tokens, k, d = 16, 3, 13
    plan, x, y_sorted, topk_score, grad_y, grad_x_sorted = make_case(num_tokens, k, 5, d, 0.4, torch.float32, "cpu")
    routed = int(plan.expert_offsets[-1])
    assert 0 < routed < num_tokens * k, "the case must mix routed and dropped slots"
    dropped = plan.pair_pos < 0

    x_sorted = ops.permute(x, plan)
    assert_bitwise_equal(x_sorted[routed:], torch.zeros(num_tokens * k - routed, d), "permute tail")

    clean = y_sorted.clone()
    clean[routed:] = 0
    noisy = y_sorted.clone()
    noisy[routed:] = 1e4
    assert_bitwise_equal(ops.unpermute_combine(noisy, plan, topk_score), ops.unpermute_combine(clean, plan, topk_score))
    assert_bitwise_equal(ops.unpermute_combine(noisy, plan), ops.unpermute_combine(clean, plan))

    y_in, s_in = leaf(noisy), leaf(topk_score)
    ops.unpermute_combine(y_in, plan, s_in).backward(grad_y)
    assert_bitwise_equal(y_in.grad[routed:], torch.zeros(num_tokens * k - routed, d), "grad_y_sorted tail")
    assert (s_in.grad[dropped] == 0).all(), "dropped slots must get zero score gradient"
    assert (s_in.grad[~dropped] != 0).all()

    x_in = leaf(x)
    grad_x_sorted[routed:] = 1e4  # gradient arriving at tail rows must be ignored
    ops.permute(x_in, plan).backward(grad_x_sorted)
    x_ref = leaf(x)
    reference_permute(x_ref, plan.sorted_pair, k).backward(grad_x_sorted)
    torch.testing.assert_close(x_in.grad, x_ref.grad, rtol=0, atol=1e-5)
    fully_dropped = dropped.all(dim=1)
    assert (x_in.grad[fully_dropped] == 0).all()


# ------------------------------------------------------------------------------------------------ identity


@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES)
def test_permute_then_unpermute_is_identity(device, dtype):
    """k = 1, no weights: unpermute(permute(x)) == x bitwise, forward and backward."""
    plan, x, *_ = make_case(29, 1, 6, 13, 0.0, dtype, device)
    x_in = leaf(x)
    y = ops.unpermute_combine(ops.permute(x_in, plan), plan)
    assert_bitwise_equal(y, x, "round trip")
    grad_y = torch.randn(29, 13, generator=make_generator(9)).to(dtype=dtype, device=device)
    (grad_x,) = grads(y, [x_in], grad_y)
    assert_bitwise_equal(grad_x, grad_y, "round trip gradient")


def test_permute_then_unpermute_with_drops():
    """k = 1 with dropped tokens: routed tokens come back unchanged, dropped tokens as zeros."""
    plan, x, *_ = make_case(25, 1, 3, 8, 0.3, torch.float32, "cpu")
    y = ops.unpermute_combine(ops.permute(x, plan), plan)
    kept = (plan.pair_pos[:, 0] >= 0)[:, None]
    assert_bitwise_equal(y, torch.where(kept, x, torch.zeros_like(x)))


def test_every_token_to_one_expert():
    plan_idx = torch.full((12, 1), 1, dtype=torch.int64)
    plan = ops.make_plan(plan_idx, 3)
    x = torch.randn(12, 13, generator=make_generator(3))
    assert_bitwise_equal(ops.permute(x, plan), x)
    score = torch.rand(12, 1, generator=make_generator(4))
    # One slot per token: a single multiply, correctly rounded on both sides, so exact.
    torch.testing.assert_close(ops.unpermute_combine(x, plan, score), x * score, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ layouts


def _strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` (2-D) in a non-contiguous view."""
    if layout == "transposed":
        view = t.t().contiguous().t()
    else:
        view = torch.stack([t, -t], dim=2)[..., 0]
    assert not view.is_contiguous() or t.numel() <= 1
    return view


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_inputs(device, layout):
    plan, x, y_sorted, topk_score, grad_y, grad_x_sorted = make_case(17, 2, 4, 13, 0.2, torch.float32, device)

    x_view, x_dense = _strided(leaf(x), layout), leaf(x)
    assert_bitwise_equal(ops.permute(x_view, plan), ops.permute(x_dense, plan), "permute")
    (g_view,) = grads(ops.permute(x_view, plan), [x_view], _strided(grad_x_sorted, layout))
    (g_dense,) = grads(ops.permute(x_dense, plan), [x_dense], grad_x_sorted)
    assert_bitwise_equal(g_view, g_dense, "permute grad")

    ys_view, s_view = _strided(leaf(y_sorted), layout), _strided(leaf(topk_score), layout)
    ys_dense, s_dense = leaf(y_sorted), leaf(topk_score)
    y_view = ops.unpermute_combine(ys_view, plan, s_view)
    y_dense = ops.unpermute_combine(ys_dense, plan, s_dense)
    assert_bitwise_equal(y_view, y_dense, "combine")
    g_view = grads(y_view, [ys_view, s_view], _strided(grad_y, layout))
    g_dense = grads(y_dense, [ys_dense, s_dense], grad_y)
    assert_bitwise_equal(g_view[0], g_dense[0], "combine grad_y_sorted")
    assert_bitwise_equal(g_view[1], g_dense[1], "combine grad_topk_score")


def test_non_contiguous_plan_tensors():
    plan, x, y_sorted, topk_score, *_ = make_case(11, 3, 4, 5, 0.2, torch.float32, "cpu")
    strided = ops.Plan(
        plan.expert_counts,
        plan.expert_offsets,
        torch.stack([plan.sorted_pair, plan.sorted_pair], 1)[:, 0],
        _strided(plan.pair_pos, "transposed"),
    )
    assert not strided.sorted_pair.is_contiguous()
    assert_bitwise_equal(ops.permute(x, strided), ops.permute(x, plan))
    assert_bitwise_equal(
        ops.unpermute_combine(y_sorted, strided, topk_score),
        ops.unpermute_combine(y_sorted, plan, topk_score),
    )


# ------------------------------------------------------------------------------------------------ empty


def test_zero_tokens(device):
    plan = ops.make_plan(torch.empty(0, 2, dtype=torch.int64, device=device), 4)
    x = torch.empty(0, 13, device=device, requires_grad=True)
    x_sorted = ops.permute(x, plan)
    assert x_sorted.shape == (0, 13)
    score = torch.empty(0, 2, device=device, requires_grad=True)
    y = ops.unpermute_combine(x_sorted, plan, score)
    assert y.shape == (0, 13)
    y.sum().backward()
    assert x.grad.shape == (0, 13) and score.grad.shape == (0, 2)


@pytest.mark.parametrize("num_tokens,k,num_experts,d,drop_prob", CASES)
def test_plan_cut_to_its_routed_rows(num_tokens, k, num_experts, d, drop_prob, device):
    """A plan cut to its routed rows (Plan.first_rows) permutes to exactly those rows, combines from them to the
    full plan's result, and carries the same gradients: no zero tail is materialised."""
    plan, x, y_sorted, topk_score, grad_y, _ = make_case(
        num_tokens, k, num_experts, d, drop_prob, torch.float64, device
    )
    routed = int(plan.expert_offsets[-1])
    cut = plan.first_rows(routed)
    x_full, x_cut = leaf(x), leaf(x)
    full = ops.permute(x_full, plan)
    part = ops.permute(x_cut, cut)
    assert part.shape == (routed, d)
    assert_bitwise_equal(part, full[:routed], "cut permute")
    y_full = ops.unpermute_combine(full * 2, plan, topk_score)
    y_cut = ops.unpermute_combine(part * 2, cut, topk_score)
    assert_bitwise_equal(y_cut, y_full, "combine of the cut plan")
    y_full.backward(grad_y)
    y_cut.backward(grad_y)
    assert_bitwise_equal(x_cut.grad, x_full.grad, "gradient through the cut plan")
