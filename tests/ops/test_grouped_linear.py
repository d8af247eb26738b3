"""grouped_linear: forward and gradients against a per-expert matmul, gradcheck, empty experts, tail rows,
layouts and the backward op's output mask."""

import pytest
import torch

from conftest import (
    LOW_PRECISION_DTYPES,
    assert_bitwise_equal,
    assert_within_policy,
    grads,
    leaf,
    make_generator,
    randn,
    reference_grouped_linear,
)
from fastmoe import ops

# (expert counts, tail rows past offsets[E], in_features, out_features)
CASES = [
    pytest.param([5, 0, 7, 3], 4, 13, 9, id="E4-empty-expert-tail4-in13-out9"),
    pytest.param([6, 9], 0, 16, 8, id="E2-in16-out8"),
    pytest.param([10], 0, 8, 16, id="E1-in8-out16"),
    pytest.param([0, 12, 0], 0, 13, 5, id="E3-all-rows-to-one"),
    pytest.param([0, 0], 3, 7, 5, id="E2-only-tail"),
    pytest.param([0, 0, 0], 0, 13, 5, id="E3-zero-rows"),
]


def make_case(counts, tail, in_features, out_features, dtype, device, seed=0):
    """(x [N, in], expert_offsets [E+1], weight [E, out, in], bias [E, out], grad_y [N, out])."""
    gen = make_generator(seed)
    num_rows = sum(counts) + tail
    offsets = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(device)
    x = randn(num_rows, in_features, gen=gen, dtype=dtype, device=device)
    weight = randn(len(counts), out_features, in_features, gen=gen, dtype=dtype, device=device, scale=0.5)
    bias = randn(len(counts), out_features, gen=gen, dtype=dtype, device=device)
    grad_y = randn(num_rows, out_features, gen=gen, dtype=dtype, device=device)
    return x, offsets, weight, bias, grad_y


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
@pytest.mark.parametrize("counts,tail,in_features,out_features", CASES)
def test_matches_reference(device, dtype, use_bias, counts, tail, in_features, out_features):
    x, offsets, weight, bias, grad_y = make_case(counts, tail, in_features, out_features, dtype, device)
    if not use_bias:
        bias = None

    def inputs(cast):
        return [leaf(cast(t)) for t in (x, weight) + ((bias,) if use_bias else ())]

    ins_op, ins_lp, ins_64 = inputs(lambda t: t), inputs(lambda t: t), inputs(torch.Tensor.double)
    y_op = ops.grouped_linear(ins_op[0], offsets, *ins_op[1:])
    y_lp = reference_grouped_linear(ins_lp[0], offsets, *ins_lp[1:])
    y_64 = reference_grouped_linear(ins_64[0], offsets, *ins_64[1:])
    assert y_op.device == x.device
    assert_within_policy(y_op, y_64, y_lp, "y")
    g_op, g_lp, g_64 = (
        grads(y_op, ins_op, grad_y),
        grads(y_lp, ins_lp, grad_y),
        grads(y_64, ins_64, grad_y.double()),
    )
    for name, a, b, c in zip(("grad_x", "grad_weight", "grad_bias")[: len(g_op)], g_op, g_64, g_lp, strict=True):
        assert_within_policy(a, b, c, name)


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("counts,tail", [([3, 0, 4], 2), ([5], 0), ([0, 0], 2)], ids=["mixed", "one", "tail-only"])
def test_gradcheck_fp64(counts, tail, use_bias):
    x, offsets, weight, bias, _ = make_case(counts, tail, 5, 3, torch.float64, "cpu", seed=1)
    inputs = (leaf(x), leaf(weight)) + ((leaf(bias),) if use_bias else ())
    assert torch.autograd.gradcheck(lambda xi, w, *b: ops.grouped_linear(xi, offsets, w, *b or (None,)), inputs)


def test_fp64_matches_reference_closely():
    x, offsets, weight, bias, _ = make_case([4, 0, 6, 2], 3, 13, 7, torch.float64, "cpu", seed=2)
    torch.testing.assert_close(
        ops.grouped_linear(x, offsets, weight, bias),
        reference_grouped_linear(x, offsets, weight, bias),
        rtol=0,
        atol=1e-13,
    )


def test_empty_expert_and_tail(device):
    """An expert with no rows gets exactly zero grad_weight and grad_bias; tail rows give zero output and
    zero grad_x."""
    x, offsets, weight, bias, grad_y = make_case([5, 0, 7, 3], 4, 13, 9, torch.float32, device)
    ins = [leaf(x), leaf(weight), leaf(bias)]
    y = ops.grouped_linear(ins[0], offsets, ins[1], ins[2])
    assert_bitwise_equal(y[15:], torch.zeros(4, 9, device=device), "tail output")
    grad_x, grad_w, grad_b = grads(y, ins, grad_y)
    assert_bitwise_equal(grad_w[1], torch.zeros(9, 13, device=device), "grad_weight of the empty expert")
    assert_bitwise_equal(grad_b[1], torch.zeros(9, device=device), "grad_bias of the empty expert")
    assert_bitwise_equal(grad_x[15:], torch.zeros(4, 13, device=device), "grad_x of the tail")
    assert (grad_w[[0, 2, 3]] != 0).any(dim=(1, 2)).all() and (grad_b[[0, 2, 3]] != 0).any(dim=1).all()


def test_zero_rows_backward(device):
    x, offsets, weight, bias, grad_y = make_case([0, 0, 0], 0, 13, 5, torch.float32, device)
    ins = [leaf(x), leaf(weight), leaf(bias)]
    y = ops.grouped_linear(ins[0], offsets, ins[1], ins[2])
    assert y.shape == (0, 5)
    grad_x, grad_w, grad_b = grads(y, ins, grad_y)
    assert grad_x.shape == (0, 13)
    assert_bitwise_equal(grad_w, torch.zeros_like(weight), "grad_weight")
    assert_bitwise_equal(grad_b, torch.zeros_like(bias), "grad_bias")


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_inputs(device, layout):
    x, offsets, weight, bias, grad_y = make_case([4, 0, 6, 2], 3, 13, 7, torch.float32, device)
    if layout == "transposed":
        x_view = leaf(x.t().contiguous()).t()
        w_view = leaf(weight.transpose(1, 2).contiguous()).transpose(1, 2)
        b_view = leaf(bias.t().contiguous()).t()
        gy_view = grad_y.t().contiguous().t()
    else:
        x_view = leaf(torch.stack([x, -x], 2))[..., 0]
        w_view = leaf(torch.stack([-weight, weight], 3))[..., 1]
        b_view = leaf(torch.stack([bias, -bias], 2))[..., 0]
        gy_view = torch.stack([grad_y, -grad_y], 2)[..., 0]
    offsets_view = torch.stack([offsets, offsets], 1)[:, 0]
    assert not any(t.is_contiguous() for t in (x_view, w_view, b_view, gy_view, offsets_view))
    dense = [leaf(x), leaf(weight), leaf(bias)]
    y_view = ops.grouped_linear(x_view, offsets_view, w_view, b_view)
    y_dense = ops.grouped_linear(dense[0], offsets, dense[1], dense[2])
    # The op makes its inputs contiguous first, so both calls run the same GEMMs on the same shapes: bitwise.
    assert_bitwise_equal(y_view, y_dense, "y")
    for name, a, b in zip(
        ("x", "weight", "bias"),
        grads(y_view, [x_view, w_view, b_view], gy_view),
        grads(y_dense, dense, grad_y),
        strict=True,
    ):
        assert_bitwise_equal(a, b, f"grad_{name}")


@pytest.mark.parametrize(
    "needs",
    [(True, False, False), (False, True, False), (False, False, True), (False, True, True)],
    ids=["x", "weight", "bias", "weight+bias"],
)
def test_grads_only_where_required(needs):
    x, offsets, weight, bias, grad_y = make_case([3, 5], 1, 6, 4, torch.float64, "cpu")
    ins = [t.clone().requires_grad_(n) for t, n in zip((x, weight, bias), needs, strict=True)]
    ops.grouped_linear(ins[0], offsets, ins[1], ins[2]).backward(grad_y)
    ref = [leaf(t) for t in (x, weight, bias)]
    reference_grouped_linear(ref[0], offsets, ref[1], ref[2]).backward(grad_y)
    for t, r, n in zip(ins, ref, needs, strict=True):
        if n:
            torch.testing.assert_close(t.grad, r.grad, rtol=0, atol=1e-13)
        else:
            assert t.grad is None


@pytest.mark.parametrize(
    "mask",
    [
        (True, True, True),
        (True, False, False),
        (False, True, False),
        (False, False, True),
        (False, False, False),
    ],
)
def test_backward_op_output_mask(mask):
    """grouped_linear_backward fills the masked-in gradients and returns empty [0] tensors for the others."""
    x, offsets, weight, bias, grad_y = make_case([3, 0, 4], 2, 5, 3, torch.float64, "cpu")
    ref = [leaf(x), leaf(weight), leaf(bias)]
    expected = grads(reference_grouped_linear(ref[0], offsets, ref[1], ref[2]), ref, grad_y)
    got = torch.ops.fastmoe.grouped_linear_backward(grad_y, x, offsets, weight, list(mask))
    for m, g, e in zip(mask, got, expected, strict=True):
        if m:
            torch.testing.assert_close(g, e, rtol=0, atol=1e-13)
        else:
            assert g.shape == (0,)
