"""FMoETransformerMLP's fused forward (torch.ops.fastmoe.moe_ffn, one autograd node) against its composed token
path: the same outputs, gradients and balance records bit for bit, second derivatives to rounding, the same result
without autograd, and the composed path wherever the one op does not cover the layer (hooks, other gates, custom
activations, debug mode)."""

import contextlib
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastmoe
from conftest import (
    assert_bitwise_equal,
    assert_ways_agree,
    both_ways,
    deterministic_mode,
    leaf,
    make_generator,
)
from fastmoe import FMoETransformerMLP
from fastmoe.gates import GShardGate, NaiveGate

D_MODEL, D_HIDDEN, NUM_EXPERT, TOP_K, NUM_TOKENS = 8, 6, 4, 2, 24
ACTIVATIONS = ["gelu", "relu", "silu", "swiglu"]
COEFS = [
    pytest.param(0.0, 0.0, id="no-loss"),
    pytest.param(0.01, 0.0, id="balance"),
    pytest.param(0.01, 1e-3, id="balance-z"),
]
# (parameter dtype, autocast dtype or None)
MODES = [
    pytest.param(torch.float32, None, id="fp32"),
    pytest.param(torch.float64, None, id="fp64"),
    pytest.param(torch.float32, torch.bfloat16, id="fp32-bf16-autocast"),
]


def make_layer(
    activation="gelu",
    bias=True,
    balance_coef=0.0,
    z_loss_coef=0.0,
    dtype=torch.float64,
    seed=0,
    gate=None,
    d_hidden=D_HIDDEN,
    d_model=D_MODEL,
    **kwargs,
):
    """A layer whose parameters (biases included, which start at zero) are all drawn afresh from ``seed``."""
    torch.manual_seed(seed)
    if gate is None:
        gate = NaiveGate(
            d_model, NUM_EXPERT, 1, TOP_K, gate_bias=bias, balance_coef=balance_coef, z_loss_coef=z_loss_coef
        )
    layer = FMoETransformerMLP(
        num_expert=NUM_EXPERT,
        d_model=d_model,
        d_hidden=d_hidden,
        top_k=TOP_K,
        activation=activation,
        bias=bias,
        gate=gate,
        **kwargs,
    )
    gen = make_generator(seed)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64).mul_(0.4))
    return layer.to(dtype)


def make_input(*shape, dtype=torch.float64, seed=1):
    return torch.randn(*shape, generator=make_generator(seed), dtype=torch.float64).to(dtype)


class Run:
    """One forward and backward of a layer: output, input gradient, parameter gradients, balance record/stats."""

    def __init__(self, layer, x, fused, add_loss=False, autocast=None, grad_seed=7):
        layer.fused_forward = fused
        layer.zero_grad(set_to_none=True)
        inp = leaf(x)
        device = x.device.type
        context = torch.autocast(device, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with context:
            self.y = layer(inp)
        self.stats = layer.balance_stats()
        self.record = layer.balance_record
        grad_y = torch.randn(self.y.shape, generator=make_generator(grad_seed), dtype=torch.float64).to(x.device)
        loss = (self.y.double() * grad_y).sum()
        if add_loss:
            loss = loss + layer.get_loss()
        loss.backward()
        self.grad_x = inp.grad
        self.grads = {name: param.grad for name, param in layer.named_parameters()}


def each_path(layer, x):
    """A fresh leaf copy of ``x`` for the one op, then for the composed path, the layer's gradients reset each time."""
    for fused in (True, False):
        layer.fused_forward = fused
        layer.zero_grad(set_to_none=True)
        yield leaf(x)


def assert_same_runs(fused: Run, composed: Run) -> None:
    """Bit for bit: output, every gradient, and the balance record (counts and loss terms) and its host summary."""
    assert_bitwise_equal(fused.y, composed.y, "y")
    assert_bitwise_equal(fused.grad_x, composed.grad_x, "grad of the input")
    assert fused.grads.keys() == composed.grads.keys()
    for name, grad in composed.grads.items():
        assert grad is not None, f"{name} got no gradient on the composed path"
        assert fused.grads[name] is not None, f"{name} got no gradient on the fused path"
        assert_bitwise_equal(fused.grads[name], grad, f"grad of {name}")
    a, b = fused.record, composed.record
    assert (a.num_tokens, a.num_slots) == (b.num_tokens, b.num_slots)
    assert_bitwise_equal(a.expert_counts, b.expert_counts, "expert_counts")
    assert a.losses.keys() == b.losses.keys(), (sorted(a.losses), sorted(b.losses))
    for name, term in b.losses.items():
        assert_bitwise_equal(a.losses[name], term, f"loss term {name}")
    assert fused.stats == composed.stats


def assert_frozen_runs_agree(layer, x, frozen: str | None, moe_ffn_calls) -> None:
    """Freezes the parameters under the prefix ``frozen`` (None: all trained), runs the one op and the composed
    path with the gate's loss, and asserts bit for bit: output, input gradient and every trained parameter's
    gradient; the frozen ones get none on either path."""
    for name, param in layer.named_parameters():
        if frozen is not None and name.startswith(frozen):
            param.requires_grad_(False)
    fused = Run(layer, x, True, add_loss=True)
    assert len(moe_ffn_calls) == 1, "the fused forward did not run torch.ops.fastmoe.moe_ffn"
    composed = Run(layer, x, False, add_loss=True)
    assert_bitwise_equal(fused.y, composed.y, "y")
    assert_bitwise_equal(fused.grad_x, composed.grad_x, "grad of the input")
    for name, grad in composed.grads.items():
        if frozen is not None and name.startswith(frozen):
            assert grad is None and fused.grads[name] is None, f"{name} is frozen but got a gradient"
        else:
            assert grad is not None, f"{name} got no gradient on the composed path"
            assert_bitwise_equal(fused.grads[name], grad, f"grad of {name}")


def graph_nodes(grad_fn) -> set:
    """Every autograd node reachable from ``grad_fn`` (AccumulateGrad of the leaves included)."""
    seen, todo = set(), [grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return seen


@pytest.fixture
def moe_ffn_calls(monkeypatch):
    """A list that grows by one for each call of torch.ops.fastmoe.moe_ffn (the op itself still runs)."""
    calls, op = [], torch.ops.fastmoe.moe_ffn

    def counting(*args, **kwargs):
        calls.append(args)
        return op(*args, **kwargs)

    monkeypatch.setattr(torch.ops.fastmoe, "moe_ffn", counting)
    return calls


# ------------------------------------------------------------------------------------------------ bit for bit


@pytest.mark.parametrize("add_loss", [False, True], ids=["task-loss", "task-plus-gate-loss"])
@pytest.mark.parametrize("dtype, autocast", MODES)
@pytest.mark.parametrize("balance_coef, z_loss_coef", COEFS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_equals_composed(activation, bias, balance_coef, z_loss_coef, dtype, autocast, add_loss, moe_ffn_calls):
    layer = make_layer(activation, bias, balance_coef, z_loss_coef, dtype)
    x = make_input(NUM_TOKENS, D_MODEL, dtype=dtype)
    fused = Run(layer, x, True, add_loss, autocast)
    assert len(moe_ffn_calls) == 1, "the fused forward did not run torch.ops.fastmoe.moe_ffn"
    composed = Run(layer, x, False, add_loss, autocast)
    assert len(moe_ffn_calls) == 1, "fused_forward=False ran torch.ops.fastmoe.moe_ffn"
    assert fused.y.dtype == (autocast or dtype)
    assert fused.grad_x.dtype == dtype
    assert sorted(fused.record.losses) == sorted(
        name for name, coef in (("balance", balance_coef), ("z", z_loss_coef)) if coef
    )
    assert_same_runs(fused, composed)


@pytest.mark.parametrize("frozen", ["experts.h4toh", "experts.htoh4", "gate"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_frozen_parameters(activation, bias, frozen, moe_ffn_calls):
    """With some parameters frozen the one op computes only the gradients asked for (the second GEMM's input is
    then recomputed only when its weight gradient is needed; without biases, SwiGLU's scores take their gradient
    through the activation's backward even with the experts frozen), and those equal the composed path's bit for
    bit."""
    layer = make_layer(activation, bias, 0.01, 1e-3)
    assert_frozen_runs_agree(layer, make_input(NUM_TOKENS, D_MODEL), frozen, moe_ffn_calls)


# kHostBoundBytes of csrc/ops/autograd/moe_ffn.cpp: with recompute_activation the one op still keeps an activation
# under 32 MiB for its backward, and recomputes a larger one; it splits a GEMM's backward only for an input of at
# least that size.
HOST_BOUND_BYTES = 32 << 20


@pytest.mark.parametrize("frozen", [None, "experts.h4toh"], ids=["all-trained", "second-gemm-frozen"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_recomputed_activation_gives_the_same_bits(activation, bias, frozen, moe_ffn_calls):
    """A layer asked to recompute its activation, past the size the op keeps all the same: the backward recomputes
    it (or, with the second GEMM frozen, does without it), and every gradient still equals the composed path's bit
    for bit."""
    tokens, hidden = 2048, 1040
    activation_bytes = tokens * TOP_K * hidden * torch.finfo(torch.float64).bits // 8
    assert activation_bytes >= HOST_BOUND_BYTES, "the layer must be large enough to take the recompute path"
    wide = make_layer(activation, bias, 0.01, 1e-3, d_hidden=hidden)
    wide.recompute_activation = True
    assert_frozen_runs_agree(wide, make_input(tokens, D_MODEL), frozen, moe_ffn_calls)


@pytest.mark.parametrize("fused", [True, False], ids=["moe_ffn", "composed"])
def test_swiglu_without_biases_scores_the_activation(fused, moe_ffn_calls):
    """SwiGLU experts without biases apply each row's routing score inside swiglu (W2 (s a) = s (W2 a)) and the
    combine only sums: the layer's output and its experts' gradients are bit for bit those of that composition on
    the gate's routing (conftest.run_token_path, scored), and equal the weighted composition's to fp64 rounding."""
    layer = make_layer("swiglu", False, 0.01, 1e-3)
    x = make_input(NUM_TOKENS, D_MODEL)
    run = Run(layer, x, fused, grad_seed=5)
    assert len(moe_ffn_calls) == (1 if fused else 0)
    grad_y = torch.randn(run.y.shape, generator=make_generator(5), dtype=torch.float64)  # Run's upstream gradient
    with torch.no_grad():
        topk_idx, topk_score = layer.gate(x)
    experts = layer.experts
    weights = (experts.htoh4.weight.detach(), experts.h4toh.weight.detach())
    ways = both_ways(x, topk_idx, topk_score, *weights, grad_y)
    y, (_, _, grad_w_in, grad_w_out), _ = ways[True]
    assert_bitwise_equal(run.y.detach(), y, "y")
    assert_bitwise_equal(run.grads["experts.htoh4.weight"], grad_w_in, "grad htoh4.weight")
    assert_bitwise_equal(run.grads["experts.h4toh.weight"], grad_w_out, "grad h4toh.weight")
    assert_ways_agree(ways, rtol=1e-12, atol=1e-12, what="weighted against scored")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype, autocast", [(torch.float32, None), (torch.float32, torch.bfloat16),
                                             (torch.float32, torch.float16), (torch.bfloat16, None)])  # fmt: skip
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_fused_equals_composed_cuda(activation, dtype, autocast, moe_ffn_calls):
    """On the GPU (the CUDA kernels, and CUTLASS or torch._grouped_mm for 16-bit GEMMs on sm_90) with the gate's
    losses backpropagated: the same bits. Widths of 64 keep the 16-bit rows aligned for the grouped GEMM backends."""
    torch.manual_seed(0)
    gate = NaiveGate(64, NUM_EXPERT, 1, TOP_K, balance_coef=0.01, z_loss_coef=1e-3)
    layer = FMoETransformerMLP(NUM_EXPERT, 64, 128, top_k=TOP_K, activation=activation, gate=gate).to("cuda", dtype)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0, 0.1)
    x = make_input(256, 64).to("cuda", dtype)
    fused = Run(layer, x, True, True, autocast)
    assert len(moe_ffn_calls) == 1
    composed = Run(layer, x, False, True, autocast)
    assert_same_runs(fused, composed)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_leading_batch_shape(activation):
    """An input [B, S, d] gives [B, S, d] on both paths, the same bits."""
    layer = make_layer(activation, balance_coef=0.01, z_loss_coef=1e-3)
    x = make_input(3, 5, D_MODEL)
    fused, composed = Run(layer, x, True, add_loss=True), Run(layer, x, False, add_loss=True)
    assert fused.y.shape == (3, 5, D_MODEL)
    assert_same_runs(fused, composed)


@pytest.mark.parametrize("balance_coef, z_loss_coef", COEFS)
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_no_tokens(activation, balance_coef, z_loss_coef):
    """T = 0: an empty output, zero gradients and no expert rows, as the composed path gives them."""
    layer = make_layer(activation, balance_coef=balance_coef, z_loss_coef=z_loss_coef)
    x = make_input(0, D_MODEL)
    fused, composed = Run(layer, x, True, add_loss=True), Run(layer, x, False, add_loss=True)
    assert fused.y.shape == (0, D_MODEL)
    assert fused.record.expert_counts.tolist() == [0] * NUM_EXPERT
    assert_same_runs(fused, composed)


# ------------------------------------------------------------------------------------------------ one node


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_fused_forward_is_one_autograd_node(bias):
    """The fused output hangs off one C++ node whose inputs are the leaves; the composed path builds many more."""
    layer = make_layer("swiglu", bias, balance_coef=0.01, z_loss_coef=1e-3)
    inp = leaf(make_input(NUM_TOKENS, D_MODEL))
    layer.fused_forward = True
    y_fused = layer(inp)
    (op_node, _), *rest = y_fused.grad_fn.next_functions
    assert not rest, y_fused.grad_fn.next_functions
    assert type(op_node).__name__ == "CppFunction" and "MoEFFN" in op_node.name(), op_node.name()
    leaves = [next_node for next_node, _ in op_node.next_functions]
    assert len(leaves) == (7 if bias else 4), leaves
    # x's edge goes through the view of the input as [tokens, d_model]; the parameters' edges are their leaves
    (x_view, _), *_ = leaves[0].next_functions
    assert x_view.variable is inp, leaves[0].name()
    assert all(node.variable is param for node, param in zip(leaves[1:], layer.parameters(), strict=True))
    # The gate's loss terms come from the same node.
    assert all(term.grad_fn is op_node for term in layer.gate.get_losses().values())

    layer.fused_forward = False
    y_composed = layer(inp)
    fused_nodes, composed_nodes = graph_nodes(y_fused.grad_fn), graph_nodes(y_composed.grad_fn)
    assert len(fused_nodes) == 3 + len(leaves), [node.name() for node in fused_nodes]
    assert len(composed_nodes) > len(fused_nodes), (len(composed_nodes), len(fused_nodes))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_backward_twice_with_retain_graph(activation, moe_ffn_calls):
    """The one op keeps the first GEMM's output apart from its saved tensors and drops it during the backward; with
    retain_graph=True it stays for a second backward. Two backwards through one forward (a loss, then the gate's
    terms) give the composed path's accumulated gradients bit for bit; a third without retain_graph after them
    raises as autograd does."""
    layer = make_layer(activation, False, 0.01, 1e-3)
    x = make_input(NUM_TOKENS, D_MODEL)
    grad_y = make_input(NUM_TOKENS, D_MODEL, seed=4)
    grads = []
    for inp in each_path(layer, x):
        y = layer(inp)
        y.backward(grad_y, retain_graph=True)
        (y * grad_y).sum().add(layer.get_loss()).backward(retain_graph=True)
        (y * grad_y).sum().backward()
        with pytest.raises(RuntimeError, match="second time"):
            y.backward(grad_y)
        grads.append({name: param.grad.clone() for name, param in layer.named_parameters()} | {"x": inp.grad})
    assert len(moe_ffn_calls) == 1
    for name, grad in grads[1].items():
        assert_bitwise_equal(grads[0][name], grad, f"grad of {name}")


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_saved_tensor_hooks_see_every_saved_tensor(activation, moe_ffn_calls):
    """Under saved-tensor hooks (activation offloading, e.g. torch.autograd.graph.save_on_cpu) the one op saves the
    first GEMM's output [tokens * top_k, hidden], the permuted rows and the second GEMM's output (both [tokens * top_k,
    d_model]; the weighted combine's backward reads the latter) with its other tensors, so the hooks handle them, and
    the gradients are those of the op without hooks, bit for bit."""
    layer = make_layer(activation, True, 0.01, 1e-3)
    x = make_input(NUM_TOKENS, D_MODEL)
    h_shape = (NUM_TOKENS * TOP_K, layer.experts.htoh4.weight.shape[1])
    ys_shape = (NUM_TOKENS * TOP_K, D_MODEL)
    runs = []
    for hooked in (False, True):
        packed = []
        layer.zero_grad(set_to_none=True)
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t, p=packed: p.append(tuple(t.shape)) or t, lambda t: t)
        with hooks if hooked else contextlib.nullcontext():
            y = layer(leaf(x))
        y.sum().backward()
        runs.append({name: param.grad for name, param in layer.named_parameters()})
        if hooked:  # the permuted rows have ys's shape: both are saved through the hooks
            assert h_shape in packed and packed.count(ys_shape) >= 2, (h_shape, ys_shape, packed)
    assert len(moe_ffn_calls) == 2
    for name, grad in runs[1].items():
        assert_bitwise_equal(runs[0][name], grad, f"grad of {name}")


@pytest.mark.parametrize("balance_coef, z_loss_coef", COEFS)
def test_logits_kept_only_for_the_gate_loss_terms(balance_coef, z_loss_coef, moe_ffn_calls):
    """The one op keeps the gate's logits [tokens, num_experts] for its backward only where a loss term reads them
    back: the scores' gradient (topk_softmax) needs their sizes alone. The gradients are those of the composed path,
    bit for bit, either way."""
    layer = make_layer("gelu", True, balance_coef, z_loss_coef)
    x = make_input(NUM_TOKENS, D_MODEL)
    saved, in_forward = [], []  # what the forward saves (the backward's z-loss term saves its own tensors)
    layer.register_forward_pre_hook(lambda *_: in_forward.append(True))
    layer.register_forward_hook(lambda *_: in_forward.clear())
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (in_forward and saved.append(t)) or t, lambda t: t):
        fused = Run(layer, x, True, add_loss=True)
    assert len(moe_ffn_calls) == 1
    logits = [t for t in saved if tuple(t.shape) == (NUM_TOKENS, NUM_EXPERT)]
    assert len(logits) == 1, [tuple(t.shape) for t in saved]
    held = logits[0].stride() != (0, 0)
    assert held == (balance_coef > 0 or z_loss_coef > 0), (balance_coef, z_loss_coef, logits[0].stride())
    assert_same_runs(fused, Run(layer, x, False, add_loss=True))


def test_gate_loss_alone_leaves_the_experts_without_gradients():
    """Backpropagating only the gate's loss terms reaches the gate, not the experts: their gradients stay None on
    both paths (an optimizer skips a parameter without a gradient, but decays and moves one with a zero gradient)."""
    layer = make_layer(balance_coef=0.01, z_loss_coef=1e-3)
    x = make_input(NUM_TOKENS, D_MODEL)
    grads = []
    for inp in each_path(layer, x):
        layer(inp)
        layer.get_loss().backward()
        grads.append({name: param.grad for name, param in layer.named_parameters()} | {"input": inp.grad})
    fused_grads, composed_grads = grads
    for name, grad in composed_grads.items():
        if grad is None:
            assert fused_grads[name] is None, f"{name}: the fused path gives a gradient, the composed path none"
        else:
            assert_bitwise_equal(fused_grads[name], grad, f"grad of {name}")
    assert composed_grads["experts.htoh4.weight"] is None and composed_grads["gate.gate.weight"] is not None


# ------------------------------------------------------------------------------------------------ second order


@pytest.mark.parametrize("balance_coef, z_loss_coef", COEFS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_second_derivatives(activation, balance_coef, z_loss_coef, moe_ffn_calls):
    """Gradients taken with create_graph=True and differentiated again (a gradient-norm penalty) agree with the
    composed path to rounding in fp64."""
    layer = make_layer(activation, balance_coef=balance_coef, z_loss_coef=z_loss_coef)
    x = make_input(NUM_TOKENS, D_MODEL)
    grad_y = make_input(NUM_TOKENS, D_MODEL, seed=5)
    results = []
    for inp in each_path(layer, x):
        y = layer(inp)
        loss = (y * grad_y).sum() + layer.get_loss()
        params = list(layer.parameters())
        first = torch.autograd.grad(loss, [inp] + params, create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        penalty.backward()
        results.append(([g.detach() for g in first], inp.grad, [p.grad for p in params]))
    assert len(moe_ffn_calls) == 1, "the fused forward did not run torch.ops.fastmoe.moe_ffn"
    (first_f, gx_f, gp_f), (first_c, gx_c, gp_c) = results
    for name, a, b in [("first-order", first_f, first_c), ("second-order", [gx_f] + gp_f, [gx_c] + gp_c)]:
        for i, (got, want) in enumerate(zip(a, b, strict=True)):
            assert got is not None and want is not None, f"{name} gradient {i} missing"
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=lambda m, i=i, n=name: f"{n} {i}: {m}")
    # The penalty really reaches the second derivative: with relu the experts' part is piecewise linear, but the
    # gate's softmax is not, so the second-order gradients differ from zero either way.
    assert any(g.abs().max() > 0 for g in gp_f)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_second_derivatives_under_autocast(activation):
    """fp32 parameters under CPU bf16 autocast, create_graph=True and a gradient-norm penalty: the parameters'
    first and second derivatives are the composed path's bit for bit. The input's agree to bf16 rounding: the op's
    recorded forward casts x to bf16 once for the gate and the rows, so its gate and expert gradients are added in
    bf16, where the composed layer casts twice and adds them in fp32."""
    layer = make_layer(activation, balance_coef=0.01, z_loss_coef=1e-3, dtype=torch.float32)
    x = make_input(NUM_TOKENS, D_MODEL, dtype=torch.float32)
    results = []
    for inp in each_path(layer, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = layer(inp).float().sum() + layer.get_loss()
        params = list(layer.parameters())
        first = torch.autograd.grad(loss, [inp] + params, create_graph=True)
        sum(g.square().sum() for g in first).backward()
        results.append(([g.detach() for g in first], inp.grad, [p.grad for p in params]))
    (first_f, gx_f, gp_f), (first_c, gx_c, gp_c) = results
    for i, (a, b) in enumerate(zip(first_f[1:] + gp_f, first_c[1:] + gp_c, strict=True)):
        assert_bitwise_equal(a, b, f"parameter gradient {i}")
    for name, a, b in (("first", first_f[0], first_c[0]), ("second", gx_f, gx_c)):
        assert a.dtype == b.dtype == torch.float32
        assert (a - b).norm() <= 1e-2 * b.norm(), f"{name}-order input gradient: {(a - b).norm()} vs {b.norm()}"


# ------------------------------------------------------------------------------------------------ no autograd


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_without_autograd(activation, mode, moe_ffn_calls):
    layer = make_layer(activation, balance_coef=0.01, z_loss_coef=1e-3)
    x = make_input(NUM_TOKENS, D_MODEL)
    outputs = []
    for fused in (True, False):
        layer.fused_forward = fused
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            y = layer(x)
        assert y.grad_fn is None
        outputs.append((y, layer.balance_stats()))
    assert len(moe_ffn_calls) == 1, "the fused forward did not run torch.ops.fastmoe.moe_ffn"
    (y_fused, stats_fused), (y_composed, stats_composed) = outputs
    assert_bitwise_equal(y_fused, y_composed, "y")
    assert stats_fused == stats_composed


# ------------------------------------------------------------------------------------------------ fallbacks


def _gate_hook_layer():
    seen = []
    layer = make_layer(gate_hook=lambda idx, score, _: seen.append(idx.shape))
    return layer, seen


def _gate_forward_hook_layer():
    seen = []
    layer = make_layer()
    layer.gate.register_forward_hook(lambda module, args, out: seen.append(out[0].shape))
    return layer, seen


def _experts_pre_hook_layer():
    seen = []
    layer = make_layer()
    layer.experts.htoh4.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    return layer, seen


class _GateSubclass(NaiveGate):
    """A NaiveGate subclass: its forward could do anything, so the layer must call it."""


FALLBACKS = {
    "gate-hook": _gate_hook_layer,
    "gate-forward-hook": _gate_forward_hook_layer,
    "experts-pre-hook": _experts_pre_hook_layer,
    "gate-subclass": lambda: (make_layer(gate=_GateSubclass(D_MODEL, NUM_EXPERT, 1, TOP_K)), None),
    # the same function as the named "gelu", but a callable the op cannot know
    "custom-activation": lambda: (make_layer(activation=lambda h: F.gelu(h)), None),
}


@pytest.mark.parametrize("case", sorted(FALLBACKS))
def test_fallback_gives_the_named_layers_result(case, moe_ffn_calls):
    """Each of these layers computes what the plain NaiveGate/gelu layer computes, but through the composed path
    (hooks see their calls), with the same bits as the fused plain layer."""
    layer, seen = FALLBACKS[case]()
    x = make_input(NUM_TOKENS, D_MODEL)
    run = Run(layer, x, True, add_loss=True)
    assert not moe_ffn_calls, f"{case}: the layer ran the fused op"
    if seen is not None:
        assert len(seen) == 1, f"{case}: the hook saw {len(seen)} calls"
    plain = Run(make_layer(), x, True, add_loss=True)
    assert len(moe_ffn_calls) == 1, "the plain layer did not run the fused op"
    assert_same_runs(run, plain)


def test_global_forward_hook_takes_the_composed_path(moe_ffn_calls):
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: seen.append(type(module)))
    try:
        layer = make_layer()
        y = layer(make_input(NUM_TOKENS, D_MODEL))
    finally:
        handle.remove()
    assert not moe_ffn_calls, "a global forward hook must see the gate's and the experts' calls"
    assert NaiveGate in seen and nn.Linear in seen, seen
    layer.fused_forward = False
    assert_bitwise_equal(y, layer(make_input(NUM_TOKENS, D_MODEL)), "y")


@pytest.mark.parametrize("case", ["tanh-activation", "gshard-gate"])
def test_custom_activation_or_other_gate(case, moe_ffn_calls):
    """A tanh callable, or GShardGate (top-2 with capacity and random routing): the composed path either way, and
    fused_forward does not change the result (the same seed for the gate's random routing)."""
    if case == "gshard-gate":
        layer = make_layer(gate=GShardGate(D_MODEL, NUM_EXPERT, 1, 2, capacity=(1.0, 2.0)))
    else:
        layer = make_layer(activation=torch.tanh)
    x = make_input(NUM_TOKENS, D_MODEL)
    torch.manual_seed(3)
    fused = Run(layer, x, True, add_loss=True)
    torch.manual_seed(3)
    composed = Run(layer, x, False, add_loss=True)
    assert not moe_ffn_calls, f"{case}: the layer ran the fused op"
    assert_same_runs(fused, composed)


def test_debug_mode_takes_the_composed_path(moe_ffn_calls):
    """In debug mode (fastmoe.set_debug) the composed path checks the logits and the experts' outputs: a NaN in
    the input raises there, and a finite input gives the fused path's result."""
    layer = make_layer(balance_coef=0.01)
    x = make_input(NUM_TOKENS, D_MODEL)
    plain = Run(layer, x, True, add_loss=True)
    assert len(moe_ffn_calls) == 1
    previous = fastmoe.set_debug(True)
    try:
        checked = Run(layer, x, True, add_loss=True)
        bad = x.clone()
        bad[3, 1] = float("nan")
        with pytest.raises(fastmoe.debug.NonFiniteError, match="gate logits"):
            layer(bad)
    finally:
        fastmoe.set_debug(previous)
    assert len(moe_ffn_calls) == 1, "debug mode ran the fused op"
    assert_same_runs(checked, plain)


# ------------------------------------------------------------------------------------------------ the op itself


@pytest.mark.parametrize("num_tokens", [0, 9])
@pytest.mark.parametrize("balance_coef, z_loss_coef", COEFS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_meta_shapes(dtype, activation, balance_coef, z_loss_coef, num_tokens):
    """On meta tensors the op gives the shapes and dtypes of the CPU kernel: y [T, d_out], a 0-dim term per
    nonzero coefficient ([0] otherwise), expert_counts [E] int64."""
    d_out, hidden = 5, D_HIDDEN
    h1 = 2 * hidden if activation == "swiglu" else hidden
    gen = make_generator(4)
    shapes = [(num_tokens, D_MODEL), (NUM_EXPERT, D_MODEL), (NUM_EXPERT,), (NUM_EXPERT, h1, D_MODEL), (NUM_EXPERT, h1)]
    shapes += [(NUM_EXPERT, d_out, hidden), (NUM_EXPERT, d_out)]
    tensors = [torch.randn(shape, generator=gen).to(dtype) for shape in shapes]
    options = (TOP_K, activation, balance_coef, z_loss_coef)
    real = torch.ops.fastmoe.moe_ffn(*tensors, *options)
    fake = torch.ops.fastmoe.moe_ffn(*[t.to("meta") for t in tensors], *options)
    expected_shapes = [(num_tokens, d_out), () if balance_coef else (0,), () if z_loss_coef else (0,), (NUM_EXPERT,)]
    for i, (r, f, shape) in enumerate(zip(real, fake, expected_shapes, strict=True)):
        assert f.device.type == "meta", f"output {i} on {f.device}"
        assert f.shape == r.shape == shape, f"output {i}: meta {tuple(f.shape)}, cpu {tuple(r.shape)}, want {shape}"
        assert f.dtype == r.dtype, f"output {i}: meta {f.dtype}, cpu {r.dtype}"
    assert fake[0].dtype == dtype and fake[3].dtype == torch.int64


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
def test_compiles_with_dynamic_shapes_under_autocast(recompute):
    """torch.compile with dynamic shapes traces the op on symbolic sizes; under autocast its forward casts the
    fp32 inputs to bf16 (which it carves from one allocation when the sizes are concrete). The compiled call gives
    the eager call's outputs and gradients bit for bit (aot_eager runs the same kernels), also with the activation
    recomputed, whose backward then meets a recomputed activation of symbolic size."""
    gen = make_generator(5)
    shapes = [
        (9, D_MODEL),
        (NUM_EXPERT, D_MODEL),
        (NUM_EXPERT,),
        (NUM_EXPERT, D_HIDDEN, D_MODEL),
        (NUM_EXPERT, D_HIDDEN),
    ]
    shapes += [(NUM_EXPERT, D_MODEL, D_HIDDEN), (NUM_EXPERT, D_MODEL)]
    leaves = [torch.randn(shape, generator=gen).requires_grad_(True) for shape in shapes]

    def call(*tensors):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, balance, _, _ = torch.ops.fastmoe.moe_ffn(*tensors, TOP_K, "gelu", 0.01, 0.0, recompute)
        return y.float().square().sum() + balance

    compiled = torch.compile(call, backend="aot_eager", dynamic=True, fullgraph=True)
    results = []
    for fn in (call, compiled):
        for tensor in leaves:
            tensor.grad = None
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [tensor.grad.clone() for tensor in leaves])
    for i, (eager, traced) in enumerate(zip(*results, strict=True)):
        assert_bitwise_equal(traced, eager, f"output {i}")


@pytest.mark.parametrize("fused", [True, False], ids=["one-op", "composed"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_compiled_layer_matches_eager(activation, fused):
    """torch.compile of the layer traces the one op fastmoe::moe_ffn, as one graph (fullgraph=True), when the eager
    layer would run it (fused_forward); the composed path compiles with graph breaks (dynamo does not trace the
    methods of the token path's C++ object). Either way the compiled layer gives the eager layer's output, the
    gradients of the input and of every parameter and the gate's loss bit for bit (aot_eager runs the same
    kernels), and the balance record of the compiled forward."""
    traced = []

    def recording_backend(graph_module, example_inputs):
        traced.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)

    torch._dynamo.reset()
    layer = make_layer(activation, balance_coef=0.01)
    layer.fused_forward = fused
    x = make_input(NUM_TOKENS, D_MODEL)
    compiled = torch.compile(layer, backend=recording_backend, fullgraph=fused)
    runs = []
    for forward in (layer, compiled):
        layer.zero_grad(set_to_none=True)
        inp = leaf(x)
        y = forward(inp)
        loss = y.square().sum() + layer.get_loss()
        loss.backward()
        runs.append(([y, loss, inp.grad] + [p.grad for p in layer.parameters()], layer.balance_stats()))
    assert traced, "the backend saw no graph"
    assert any("fastmoe.moe_ffn" in target for target in traced) == fused, sorted(set(traced))
    (eager, eager_stats), (compiled_run, compiled_stats) = runs
    for i, (a, b) in enumerate(zip(compiled_run, eager, strict=True)):
        assert_bitwise_equal(a, b, f"tensor {i} (y, loss, grad of x, then the parameters' grads)")
    assert compiled_stats == eager_stats


class _Lifetimes(TorchDispatchMode):
    """Records, at each op call, which of the tensors it tracks are still alive (held anywhere: a saved tensor, a
    local of the op's C++ backward). It keeps only weak references, so it does not extend any tensor's life."""

    def __init__(self):
        super().__init__()
        self.tracked, self.calls, self.phase = [], [], "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        alive = {label for label, ref in self.tracked if ref() is not None}
        self.calls.append((self.phase, name, alive))
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) else out
        count = sum(1 for phase, n, _ in self.calls if (phase, n) == (self.phase, name))
        self.tracked.append((f"{self.phase}:{name}#{count}", weakref.ref(first)))
        return out

    def alive_at(self, phase: str, name: str, occurrence: int = 1) -> set:
        matches = [alive for p, n, alive in self.calls if (p, n) == (phase, name)]
        assert len(matches) >= occurrence, f"{phase}: {name} called {len(matches)} times, {[c[:2] for c in self.calls]}"
        return matches[occurrence - 1]


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_backward_frees_each_large_tensor_after_its_last_read(activation, recompute):
    """The op's backward holds no tensor of [tokens * top_k, ...] past its last read, as autograd's composed graph
    would not: the second GEMM's output (read by the weighted combine's backward) and the gathered output gradient are
    gone when the activation's backward runs, and so is the activation (read by the second GEMM's backward), kept by
    the forward or recomputed (recompute_activation); the first GEMM's output is gone when the first GEMM's backward
    runs. (With biases the combine is weighted.)"""
    # an activation of 32 MiB (2048 tokens * top_k 2 * 2048 fp32 values), which the op recomputes on request
    layer = make_layer(activation, bias=True, dtype=torch.float32, d_hidden=2048)
    layer.recompute_activation = recompute
    x = make_input(2048, D_MODEL, dtype=torch.float32).requires_grad_(True)
    activation_op = "aten.gelu" if activation == "gelu" else "fastmoe.swiglu"
    activation_backward = "aten.gelu_backward" if activation == "gelu" else "fastmoe.swiglu_backward"
    lifetimes = _Lifetimes()
    with lifetimes:
        y = layer(x)
        lifetimes.phase = "backward"
        y.square().sum().backward()
    h, ys = "forward:fastmoe.grouped_linear#1", "forward:fastmoe.grouped_linear#2"
    a = f"{'backward' if recompute else 'forward'}:{activation_op}#1"
    grad_ys = "backward:fastmoe.unpermute_combine_backward#1"
    recomputes = sum(1 for phase, name, _ in lifetimes.calls if (phase, name) == ("backward", activation_op))
    assert recomputes == (1 if recompute else 0), f"the activation ran {recomputes} times in the backward"
    assert {h, ys} <= lifetimes.alive_at("backward", "fastmoe.unpermute_combine_backward"), "the saved tensors"
    # The second GEMM's backward in two calls (the activation is 32 MiB): its weight gradients read a, then a is
    # freed before its input gradient is made.
    assert {a, grad_ys} <= lifetimes.alive_at("backward", "fastmoe.grouped_linear_backward", 1)
    second_input_grad = lifetimes.alive_at("backward", "fastmoe.grouped_linear_backward", 2)
    assert a not in second_input_grad and h in second_input_grad, "a held into grad_a, or h dropped before its read"
    assert not {ys, grad_ys, a} & lifetimes.alive_at("backward", activation_backward), (
        "held into the activation's backward"
    )
    assert h not in lifetimes.alive_at("backward", "fastmoe.grouped_linear_backward", 3), "h held into the first GEMM's"
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())


# Rows of 2048 tokens * top_k 2 * d_model 2048 in fp64 (64 MiB), past the op's host-bound size of 32 MiB.
WIDE_MODEL = 2048


@pytest.mark.parametrize("frozen", [None, "experts.htoh4"], ids=["all-trained", "first-gemm-frozen"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_large_rows_gemm_backward_gives_the_same_bits(activation, frozen, moe_ffn_calls):
    """Past 32 MiB of rows the first GEMM's backward makes its weight gradients, frees the rows, then makes their
    gradient (two calls of grouped_linear_backward); with the first GEMM frozen the rows are not kept at all. Both
    give the composed path's gradients bit for bit."""
    rows_bytes = 2048 * TOP_K * WIDE_MODEL * torch.finfo(torch.float64).bits // 8
    assert rows_bytes >= HOST_BOUND_BYTES, "the rows must be large enough for the split backward"
    layer = make_layer(activation, True, 0.01, 1e-3, d_model=WIDE_MODEL)
    assert_frozen_runs_agree(layer, make_input(2048, WIDE_MODEL), frozen, moe_ffn_calls)


@pytest.mark.parametrize("frozen", [None, "experts.htoh4", "experts.h4toh"], ids=["all-trained", "w1", "w2"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_large_split_backward_in_deterministic_mode(activation, frozen, moe_ffn_calls):
    """Deterministic mode (the CPU reference GEMMs) with the split backward and with frozen weights: the reference
    reads x only for the weight gradient, so each input gradient made from a stand-in, and every gradient, equal
    the composed path's bit for bit."""
    layer = make_layer(activation, True, 0.01, 1e-3, d_model=WIDE_MODEL)
    with deterministic_mode():
        assert_frozen_runs_agree(layer, make_input(2048, WIDE_MODEL), frozen, moe_ffn_calls)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("frozen", [None, "experts.htoh4", "experts.h4toh"], ids=["all-trained", "w1", "w2"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_large_split_backward_cuda(activation, frozen, moe_ffn_calls):
    """On the GPU's grouped GEMM (CUTLASS or torch._grouped_mm for bf16 on sm_90, else the tiled kernel): rows and
    activation of 32 MiB each, so both GEMMs' backwards make the input gradient from a shape-only stand-in after
    freeing the input, and with a weight frozen its input is not kept at all. A kernel that read the stand-in would
    give other bits than the composed path, which keeps every input."""
    layer = make_layer(activation, True, 0.01, 1e-3, dtype=torch.bfloat16, d_model=WIDE_MODEL, d_hidden=WIDE_MODEL)
    x = make_input(4096, WIDE_MODEL, dtype=torch.bfloat16).cuda()
    assert x.numel() * TOP_K * x.element_size() >= HOST_BOUND_BYTES, "the rows must be large enough to split"
    assert_frozen_runs_agree(layer.cuda(), x, frozen, moe_ffn_calls)


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_rows_freed_before_their_gradient(frozen):
    """The permuted rows are read back only for the first GEMM's weight gradient: past 32 MiB they are freed before
    the rows' gradient is made (the third grouped_linear_backward call, after the second GEMM's and the first's
    weight gradients), and with that weight frozen they are not kept for the backward."""
    layer = make_layer("gelu", bias=True, dtype=torch.float32, d_model=WIDE_MODEL)
    layer.experts.htoh4.weight.requires_grad_(not frozen)
    x = make_input(4096, WIDE_MODEL, dtype=torch.float32).requires_grad_(True)  # 64 MiB of fp32 rows
    lifetimes = _Lifetimes()
    with lifetimes:
        y = layer(x)
        lifetimes.phase = "backward"
        y.square().sum().backward()
    rows = "forward:fastmoe.permute#1"
    calls = [
        alive
        for phase, name, alive in lifetimes.calls
        if (phase, name) == ("backward", "fastmoe.grouped_linear_backward")
    ]
    if frozen:
        assert rows not in lifetimes.alive_at("backward", "fastmoe.unpermute_combine_backward"), "rows kept, w1 frozen"
        assert len(calls) == 2, "one call a GEMM"
        assert layer.experts.htoh4.weight.grad is None
    else:
        assert rows in lifetimes.alive_at("backward", "fastmoe.unpermute_combine_backward"), "the saved rows"
        assert len(calls) == 3, "the first GEMM's backward in two calls"
        assert rows in calls[1] and rows not in calls[2], "rows held into their gradient"
        assert layer.experts.htoh4.weight.grad is not None
    assert x.grad is not None and layer.experts.h4toh.weight.grad is not None


def test_activation_is_not_kept_for_a_frozen_second_gemm():
    """The activation is read back only for the second GEMM's weight gradient: with that weight frozen the op does
    not keep it for the backward (it is gone when the backward starts), and the gradients asked for still come."""
    layer = make_layer("gelu", bias=True, dtype=torch.float32)
    layer.experts.h4toh.weight.requires_grad_(False)
    x = make_input(NUM_TOKENS, D_MODEL, dtype=torch.float32).requires_grad_(True)
    lifetimes = _Lifetimes()
    with lifetimes:
        y = layer(x)
        lifetimes.phase = "backward"
        y.square().sum().backward()
    at_start = lifetimes.alive_at("backward", "fastmoe.unpermute_combine_backward")
    assert "forward:fastmoe.grouped_linear#1" in at_start, "h, which the activation's backward reads, is kept"
    assert "forward:aten.gelu#1" not in at_start, "the activation was kept for a frozen second GEMM"
    assert layer.experts.h4toh.weight.grad is None
    assert x.grad is not None and layer.experts.htoh4.weight.grad is not None
