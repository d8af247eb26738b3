"""gelu_backward_bias: GELU's gradient (erf form) for an expert layer's first GEMM output, with that GEMM's bias
gradient summed in the same pass. On the CPU against fp64 within the tolerance policy (docs/numerics.md); on CUDA
bit for bit against the two ops it replaces in moe_ffn's backward (torch's gelu_backward, then grouped_linear's
bias gradient from its result). Experts without rows, rows past the last expert, odd widths, unaligned views, the
Meta kernel, and which ops moe_ffn's backward runs. Bad input is in tests/ops/test_bad_input.py."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import (
    ALL_FLOAT_DTYPES,
    CUDA_SKIP_REASON,
    assert_bitwise_equal,
    assert_within_policy,
    make_generator,
    randn,
    segment_sums,
)
from fastmoe import FMoETransformerMLP

F = torch.ops.fastmoe

# (rows, hidden, expert_offsets): an expert without rows, rows past the last expert with an odd width, more rows than
# the kernel's lanes take in one pass, no rows at all, and no experts (every row past the last one)
CASES = [
    pytest.param(40, 24, [0, 10, 10, 25, 40], id="empty-expert"),
    pytest.param(33, 37, [0, 5, 20, 30], id="tail-odd-width"),
    pytest.param(600, 64, [0, 250, 260, 600], id="many-rows"),
    pytest.param(0, 16, [0, 0, 0], id="no-rows"),
    pytest.param(12, 8, [0], id="no-experts"),
]


def inputs(rows, hidden, dtype, device="cpu", seed=0):
    gen = make_generator(seed)
    grad = randn(rows, hidden, gen=gen, dtype=dtype, device=device)
    h = randn(rows, hidden, gen=gen, dtype=dtype, device=device, scale=2.0)
    return grad, h


@pytest.mark.parametrize("rows, hidden, offsets", CASES)
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES)
def test_cpu_within_policy(rows, hidden, offsets, dtype):
    grad, h = inputs(rows, hidden, dtype)
    grad_h, grad_bias = F.gelu_backward_bias(grad, h, torch.tensor(offsets))
    assert grad_bias.shape == (len(offsets) - 1, hidden) and grad_bias.dtype == dtype
    exact = torch.ops.aten.gelu_backward(grad.double(), h.double())
    if dtype == torch.float64:  # fp64 is its own reference: a few units of its last place
        torch.testing.assert_close(grad_h, exact, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(grad_bias, segment_sums(exact, offsets), rtol=1e-13, atol=1e-14)
    else:
        assert_within_policy(grad_h, exact, torch.ops.aten.gelu_backward(grad, h), "grad_h")
        # the bias gradient against fp64 sums of the exact gradient; PyTorch's, its sums of its own rounded values
        torch_sums = segment_sums(torch.ops.aten.gelu_backward(grad, h), offsets)
        assert_within_policy(grad_bias, segment_sums(exact, offsets), torch_sums, "bias")
    for e, (begin, end) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        if begin == end:
            assert not grad_bias[e].any(), f"expert {e} has no rows but a bias gradient"


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or "")
@pytest.mark.parametrize("rows, hidden, offsets", CASES)
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES)
def test_cuda_gives_the_bits_of_the_ops_it_replaces(rows, hidden, offsets, dtype):
    grad, h = inputs(rows, hidden, dtype, "cuda")
    expert_offsets = torch.tensor(offsets, device="cuda")
    grad_h, grad_bias = F.gelu_backward_bias(grad, h, expert_offsets)
    want_h = torch.ops.aten.gelu_backward(grad, h)
    assert_bitwise_equal(grad_h, want_h, "grad_h")
    # grouped_linear's bias gradient from want_h, alone and beside the GEMMs' gradients (another launch on the
    # library backends); x and the weight are read only by the GEMMs
    gen = make_generator(1)
    x = randn(rows, 16, gen=gen, dtype=dtype, device="cuda")
    weight = randn(len(offsets) - 1, hidden, 16, gen=gen, dtype=dtype, device="cuda")
    for mask in ([False, False, True], [True, True, True]):
        want_bias = F.grouped_linear_backward(want_h, x, expert_offsets, weight, mask)[2]
        assert_bitwise_equal(grad_bias, want_bias, f"bias gradient against grouped_linear_backward {mask}")


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or "")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_unaligned_views_give_the_aligned_bits(dtype):
    """Views that start off a 16-byte boundary are copied first, so the kernel sums in the order it uses for aligned
    rows: the same bits as contiguous inputs."""
    rows, hidden, offsets = 50, 32, torch.tensor([0, 20, 45], device="cuda")
    grad, h = inputs(rows, hidden, dtype, "cuda")
    flat = torch.empty(2 * rows * hidden + 1, dtype=dtype, device="cuda")
    grad_view = flat[1 : 1 + rows * hidden].view(rows, hidden).copy_(grad)
    h_view = flat[1 + rows * hidden :].view(rows, hidden).copy_(h)
    assert grad_view.data_ptr() % 16 != 0 and h_view.data_ptr() % 16 != 0
    got = F.gelu_backward_bias(grad_view, h_view, offsets)
    want = F.gelu_backward_bias(grad, h, offsets)
    assert_bitwise_equal(got[0], want[0], "grad_h")
    assert_bitwise_equal(got[1], want[1], "grad_bias")


def test_meta_shapes():
    grad = torch.empty(20, 12, device="meta", dtype=torch.bfloat16)
    grad_h, grad_bias = F.gelu_backward_bias(grad, grad, torch.empty(6, dtype=torch.long, device="meta"))
    assert grad_h.shape == (20, 12) and grad_bias.shape == (5, 12)
    assert grad_h.dtype == grad_bias.dtype == torch.bfloat16 and grad_h.device.type == "meta"


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", id="cpu"),
        pytest.param(
            "cuda", id="cuda", marks=pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or "")
        ),
    ],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_moe_ffn_backward_sums_the_first_bias_with_gelus_gradient(device, bias):
    """On CUDA with biases the layer's backward makes grad_h and the first bias's gradient in one op; without a bias,
    or on the CPU (whose results stay those of the composed path, bit for bit), torch's gelu_backward runs."""
    torch.manual_seed(0)
    layer = FMoETransformerMLP(4, 16, 32, top_k=2, bias=bias).to(device)
    x = torch.randn(24, 16, device=device, requires_grad=True)
    y = layer(x)
    with _OpNames() as seen:
        y.square().sum().backward()
    fused = device == "cuda" and bias
    assert ("fastmoe.gelu_backward_bias" in seen.names) == fused, seen.names
    assert ("aten.gelu_backward" in seen.names) == (not fused), seen.names
    assert all(p.grad is not None for p in layer.parameters())
