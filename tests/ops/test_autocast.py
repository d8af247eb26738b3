"""grouped_linear under torch.autocast: the GEMM runs in the autocast dtype, like torch's linear, and the fp32
weights get fp32 gradients through the casts."""

import torch

from conftest import assert_bitwise_equal, assert_early_cast_matches_late, leaf, make_generator, randn
from fastmoe import ops


def make(device):
    gen = make_generator(5)
    offsets = torch.tensor([0, 3, 3, 9], dtype=torch.int64, device=device)
    x = randn(11, 16, gen=gen, dtype=torch.float32, device=device)
    weight = randn(3, 8, 16, gen=gen, dtype=torch.float32, device=device, scale=0.3)
    bias = randn(3, 8, gen=gen, dtype=torch.float32, device=device)
    return x, offsets, weight, bias


def test_autocast_runs_in_bf16_and_matches_an_explicit_cast(device):
    x, offsets, weight, bias = make(device)
    auto = [leaf(t) for t in (x, weight, bias)]
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        y = ops.grouped_linear(auto[0], offsets, auto[1], auto[2])
    assert y.dtype == torch.bfloat16
    manual = [leaf(t) for t in (x, weight, bias)]
    y_manual = ops.grouped_linear(manual[0].bfloat16(), offsets, manual[1].bfloat16(), manual[2].bfloat16())
    # The same bf16 values through the same GEMMs on the same shapes: bitwise, forward and backward.
    assert_bitwise_equal(y, y_manual, "y")
    grad_y = torch.ones_like(y)
    y.backward(grad_y)
    y_manual.backward(grad_y)
    for name, a, b in zip(("x", "weight", "bias"), auto, manual, strict=True):
        assert a.grad.dtype == torch.float32, f"grad_{name} dtype {a.grad.dtype}"
        assert_bitwise_equal(a.grad, b.grad, f"grad_{name}")


def test_autocast_leaves_fp64_alone():
    x, offsets, weight, bias = (t.double() if t.is_floating_point() else t for t in make("cpu"))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        y = ops.grouped_linear(x, offsets, weight, bias)
    assert y.dtype == torch.float64
    assert_bitwise_equal(y, ops.grouped_linear(x, offsets, weight, bias), "y")


def test_no_autocast_keeps_fp32():
    x, offsets, weight, bias = make("cpu")
    assert ops.grouped_linear(x, offsets, weight, bias).dtype == torch.float32


def test_transformer_mlp_casts_rows_before_the_permute_with_the_same_result(device):
    """FMoETransformerMLP casts its rows to bf16 before the permute under autocast (half the bytes moved), with
    the same output as casting inside grouped_linear (conftest.assert_early_cast_matches_late)."""
    from fastmoe import FMoETransformerMLP

    torch.manual_seed(0)
    layer = FMoETransformerMLP(4, d_model=16, d_hidden=32, top_k=2).to(device)
    assert_early_cast_matches_late(layer, randn(24, 16, gen=make_generator(6), dtype=torch.float32, device=device))


def test_transformer_mlp_under_autocast_leaves_fp64_alone():
    from fastmoe import FMoETransformerMLP

    layer = FMoETransformerMLP(4, d_model=16, d_hidden=32, top_k=2).double()
    x = torch.randn(8, 16, dtype=torch.float64)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float64
    assert_bitwise_equal(y, layer(x), "y")
