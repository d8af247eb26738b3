"""Gradients of gradients (create_graph=True, gradient penalties): every differentiable op's backward is itself
differentiable, checked with gradgradcheck (fp64 finite differences) and against plain PyTorch references, op by
op and through the layers. A second derivative is never a silent zero."""

import pytest
import torch
from torch import nn
from torch.autograd import grad, gradcheck, gradgradcheck

import fastmoe
from conftest import distinct_logits, make_generator, randn, random_topk_idx
from fastmoe import ops
from fastmoe.testing.reference import reference_moe_mlp, reference_route_topk

SCORE_FNS = ["topk_softmax", "softmax_topk"]


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


# ----------------------------------------------------------------------------------------------- route_topk


@pytest.mark.parametrize("score_fn", SCORE_FNS)
def test_route_topk_gradgradcheck(device, score_fn):
    logits = leaf(distinct_logits(5, 6, make_generator(1), device=device))
    assert gradgradcheck(lambda lg: ops.route_topk(lg, 3, score_fn)[1], (logits,))


@pytest.mark.parametrize("score_fn", SCORE_FNS)
def test_route_topk_backward_op_gradcheck(device, score_fn):
    """The backward op itself, in all its differentiable inputs (the grad of the scores, the logits, and the
    scores it is given), so third derivatives are right too."""
    gen = make_generator(2)
    logits = distinct_logits(4, 5, gen, device=device)
    idx, score = ops.route_topk(logits, 2, score_fn)
    grad_score = randn(4, 2, gen=gen, device=device)
    inputs = (leaf(grad_score), leaf(logits), leaf(score))
    assert gradcheck(lambda g, lg, s: torch.ops.fastmoe.route_topk_backward(g, lg, idx, s, score_fn), inputs)


@pytest.mark.parametrize("score_fn", SCORE_FNS)
def test_route_topk_second_derivative_equals_torch(device, score_fn):
    """A gradient penalty on the scores: d/dl |d(sum s^2)/dl|^2 against torch.topk + softmax. Before this op's
    backward had its own autograd, the result was all zeros."""
    base = torch.randn(4, 5, dtype=torch.float64, generator=make_generator(3)).to(device)

    def penalty_grad(route):
        logits = leaf(base)
        score = route(logits)
        (g,) = grad(score.pow(2).sum(), logits, create_graph=True)
        (h,) = grad(g.pow(2).sum(), logits)
        return h

    ours = penalty_grad(lambda lg: ops.route_topk(lg, 2, score_fn)[1])
    theirs = penalty_grad(lambda lg: reference_route_topk(lg, 2, score_fn)[1])
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------- permute, combine


def plan_of(num_tokens, k, num_experts, seed, device, drop_prob=0.3):
    idx = random_topk_idx(num_tokens, k, num_experts, make_generator(seed), drop_prob=drop_prob, device=device)
    return ops.make_plan(idx, num_experts)


def test_permute_gradgradcheck(device):
    plan = plan_of(5, 2, 3, 4, device)
    x = leaf(randn(5, 3, gen=make_generator(5), device=device))
    assert gradgradcheck(lambda t: ops.permute(t, plan), (x,))


@pytest.mark.parametrize("with_score", [True, False], ids=["scores", "no-scores"])
def test_unpermute_combine_gradgradcheck(device, with_score):
    gen = make_generator(6)
    plan = plan_of(5, 3, 4, 7, device)
    y_sorted = leaf(randn(15, 3, gen=gen, device=device))
    if with_score:
        score = leaf(randn(5, 3, gen=gen, device=device))
        assert gradgradcheck(lambda y, s: ops.unpermute_combine(y, plan, s), (y_sorted, score))
    else:
        assert gradgradcheck(lambda y: ops.unpermute_combine(y, plan), (y_sorted,))


def test_unpermute_combine_backward_op_gradcheck(device):
    gen = make_generator(8)
    plan = plan_of(4, 2, 3, 9, device)
    inputs = tuple(leaf(randn(*shape, gen=gen, device=device)) for shape in [(4, 3), (8, 3), (4, 2)])

    def fn(grad_y, y_sorted, score):
        return torch.ops.fastmoe.unpermute_combine_backward(
            grad_y, y_sorted, plan.sorted_pair, plan.pair_pos, score, True
        )

    assert gradcheck(fn, inputs)


# ----------------------------------------------------------------------------------------------- grouped_linear


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_grouped_linear_gradgradcheck(device, with_bias):
    """Expert 1 has no rows and the last two rows belong to no expert (the tail a plan leaves)."""
    gen = make_generator(10)
    offsets = torch.tensor([0, 2, 2, 5], device=device)
    x = leaf(randn(7, 3, gen=gen, device=device))
    weight = leaf(randn(3, 4, 3, gen=gen, device=device))
    bias = leaf(randn(3, 4, gen=gen, device=device)) if with_bias else None
    inputs = (x, weight) + ((bias,) if with_bias else ())
    assert gradgradcheck(lambda t, w, *b: ops.grouped_linear(t, offsets, w, b[0] if b else None), inputs)


def test_grouped_linear_backward_op_gradcheck(device):
    gen = make_generator(11)
    offsets = torch.tensor([0, 3, 3, 4], device=device)
    grad_y = leaf(randn(5, 2, gen=gen, device=device))
    x = leaf(randn(5, 3, gen=gen, device=device))
    weight = leaf(randn(3, 2, 3, gen=gen, device=device))
    mask = [True, True, True]
    inputs = (grad_y, x, weight)
    assert gradcheck(lambda g, t, w: torch.ops.fastmoe.grouped_linear_backward(g, t, offsets, w, mask), inputs)


# ----------------------------------------------------------------------------------------------- layers


def gradient_penalty_grads(forward, x, params):
    """The gradients of ``|d(sum y^2)/dx|^2`` with respect to ``params``: a second derivative through the layer."""
    x = leaf(x)
    y = forward(x)
    (gx,) = grad(y.pow(2).sum(), x, create_graph=True)
    return grad(gx.pow(2).sum(), params, allow_unused=True)


def test_fmoe_with_module_experts_gradient_penalty_equals_torch(device):
    """FMoE with nn.Linear experts against the same layer written with plain PyTorch ops: every parameter's
    gradient of a gradient penalty, the gate's included."""
    torch.manual_seed(0)
    layer = fastmoe.FMoE(num_expert=3, d_model=5, top_k=2, expert=lambda d: nn.Linear(d, d)).double().to(device)
    x = torch.randn(6, 5, dtype=torch.float64, generator=make_generator(12)).to(device)

    def reference(inp):
        logits = layer.gate.gate(inp)
        idx, score = reference_route_topk(logits, 2, "topk_softmax")
        out = torch.zeros_like(inp)
        for e, expert in enumerate(layer.experts):
            out = out + (score * (idx == e)).sum(-1, keepdim=True) * expert(inp)
        return out

    params = list(layer.parameters())
    ours = gradient_penalty_grads(layer, x, params)
    theirs = gradient_penalty_grads(reference, x, params)
    assert layer.gate.gate.weight.grad is None
    gate_weight = params.index(layer.gate.gate.weight)
    assert ours[gate_weight].abs().max() > 0
    for name, a, b in zip([n for n, _ in layer.named_parameters()], ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"{name}: {m}")


def test_fmoe_transformer_mlp_gradient_penalty_equals_torch(device):
    """The fused-expert layer (grouped GEMMs) under create_graph=True against reference_moe_mlp. This used to
    fail inside the CPU GEMM with "mm(): functions with out=... arguments don't support automatic
    differentiation"."""
    torch.manual_seed(1)
    layer = fastmoe.FMoETransformerMLP(num_expert=4, d_model=6, d_hidden=5, top_k=2).double().to(device)
    x = torch.randn(7, 6, dtype=torch.float64, generator=make_generator(13)).to(device)
    gate, experts = layer.gate.gate, layer.experts

    def reference(inp):
        return reference_moe_mlp(
            inp,
            gate.weight,
            gate.bias,
            experts.htoh4.weight,
            experts.htoh4.bias,
            experts.h4toh.weight,
            experts.h4toh.bias,
            2,
            torch.nn.functional.gelu,
        )

    params = list(layer.parameters())
    ours = gradient_penalty_grads(layer, x, params)
    theirs = gradient_penalty_grads(reference, x, params)
    for (name, _), a, b in zip(layer.named_parameters(), ours, theirs, strict=True):
        assert a is not None and a.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"{name}: {m}")
