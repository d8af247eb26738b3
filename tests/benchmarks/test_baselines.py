"""The benchmark baselines compute the same layer as fastmoe, so the speed-ups compare like with like."""

import sys
from pathlib import Path

import pytest
import torch

import fastmoe

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from baselines.moe_baselines import dense_ffn, grouped_mm_moe, loop_moe  # noqa: E402


def _layer_and_params(dtype):
    torch.manual_seed(0)
    layer = fastmoe.FMoETransformerMLP(num_expert=6, d_model=16, d_hidden=32, top_k=2, bias=False).to(dtype)
    params = (layer.gate.gate.weight, layer.gate.gate.bias, layer.experts.htoh4.weight, layer.experts.h4toh.weight)
    return layer, params


def test_loop_baseline_matches_fastmoe_in_float64():
    layer, params = _layer_and_params(torch.float64)
    x = torch.randn(40, 16, dtype=torch.float64)
    torch.testing.assert_close(loop_moe(x, *params, 2), layer(x), rtol=0, atol=1e-12)


def _tokens_with_clear_routing(layer, num_tokens: int, top_k: int) -> torch.Tensor:
    """bf16 tokens whose k-th and (k+1)-th gate logits are more than 4 bf16 steps apart in exact arithmetic.
    Both sides route on the same bf16 logits, but torch.topk and fastmoe break an exact tie differently, and
    which logits tie depends on how the CPU's bf16 GEMM rounds; with this gap no CPU makes a tie."""
    gen = torch.Generator().manual_seed(3)
    weight, bias = layer.gate.gate.weight.double(), layer.gate.gate.bias.double()
    step = torch.finfo(torch.bfloat16).eps
    kept = []
    while len(kept) < num_tokens:
        x = torch.randn(1, weight.shape[1], generator=gen, dtype=torch.float64).to(torch.bfloat16)
        logits = (x.double() @ weight.t() + bias)[0]  # products of bf16 values: exact in fp64
        ranked = logits.sort(descending=True).values
        if ranked[top_k - 1] - ranked[top_k] > 4 * step * logits.abs().max():
            kept.append(x)
    return torch.cat(kept)


def test_grouped_mm_baseline_matches_fastmoe():
    layer, params = _layer_and_params(torch.bfloat16)
    x = _tokens_with_clear_routing(layer, 40, 2)
    try:
        out = grouped_mm_moe(x, *params, 2)
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"torch._grouped_mm does not run here for bf16 on CPU: {str(error).splitlines()[0]}")
    expected = layer(x).float()
    assert ((out.float() - expected).norm() / expected.norm()).item() < 2e-2


def test_dense_ffn_is_the_expert_mlp_of_a_one_expert_layer():
    """With one expert and k = 1 every token goes to that expert with score 1, so the MoE layer is exactly the
    dense FFN of width k * h that the benchmark times as the equal-FLOPs reference."""
    torch.manual_seed(1)
    layer = fastmoe.FMoETransformerMLP(num_expert=1, d_model=16, d_hidden=24, top_k=1, bias=False).double()
    x = torch.randn(30, 16, dtype=torch.float64)
    w1, w2 = layer.experts.htoh4.weight[0], layer.experts.h4toh.weight[0]
    assert w1.shape == (24, 16) and w2.shape == (16, 24)
    torch.testing.assert_close(dense_ffn(x, w1, w2), layer(x), rtol=0, atol=1e-12)
