"""grouped_linear: forward and gradients against a per-expert matmul, on each CUDA GEMM backend forced in turn,
gradcheck, empty experts, tail rows, layouts and the backward op's output mask."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import (
    CUDA_SKIP_REASON,
    LOW_PRECISION_DTYPES,
    assert_bitwise_equal,
    assert_within_policy,
    deterministic_mode,
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


# FASTMOE_GROUPED_GEMM is read once per process, so a forced backend runs in a child process (as in
# tests/reliability/test_determinism.py). The child runs the forward and backward of the cases the parent saved, in
# torch's sync debug mode (no host synchronisation allowed) and under the profiler (which kernels ran); the parent
# checks the results against the references. Exit code 3: the build has no CUTLASS backend.
_FORCED_BACKEND_SCRIPT = r"""
import sys
import torch
from fastmoe import ops

outputs = []
try:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for x, offsets, weight, bias, grad_y in torch.load(sys.argv[1]):
            leaves = [t.cuda().requires_grad_() for t in (x, weight, bias)]
            offsets, grad_y = offsets.cuda(), grad_y.cuda()
            torch.cuda.set_sync_debug_mode("error")
            y = ops.grouped_linear(leaves[0], offsets, leaves[1], leaves[2])
            y.backward(grad_y)
            # grad_x alone from a NaN stand-in for x (one value, strides 0, as moe_ffn's split backward passes it):
            # a kernel that read x for it would give NaN
            stand_in = torch.full((), float("nan"), dtype=x.dtype, device="cuda").expand(x.shape)
            grad_x = torch.ops.fastmoe.grouped_linear_backward(
                grad_y, stand_in, offsets, leaves[1].detach(), [True, False, False]
            )[0]
            torch.cuda.set_sync_debug_mode("default")
            outputs.append([y.detach().cpu()] + [t.grad.cpu() for t in leaves] + [grad_x.cpu()])
        torch.cuda.synchronize()
except RuntimeError as error:
    if "built without the CUTLASS backend" in str(error):
        sys.exit(3)
    raise
kernels = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
torch.save({"outputs": outputs, "kernels": kernels}, sys.argv[2])
"""

# (expert counts, tail rows, in_features, out_features): widths that are multiples of 8, so that the library
# backends can take every case (csrc/ops/expert_backend.h).
FORCED_BACKEND_CASES = [
    ([37, 0, 64, 5], 7, 40, 72),  # an empty expert, a tail, sizes off the tile grid
    ([0, 12, 0], 0, 16, 8),  # every row to one expert
    ([0, 0], 3, 8, 8),  # every row in the tail: no GEMM tile at all
    ([300, 129, 0, 1000], 5, 264, 520),  # several tiles along every GEMM dimension
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["tiled", "cutlass", "grouped_mm"])
def test_forced_backend_matches_reference(backend, dtype, tmp_path):
    """FASTMOE_GROUPED_GEMM=<backend> on CUDA: the output and every gradient within the policy, tail rows and the
    gradients of empty experts exactly zero, no host synchronisation; grad_x alone, made from a stand-in for x that
    holds one NaN, has the bits of grad_x made with x (x is read only for the weight gradient); the CUTLASS backend's
    setup kernel runs when cutlass is forced and only then, and neither it nor the tiled kernel runs a separate bias
    epilogue kernel (torch._grouped_mm, which the library takes for bf16 on sm_90 and later, does)."""
    if CUDA_SKIP_REASON is not None:
        pytest.skip(CUDA_SKIP_REASON)
    capability = torch.cuda.get_device_capability()
    if backend == "cutlass" and capability != (9, 0):
        pytest.skip(f"the CUTLASS backend runs sm_90a code (compute capability 9.0); this GPU has {capability}")
    cases = [
        make_case(counts, tail, in_features, out_features, dtype, "cpu", seed=seed)
        for seed, (counts, tail, in_features, out_features) in enumerate(FORCED_BACKEND_CASES)
    ]
    torch.save(cases, tmp_path / "cases.pt")
    run = subprocess.run(
        [sys.executable, "-c", _FORCED_BACKEND_SCRIPT, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
        env={**os.environ, "FASTMOE_GROUPED_GEMM": backend},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if backend == "cutlass" and run.returncode == 3:
        pytest.skip("fastmoe was built without the CUTLASS backend (no CUTLASS headers or no sm_90 at build time)")
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    for (counts, tail, in_features, out_features), (x, offsets, weight, bias, grad_y), got in zip(
        FORCED_BACKEND_CASES, cases, result["outputs"], strict=True
    ):
        label = f"E={len(counts)} in={in_features} out={out_features} tail={tail}"
        ins_lp = [leaf(t.cuda()) for t in (x, weight, bias)]
        ins_64 = [leaf(t.double()) for t in (x, weight, bias)]
        y_lp = reference_grouped_linear(ins_lp[0], offsets.cuda(), *ins_lp[1:])
        y_64 = reference_grouped_linear(ins_64[0], offsets, *ins_64[1:])
        expected_64 = [y_64, *grads(y_64, ins_64, grad_y.double())]
        expected_lp = [y_lp, *grads(y_lp, ins_lp, grad_y.cuda())]
        names = ("y", "grad_x", "grad_weight", "grad_bias")
        assert_bitwise_equal(got[4], got[1], f"grad_x from a stand-in for x ({label})")
        for name, a, b, c in zip(names, got[:4], expected_64, expected_lp, strict=True):
            assert_within_policy(a, b, c.cpu(), f"{name} ({label})")
        routed = int(offsets[-1])
        assert_bitwise_equal(got[0][routed:], torch.zeros(tail, out_features, dtype=dtype), f"tail of y ({label})")
        assert_bitwise_equal(got[1][routed:], torch.zeros(tail, in_features, dtype=dtype), f"tail of grad_x ({label})")
        for e in (e for e, count in enumerate(counts) if count == 0):
            assert_bitwise_equal(got[2][e], torch.zeros_like(weight[e]), f"grad_weight of empty expert {e} ({label})")
            assert_bitwise_equal(got[3][e], torch.zeros_like(bias[e]), f"grad_bias of empty expert {e} ({label})")
    setup_ran = any("cutlass_grouped_setup_kernel" in name for name in result["kernels"])
    assert setup_ran == (backend == "cutlass"), f"CUDA kernels that ran: {result['kernels']}"
    # The tiled kernel and CUTLASS add the bias inside the GEMM (CUTLASS in its epilogue): no separate pass over the
    # output. torch._grouped_mm takes no bias, so one pass adds it after.
    if backend != "grouped_mm":
        assert not any("grouped_bias_epilogue" in name for name in result["kernels"]), result["kernels"]


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


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
def test_no_experts(device, dtype):
    """No experts (offsets [0]): every row is past the last expert, so the output and grad_x are zero and the
    weight and bias gradients empty. Widths of 16 and 8 are what the library GEMMs take, which must not be handed
    zero groups."""
    x, offsets, weight, bias, grad_y = make_case([], 6, 16, 8, dtype, device)
    ins = [leaf(x), leaf(weight), leaf(bias)]
    y = ops.grouped_linear(ins[0], offsets, ins[1], ins[2])
    assert_bitwise_equal(y, torch.zeros(6, 8, dtype=dtype, device=device), "output")
    grad_x, grad_w, grad_b = grads(y, ins, grad_y)
    assert_bitwise_equal(grad_x, torch.zeros(6, 16, dtype=dtype, device=device), "grad_x")
    assert grad_w.shape == (0, 8, 16) and grad_b.shape == (0, 8)


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


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
def test_input_gradient_reads_no_input(device, dtype, deterministic):
    """grouped_linear_backward reads x only for the weight gradient: asked for grad_x alone, it gives the same bits
    from a stand-in for x that holds one NaN with strides 0 (what moe_ffn's backward passes after freeing its
    input), on the device's default backend and on the deterministic one (the reference path)."""
    x, offsets, weight, _, grad_y = make_case([37, 0, 64, 5], 7, 40, 72, dtype, device)
    stand_in = torch.full((), float("nan"), dtype=dtype, device=device).expand(x.shape)
    assert stand_in.stride() == (0, 0) and stand_in.isnan().all()
    with deterministic_mode(deterministic):
        expected = torch.ops.fastmoe.grouped_linear_backward(grad_y, x, offsets, weight, [True, True, False])[0]
        got = torch.ops.fastmoe.grouped_linear_backward(grad_y, stand_in, offsets, weight, [True, False, False])
    assert not got[0].isnan().any(), "grad_x read the stand-in's NaN"
    assert_bitwise_equal(got[0], expected, "grad_x from the stand-in")
    assert got[1].shape == (0,) and got[2].shape == (0,)
