"""The Python layers and the C++ fastmoe::nn modules, with the same parameters and inputs, give bitwise-equal
outputs and gradients (input and every parameter) on one process: FMoETransformerMLP (GELU and SwiGLU) against
fastmoe::nn::TransformerMLP and FMoE with nn.Sequential experts against fastmoe::nn::MoE, in fp64 and fp32, on no
tokens, and under CPU bf16 autocast. The C++ layers run through the test-only op library
(torch.ops.fastmoe_testing.run_layer, tests/cpp/nn_testing_ops.cpp).

Bitwise is what to expect, not a lucky tolerance: both front ends call the same ATen and fastmoe kernels on the same
values in the same shapes, in one process with one thread count, so every sum has the same order on both sides
(the comparison and its reasons: tests/distributed/cross_language_cases.py). The expert-parallel cases are in
tests/distributed/test_cross_language_ep.py."""

import os
import sys

import pytest
import torch

from conftest import NN_TESTING_LIB, make_generator, needs_nn_testing_lib

# cross_language_cases (shared with the expert-parallel test) lives beside the multi-process tests
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distributed"))
from cross_language_cases import D_MODEL, LAYERS, compare, python_layer  # noqa: E402

pytestmark = needs_nn_testing_lib
NUM_EXPERT = 4


@pytest.fixture(scope="module", autouse=True)
def nn_testing_ops():
    torch.ops.load_library(NN_TESTING_LIB)


def inputs(shape, dtype, seed=0):
    """x and grad_y of ``shape + (D_MODEL,)``, drawn in fp64 and cast."""
    gen = make_generator(seed)
    x = torch.randn(*shape, D_MODEL, generator=gen, dtype=torch.float64).to(dtype)
    grad_y = torch.randn(*shape, D_MODEL, generator=gen, dtype=torch.float64).to(dtype)
    return x, grad_y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("layer", LAYERS)
def test_python_layer_equals_cpp_module_bitwise(layer, dtype):
    module = python_layer(layer, NUM_EXPERT, dtype, "cpu")
    x, grad_y = inputs((3, 7), dtype)  # leading dimensions [3, 7]: both layers view them as 21 tokens
    compared = compare(layer, module, x, grad_y, label=f"{layer} {dtype}: ")
    assert compared == 2 + len(list(module.parameters()))


@pytest.mark.parametrize("layer", LAYERS)
def test_python_layer_equals_cpp_module_on_no_tokens(layer):
    module = python_layer(layer, NUM_EXPERT, torch.float64, "cpu")
    x, grad_y = inputs((0,), torch.float64)
    assert compare(layer, module, x, grad_y, label=f"{layer} no tokens: ") == 2 + len(list(module.parameters()))


@pytest.mark.parametrize("layer", LAYERS)
def test_python_layer_equals_cpp_module_under_bf16_autocast(layer):
    """fp32 parameters and input under CPU bf16 autocast, forward and backward on both sides: the TransformerMLPs
    cast the rows to bf16 before the permute (TokenDispatch's cast_to_autocast) and run the grouped GEMMs in bf16,
    the MoEs' experts cast in their nn.Linear; the gate's linear runs in bf16 and the layers return bf16."""
    module = python_layer(layer, NUM_EXPERT, torch.float32, "cpu")
    x, grad_y = inputs((21,), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module(x).dtype == torch.bfloat16  # autocast reaches the layer: a bf16 output
        compared = compare(layer, module, x, grad_y.to(torch.bfloat16), label=f"{layer} autocast: ")
    assert compared == 2 + len(list(module.parameters()))
