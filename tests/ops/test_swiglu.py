"""swiglu and swiglu_backward: ``h [..., 2 * hidden] = [gate | up]`` -> ``silu(gate) * up``, computed in fp32 (fp64
for fp64) and rounded once; with a row scale (swiglu(h, scale), swiglu_scaled_backward) each row times its
factor. Values and gradients against PyTorch, every rank and empty sizes, views against their contiguous copies,
gradcheck and gradgradcheck, the Meta kernel and torch.compile, and the transformer layer's ``swiglu``. Bad input
is in tests/ops/test_bad_input.py, random cases in tests/fuzz; the one-op layer against the composed one
(activation="swiglu", bit for bit) is tests/nn/test_moe_ffn.py::test_fused_equals_composed."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import fastmoe.transformer
from conftest import (
    LOW_PRECISION_DTYPES,
    assert_bitwise_equal,
    assert_within_policy,
    leaf,
    make_generator,
    randn,
)
from fastmoe import FMoETransformerMLP, ops

# h's shapes: 1-D, 2-D, 3-D, hidden of 1, an odd hidden, and empty ones (no features, no rows, a 0 in the middle)
SHAPES = [
    pytest.param((8,), id="1d"),
    pytest.param((7, 12), id="2d"),
    pytest.param((2, 3, 10), id="3d"),
    pytest.param((5, 2), id="hidden1"),
    pytest.param((33, 2 * 37), id="hidden37"),
    pytest.param((4, 0), id="last-dim-0"),
    pytest.param((0, 6), id="leading-dim-0"),
    pytest.param((2, 0, 6), id="middle-dim-0"),
]


def out_shape(shape) -> tuple:
    return (*shape[:-1], shape[-1] // 2)


def make_h(shape, dtype, device, seed=0, scale=3.0):
    """h with gates over [-3 sigma, 3 sigma], where silu's curvature matters, and a matching grad of the output."""
    gen = make_generator(seed)
    h = randn(*shape, gen=gen, dtype=dtype, device=device, scale=scale)
    grad = randn(*out_shape(shape), gen=gen, dtype=dtype, device=device)
    return h, grad


def torch_swiglu(h: torch.Tensor) -> torch.Tensor:
    """The op's contract in ATen ops: silu(gate) * up in the accumulation type (fp32; fp64 for fp64), rounded once
    to h's dtype."""
    acc = torch.promote_types(h.dtype, torch.float32)
    gate, up = h.to(acc).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(h.dtype)


def torch_swiglu_grad(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`torch_swiglu` for h, by autograd."""
    h = leaf(h)
    (grad_h,) = torch.autograd.grad(torch_swiglu(h), h, grad)
    return grad_h


# ------------------------------------------------------------------------------------------------ values


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_within_policy(device, dtype, shape):
    h, _ = make_h(shape, dtype, device)
    y = ops.swiglu(h)
    assert y.device == h.device and y.is_contiguous()
    same_precision = torch_swiglu(h)
    assert_within_policy(y, torch_swiglu(h.double()), same_precision, "y")
    # Both round one fp32 result: at most one step of the dtype apart (a rounding boundary between them)
    torch.testing.assert_close(y, same_precision)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_fp64(device, shape):
    h, _ = make_h(shape, torch.float64, device)
    y = ops.swiglu(h)
    gate, up = h.chunk(2, dim=-1)
    assert y.dtype == torch.float64 and y.shape == out_shape(shape)
    torch.testing.assert_close(y, F.silu(gate) * up, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_within_policy(device, dtype, shape):
    """The gradient through autograd, and the backward op called on its own (the same kernel: the same bits)."""
    h, grad = make_h(shape, dtype, device)
    h_op = leaf(h)
    (grad_h,) = torch.autograd.grad(ops.swiglu(h_op), h_op, grad)
    assert grad_h.shape == h.shape and grad_h.dtype == dtype
    same_precision = torch_swiglu_grad(grad, h)
    assert_within_policy(grad_h, torch_swiglu_grad(grad.double(), h.double()), same_precision, "grad_h")
    torch.testing.assert_close(grad_h, same_precision)
    assert_bitwise_equal(ops.swiglu_backward(grad, h), grad_h, "swiglu_backward")


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_fp64(device, shape):
    h, grad = make_h(shape, torch.float64, device)
    h_op, h_ref = leaf(h), leaf(h)
    (grad_h,) = torch.autograd.grad(ops.swiglu(h_op), h_op, grad)
    gate, up = h_ref.chunk(2, dim=-1)
    (expected,) = torch.autograd.grad(F.silu(gate) * up, h_ref, grad)
    torch.testing.assert_close(grad_h, expected, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(ops.swiglu_backward(grad, h), expected, rtol=1e-13, atol=1e-14)


def test_gradients_are_not_zero(device):
    """Both halves of h get a gradient of order one (a comparison of zeros proves nothing)."""
    h, grad = make_h((6, 16), torch.float64, device)
    grad_h = ops.swiglu_backward(grad, h)
    assert grad_h[:, :8].abs().max() > 0.1 and grad_h[:, 8:].abs().max() > 0.1


def test_exact_values(device):
    """Points where silu is exact in any precision: silu(0) = 0, and an up of 0 or a gate of 0 zeroes the
    product whatever the other half; the gate's gradient at g = 0 is up / 2 and the up's is silu(0) = 0."""
    h = torch.tensor([[0.0, 0.0, 3.0, -5.0], [2.0, -1.5, 0.0, 0.0]], dtype=torch.float32, device=device)
    torch.testing.assert_close(ops.swiglu(h), torch.zeros(2, 2, device=device), rtol=0, atol=0)
    grad_h = ops.swiglu_backward(torch.ones(2, 2, device=device), h)
    expected = torch.tensor([1.5, -2.5, 0.0, 0.0], device=device)
    torch.testing.assert_close(grad_h[0], expected, rtol=0, atol=0, msg="grad_h at gate 0")


# ------------------------------------------------------------------------------------------------ layouts


def _views(h_contiguous: torch.Tensor):
    """The same values as non-contiguous views: transposed storage, every other column, a slice of wider rows,
    and one row expanded (stride 0)."""
    n, width = h_contiguous.shape
    transposed = h_contiguous.t().contiguous().t()
    strided = torch.zeros(n, 2 * width, dtype=h_contiguous.dtype, device=h_contiguous.device)
    strided[:, ::2] = h_contiguous
    wide = torch.zeros(n, width + 3, dtype=h_contiguous.dtype, device=h_contiguous.device)
    wide[:, 1 : 1 + width] = h_contiguous
    return {
        "transposed": (transposed, h_contiguous),
        "every-other-column": (strided[:, ::2], h_contiguous),
        "sliced-rows": (wide[:, 1 : 1 + width], h_contiguous),
        "expanded-row": (h_contiguous[:1].expand(n, width), h_contiguous[:1].expand(n, width).contiguous()),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_views_equal_contiguous_copies(device, dtype):
    """docs/numerics.md: a view gives the bits of its contiguous copy, forward and backward (a transposed grad
    too)."""
    h_base, grad = make_h((9, 14), dtype, device)
    grad_t = grad.t().contiguous().t()
    for name, (view, copy) in _views(h_base).items():
        assert not view.is_contiguous(), name
        assert_bitwise_equal(ops.swiglu(view), ops.swiglu(copy), f"{name}: y")
        assert_bitwise_equal(ops.swiglu_backward(grad_t, view), ops.swiglu_backward(grad, copy), f"{name}: grad_h")
        v = leaf(view)
        (grad_h,) = torch.autograd.grad(ops.swiglu(v), v, grad_t)
        assert_bitwise_equal(grad_h, ops.swiglu_backward(grad, copy), f"{name}: grad_h through autograd")


# ------------------------------------------------------------------------------------------------ autograd


def test_gradcheck_and_gradgradcheck(device):
    h, _ = make_h((4, 10), torch.float64, device, scale=1.5)
    assert gradcheck(ops.swiglu, (leaf(h),))
    assert gradgradcheck(ops.swiglu, (leaf(h),))


def test_backward_op_gradcheck(device):
    """The backward op itself, in both inputs, so third derivatives are right too."""
    h, grad = make_h((3, 8), torch.float64, device, scale=1.5)
    assert gradcheck(ops.swiglu_backward, (leaf(grad), leaf(h)))
    assert gradgradcheck(ops.swiglu_backward, (leaf(grad), leaf(h)))


def test_second_derivative_equals_torch(device):
    """A gradient penalty: d/dh |d(sum y^2)/dh|^2 against silu(gate) * up in ATen; it is not a silent zero."""
    base, _ = make_h((5, 12), torch.float64, device, scale=1.5)

    def penalty_grad(swiglu):
        h = leaf(base)
        (g,) = torch.autograd.grad(swiglu(h).pow(2).sum(), h, create_graph=True)
        (second,) = torch.autograd.grad(g.pow(2).sum(), h)
        return second

    ours = penalty_grad(ops.swiglu)
    theirs = penalty_grad(lambda h: F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1])
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
def test_recorded_backward_matches_kernel(device, dtype):
    """Under create_graph the backward op runs as ATen ops in the same accumulation type: the kernel's values
    to rounding, and a graph autograd can differentiate."""
    h, grad = make_h((6, 20), dtype, device)
    recorded = ops.swiglu_backward(grad, leaf(h))
    assert recorded.grad_fn is not None
    kernel = ops.swiglu_backward(grad, h)
    assert kernel.grad_fn is None
    torch.testing.assert_close(recorded, kernel)


# ------------------------------------------------------------------------------------------------ Meta, compile


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES + [pytest.param(torch.float64, id="fp64")])
@pytest.mark.parametrize("shape", SHAPES)
def test_meta_kernels_match_real_ones(shape, dtype):
    """Shape, dtype and strides of the Meta kernels' outputs are the CPU kernels', for a transposed h too."""
    h, grad = make_h(shape, dtype, "cpu")
    inputs = [(h, grad)]
    if len(shape) == 2:
        inputs.append((h.t().contiguous().t(), grad.t().contiguous().t()))
    for h_in, grad_in in inputs:
        for real, fake in (
            (ops.swiglu(h_in), ops.swiglu(h_in.to("meta"))),
            (ops.swiglu_backward(grad_in, h_in), ops.swiglu_backward(grad_in.to("meta"), h_in.to("meta"))),
        ):
            assert fake.device.type == "meta"
            assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())
    assert ops.swiglu(h.to("meta")).shape == out_shape(shape)


def test_compile_fullgraph_matches_eager():
    """A function around swiglu compiled as one graph with dynamic shapes (the Meta kernels trace it, the
    autograd kernel gives its backward) equals eager mode in outputs and gradients, for two sizes."""
    torch._dynamo.reset()

    def mlp(x, w_in, w_out):
        return ops.swiglu(x @ w_in.t()) @ w_out.t()

    compiled = torch.compile(mlp, backend="aot_eager", dynamic=True, fullgraph=True)
    gen = make_generator(5)
    w_in, w_out = randn(2 * 6, 4, gen=gen), randn(4, 6, gen=gen)
    for rows in (5, 11):
        x = randn(rows, 4, gen=gen)
        grad_out = randn(rows, 4, gen=gen)
        eager_in = [leaf(t) for t in (x, w_in, w_out)]
        compiled_in = [leaf(t) for t in (x, w_in, w_out)]
        eager_out, compiled_out = mlp(*eager_in), compiled(*compiled_in)
        assert compiled_out.shape == (rows, 4)
        torch.testing.assert_close(compiled_out, eager_out, rtol=0, atol=1e-13)
        eager_grads = torch.autograd.grad(eager_out, eager_in, grad_out)
        compiled_grads = torch.autograd.grad(compiled_out, compiled_in, grad_out)
        for a, b in zip(compiled_grads, eager_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


# ------------------------------------------------------------------------------------------------ a row scale


def make_scale(shape, dtype, device, seed=1):
    """One factor per row of h (h's leading shape), in [0.25, 1.25]: routing scores' range."""
    gen = make_generator(seed)
    return (torch.rand(tuple(shape[:-1]), generator=gen, dtype=torch.float64) + 0.25).to(dtype=dtype, device=device)


def torch_scaled_swiglu(h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The scaled op's contract in ATen ops: silu(gate) * up * scale in the accumulation type, rounded once."""
    acc = torch.promote_types(h.dtype, torch.float32)
    gate, up = h.to(acc).chunk(2, dim=-1)
    return (F.silu(gate) * up * scale.to(acc).unsqueeze(-1)).to(h.dtype)


def scaled_grads(swiglu, grad, h, scale):
    h, scale = leaf(h), leaf(scale)
    return torch.autograd.grad(swiglu(h, scale), (h, scale), grad)


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_scaled_within_policy(device, dtype, shape):
    """Output, grad_h and grad_scale against ATen in fp64 and in the same precision; a float32 scale (the scores'
    usual dtype) for low-precision rows, and the backward op on its own gives autograd's bits."""
    h, grad = make_h(shape, dtype, device)
    scale = make_scale(shape, torch.float32, device)
    y = ops.swiglu(h, scale)
    assert y.shape == out_shape(shape) and y.dtype == dtype and y.is_contiguous()
    same = torch_scaled_swiglu(h, scale)
    assert_within_policy(y, torch_scaled_swiglu(h.double(), scale.double()), same, "y")
    torch.testing.assert_close(y, same)
    grad_h, grad_scale = scaled_grads(ops.swiglu, grad, h, scale)
    assert grad_h.dtype == dtype and grad_scale.dtype == torch.float32 and grad_scale.shape == scale.shape
    want_h, want_scale = scaled_grads(torch_scaled_swiglu, grad.double(), h.double(), scale.double())
    same_h, same_scale = scaled_grads(torch_scaled_swiglu, grad, h, scale)
    assert_within_policy(grad_h, want_h, same_h, "grad_h")
    assert_within_policy(grad_scale, want_scale, same_scale, "grad_scale")
    op_h, op_scale = ops.swiglu_scaled_backward(grad, h, scale)
    assert_bitwise_equal(op_h, grad_h, "swiglu_scaled_backward: grad_h")
    assert_bitwise_equal(op_scale, grad_scale, "swiglu_scaled_backward: grad_scale")


@pytest.mark.parametrize("shape", SHAPES)
def test_scaled_fp64(device, shape):
    h, grad = make_h(shape, torch.float64, device)
    scale = make_scale(shape, torch.float64, device)
    torch.testing.assert_close(ops.swiglu(h, scale), torch_scaled_swiglu(h, scale), rtol=1e-14, atol=1e-15)
    ours = scaled_grads(ops.swiglu, grad, h, scale)
    theirs = scaled_grads(torch_scaled_swiglu, grad, h, scale)
    for name, a, b in zip(("grad_h", "grad_scale"), ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13, msg=name)


def test_scale_gradient_is_the_row_dot_product(device):
    """grad_scale[r] = sum_j grad[r, j] * swiglu(h)[r, j] (fp64), and it is not a silent zero; rows of scale 0
    still get theirs, and their grad_h is zero."""
    h, grad = make_h((6, 16), torch.float64, device)
    scale = make_scale((6, 16), torch.float64, device)
    scale[2] = 0.0
    grad_h, grad_scale = ops.swiglu_scaled_backward(grad, h, scale)
    expected = (grad * ops.swiglu(h)).sum(-1)
    torch.testing.assert_close(grad_scale, expected, rtol=1e-13, atol=1e-13)
    assert grad_scale.abs().min() > 1e-3
    assert torch.equal(grad_h[2], torch.zeros_like(grad_h[2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_scale_of_ones_gives_the_unscaled_bits(device, dtype):
    """A factor of 1 changes nothing: the forward is the unscaled op's bits on every device; the backward's grad_h
    too on CPU (on CUDA the scaled backward is another kernel of the same formulas: equal to rounding)."""
    h, grad = make_h((9, 24), dtype, device)
    ones = torch.ones(9, dtype=torch.float32, device=device)
    assert_bitwise_equal(ops.swiglu(h, ones), ops.swiglu(h), "y")
    grad_h, _ = ops.swiglu_scaled_backward(grad, h, ones)
    if device == "cpu":
        assert_bitwise_equal(grad_h, ops.swiglu_backward(grad, h), "grad_h")
    else:
        torch.testing.assert_close(grad_h, ops.swiglu_backward(grad, h))


def test_scaled_backward_is_deterministic(device):
    """grad_scale is a sum per row in a fixed order: two runs give the same bits (rows wide enough for several
    chunks per lane on CUDA)."""
    h, grad = make_h((300, 2 * 777), torch.bfloat16, device)
    scale = make_scale((300, 1), torch.float32, device)
    first = ops.swiglu_scaled_backward(grad, h, scale)
    second = ops.swiglu_scaled_backward(grad, h, scale)
    for name, a, b in zip(("grad_h", "grad_scale"), first, second, strict=True):
        assert_bitwise_equal(a, b, name)


def test_scale_dtype_is_the_gradients(device):
    """A bf16 scale on fp32 rows: the factor is used at its value (widened), and its gradient comes back in
    bf16; the rows' gradient stays fp32."""
    h, grad = make_h((7, 12), torch.float32, device)
    scale = make_scale((7, 12), torch.bfloat16, device)
    assert_bitwise_equal(ops.swiglu(h, scale), ops.swiglu(h, scale.float()), "y")
    grad_h, grad_scale = scaled_grads(ops.swiglu, grad, h, scale)
    assert grad_h.dtype == torch.float32 and grad_scale.dtype == torch.bfloat16
    _, grad_scale_fp32 = ops.swiglu_scaled_backward(grad, h, scale.float())
    assert_bitwise_equal(grad_scale, grad_scale_fp32.bfloat16(), "grad_scale")


def test_scaled_gradcheck_and_gradgradcheck(device):
    h, grad = make_h((4, 10), torch.float64, device, scale=1.5)
    scale = make_scale((4, 10), torch.float64, device)
    assert gradcheck(ops.swiglu, (leaf(h), leaf(scale)))
    assert gradgradcheck(ops.swiglu, (leaf(h), leaf(scale)))
    assert gradcheck(ops.swiglu_scaled_backward, (leaf(grad), leaf(h), leaf(scale)))
    assert gradgradcheck(ops.swiglu_scaled_backward, (leaf(grad), leaf(h), leaf(scale)))


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES)
def test_scaled_recorded_backward_matches_kernel(device, dtype):
    h, grad = make_h((6, 20), dtype, device)
    scale = make_scale((6, 20), torch.float32, device)
    recorded = ops.swiglu_scaled_backward(grad, leaf(h), scale)
    assert recorded[0].grad_fn is not None
    kernel = ops.swiglu_scaled_backward(grad, h, scale)
    assert kernel[0].grad_fn is None
    for a, b in zip(recorded, kernel, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", SHAPES)
def test_scaled_meta_kernels_match_real_ones(shape):
    h, grad = make_h(shape, torch.bfloat16, "cpu")
    scale = make_scale(shape, torch.float32, "cpu")
    real = [ops.swiglu(h, scale), *ops.swiglu_scaled_backward(grad, h, scale)]
    fake = [
        ops.swiglu(h.to("meta"), scale.to("meta")),
        *ops.swiglu_scaled_backward(grad.to("meta"), h.to("meta"), scale.to("meta")),
    ]
    for r, f in zip(real, fake, strict=True):
        assert f.device.type == "meta"
        assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride())


# ------------------------------------------------------------------------------------------------ the layer


def test_transformer_swiglu_is_the_op(device):
    h, grad = make_h((7, 10), torch.float32, device)
    assert_bitwise_equal(fastmoe.transformer.swiglu(h), ops.swiglu(h), "transformer.swiglu")
    h_layer = leaf(h)
    (grad_h,) = torch.autograd.grad(fastmoe.transformer.swiglu(h_layer), h_layer, grad)
    assert_bitwise_equal(grad_h, ops.swiglu_backward(grad, h), "grad of transformer.swiglu")
    layer = FMoETransformerMLP(num_expert=2, d_model=4, d_hidden=5, activation="swiglu")
    assert layer.experts.activation is fastmoe.transformer.swiglu
    assert layer.experts.htoh4.weight.shape == (2, 2 * 5, 4)
