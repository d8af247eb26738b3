"""FMoE, FMoETransformerMLP, FMoELinear and NaiveGate against plain-PyTorch references: outputs and every
gradient, the dense limit, determinism, custom experts, hooks, losses, shapes and empty inputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import (
    assert_bitwise_equal,
    assert_within_policy,
    make_generator,
    randn,
)
from fastmoe import FMoE, FMoELinear, FMoETransformerMLP, ops
from fastmoe.gates import BaseGate, NaiveGate
from fastmoe.testing import dense_mlp, reference_moe_mlp, reference_route_topk
from fastmoe.transformer import swiglu

D_MODEL, D_HIDDEN, NUM_TOKENS = 8, 12, 24

SWEEP = [
    pytest.param(num_expert, top_k, id=f"E{num_expert}-k{top_k}")
    for num_expert in (1, 2, 3, 8, 16)
    for top_k in (1, 2, 3, 4)
    if top_k <= num_expert
]
VARIANTS = {
    "gelu": dict(activation=None, bias=True),
    "swiglu": dict(activation="swiglu", bias=True),
    "no-bias": dict(activation=None, bias=False, gate_bias=False),
}


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter drawn afresh (biases included, which FMoELinear initialises to zero)."""
    gen = make_generator(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64).mul_(0.4))
    return module


def make_mlp(num_expert, top_k, dtype=torch.float64, seed=0, d_model=D_MODEL, d_hidden=D_HIDDEN, **kwargs):
    torch.manual_seed(seed)
    layer = FMoETransformerMLP(num_expert=num_expert, d_model=d_model, d_hidden=d_hidden, top_k=top_k, **kwargs)
    return randomize_(layer, seed).to(dtype)


def mlp_parameters(layer: FMoETransformerMLP):
    """(name, parameter) of the six tensors the reference takes; None where the layer has no bias."""
    return [
        ("gate.gate.weight", layer.gate.gate.weight),
        ("gate.gate.bias", layer.gate.gate.bias),
        ("experts.htoh4.weight", layer.experts.htoh4.weight),
        ("experts.htoh4.bias", layer.experts.htoh4.bias),
        ("experts.h4toh.weight", layer.experts.h4toh.weight),
        ("experts.h4toh.bias", layer.experts.h4toh.bias),
    ]


def compare_with_reference(layer, x, activation, atol, grad_out=None):
    """Runs the layer and reference_moe_mlp on leaf copies of the same parameters; compares the outputs and
    the gradients of the input and of every parameter."""
    named = mlp_parameters(layer)
    params = [p for _, p in named if p is not None]
    ref_params = [None if p is None else p.detach().clone().requires_grad_() for _, p in named]
    x_layer, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(x_layer)
    y_ref = reference_moe_mlp(x_ref, *ref_params, top_k=layer.top_k, activation=activation)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=atol)
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=make_generator(99), dtype=torch.float64).to(y.dtype)
    got = torch.autograd.grad(y, [x_layer] + params, grad_out)
    want = torch.autograd.grad(y_ref, [x_ref] + [p for p in ref_params if p is not None], grad_out)
    names = ["input"] + [name for name, p in named if p is not None]
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=atol, msg=lambda m, name=name: f"grad of {name}: {m}")


# ------------------------------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("num_expert,top_k", SWEEP)
def test_mlp_matches_reference_fp64(variant, num_expert, top_k):
    config = dict(VARIANTS[variant])
    layer = make_mlp(num_expert, top_k, seed=num_expert * 10 + top_k, **config)
    assert (layer.experts.htoh4.bias is None) == (not config["bias"])
    assert (layer.gate.gate.bias is None) == (not config.get("gate_bias", True))
    x = randn(NUM_TOKENS, D_MODEL, gen=make_generator(num_expert + top_k))
    activation = swiglu if config["activation"] == "swiglu" else F.gelu
    compare_with_reference(layer, x, activation, atol=1e-10)


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu", "callable-tanh"])
def test_mlp_named_and_callable_activations(activation):
    fn = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "callable-tanh": torch.tanh}[activation]
    layer = make_mlp(4, 2, activation=fn if activation == "callable-tanh" else activation)
    compare_with_reference(layer, randn(20, D_MODEL, gen=make_generator(1)), fn, atol=1e-10)


@pytest.mark.parametrize("activation", [None, "swiglu"], ids=["gelu", "swiglu"])
def test_mlp_widths_not_multiple_of_8(activation):
    layer = make_mlp(5, 2, d_model=13, d_hidden=7, activation=activation)
    x = randn(NUM_TOKENS, 13, gen=make_generator(22))
    compare_with_reference(layer, x, swiglu if activation == "swiglu" else F.gelu, atol=1e-10)


def test_swiglu_parameter_layout():
    layer = make_mlp(3, 2, activation="swiglu")
    assert layer.experts.htoh4.weight.shape == (3, 2 * D_HIDDEN, D_MODEL)
    assert layer.experts.h4toh.weight.shape == (3, D_MODEL, D_HIDDEN)


def test_one_expert_top1_is_the_dense_mlp():
    layer = make_mlp(1, 1)
    x, x_dense = (randn(30, D_MODEL, gen=make_generator(2)).requires_grad_() for _ in range(2))
    params = [
        layer.experts.htoh4.weight[0],
        layer.experts.htoh4.bias[0],
        layer.experts.h4toh.weight[0],
        layer.experts.h4toh.bias[0],
    ]
    dense_params = [p.detach().clone().requires_grad_() for p in params]
    y = layer(x)
    y_dense = dense_mlp(x_dense, *dense_params, F.gelu)
    torch.testing.assert_close(y, y_dense, rtol=0, atol=1e-12)
    grad_out = randn(30, D_MODEL, gen=make_generator(3))
    leaves = [
        layer.experts.htoh4.weight,
        layer.experts.htoh4.bias,
        layer.experts.h4toh.weight,
        layer.experts.h4toh.bias,
    ]
    got = torch.autograd.grad(y, [x] + leaves, grad_out)
    want = torch.autograd.grad(y_dense, [x_dense] + dense_params, grad_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.reshape(w.shape), w, rtol=0, atol=1e-12)


def test_mlp_fp32_within_policy(device):
    """fp32 on each device: error vs the fp64 reference within 2x that of the fp32 PyTorch reference."""
    layer = make_mlp(8, 2, dtype=torch.float32).to(device)
    x = randn(64, D_MODEL, gen=make_generator(4), dtype=torch.float32, device=device)
    named = [(n, p) for n, p in mlp_parameters(layer)]
    y = layer(x)
    y_32 = reference_moe_mlp(x, *[p for _, p in named], top_k=2, activation=F.gelu)
    y_64 = reference_moe_mlp(x.double(), *[p.double() for _, p in named], top_k=2, activation=F.gelu)
    assert_within_policy(y, y_64, y_32, "y")


def test_deterministic_runs_bitwise_equal():
    layer = make_mlp(8, 2, dtype=torch.float32)
    x = randn(40, D_MODEL, gen=make_generator(5), dtype=torch.float32)
    grad_out = randn(40, D_MODEL, gen=make_generator(6), dtype=torch.float32)
    runs = []
    for _ in range(2):
        x_in = x.clone().requires_grad_()
        y = layer(x_in)
        runs.append([y] + list(torch.autograd.grad(y, [x_in] + list(layer.parameters()), grad_out)))
    # Run-to-run on one machine: every torch GEMM (the gate, the CPU grouped_linear) sees the same shapes, so
    # its blocking and rounding repeat; across machines or thread counts they need not.
    for a, b in zip(*runs, strict=True):
        assert_bitwise_equal(a, b)


# ------------------------------------------------------------------------------------------------ FMoE


def loop_reference(layer: FMoE, x: torch.Tensor) -> torch.Tensor:
    """FMoE in plain PyTorch: NaiveGate's routing with torch.topk/softmax, then every expert on every token,
    masked by its score."""
    idx, score = reference_route_topk(layer.gate.gate(x), layer.top_k, "topk_softmax")
    y = 0
    for e, expert in enumerate(layer.experts):
        weight = (score * (idx == e)).sum(dim=-1, keepdim=True)
        y = y + weight * expert(x)
    return y


def check_fmoe_against_loop(layer, x, atol=1e-12):
    x_layer, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = layer(x_layer), loop_reference(layer, x_ref)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=atol)
    params = list(layer.parameters())
    grad_out = torch.randn(y.shape, generator=make_generator(7), dtype=y.dtype)
    got = torch.autograd.grad(y, [x_layer] + params, grad_out, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(y_ref, [x_ref] + params, grad_out, allow_unused=True, materialize_grads=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=atol)


def sequential_expert(d):
    return nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), nn.Linear(2 * d, d))


@pytest.mark.parametrize("num_expert,top_k", [(1, 1), (3, 2), (4, 4), (6, 3)], ids=lambda v: str(v))
def test_fmoe_custom_experts_match_loop(num_expert, top_k):
    torch.manual_seed(8)
    layer = FMoE(num_expert=num_expert, d_model=D_MODEL, top_k=top_k, expert=sequential_expert).double()
    check_fmoe_against_loop(layer, randn(NUM_TOKENS, D_MODEL, gen=make_generator(9)))


def test_fmoe_heterogeneous_expert_list():
    makers = [
        sequential_expert,
        lambda d: nn.Linear(d, d),
        lambda d: nn.Sequential(nn.Linear(d, 3, bias=False), nn.ReLU(), nn.Linear(3, d)),
        lambda d: nn.Identity(),
    ]
    torch.manual_seed(10)
    layer = FMoE(num_expert=4, d_model=D_MODEL, top_k=2, expert=makers).double()
    assert isinstance(layer.experts[3], nn.Identity) and isinstance(layer.experts[1], nn.Linear)
    check_fmoe_against_loop(layer, randn(NUM_TOKENS, D_MODEL, gen=make_generator(11)))


def test_fmoe_expert_with_no_tokens_gets_zero_grad():
    """A gate that never picks expert 2: its parameters get exactly zero gradient, fused or module experts."""
    for layer in (make_mlp(4, 2), FMoE(4, D_MODEL, top_k=2, expert=sequential_expert).double()):
        with torch.no_grad():
            layer.gate.gate.bias[2] = -1e4
        x = randn(NUM_TOKENS, D_MODEL, gen=make_generator(12))
        idx, _ = layer.gate(x)
        assert not (idx == 2).any()
        layer.zero_grad(set_to_none=True)
        layer(x).pow(2).sum().backward()
        if isinstance(layer, FMoETransformerMLP):
            for lin in (layer.experts.htoh4, layer.experts.h4toh):
                assert_bitwise_equal(lin.weight.grad[2], torch.zeros_like(lin.weight[2]))
                assert_bitwise_equal(lin.bias.grad[2], torch.zeros_like(lin.bias[2]))
                assert (lin.weight.grad[[0, 1, 3]] != 0).any()
        else:
            assert all(p.grad is None or (p.grad == 0).all() for p in layer.experts[2].parameters())


def test_every_token_to_one_expert():
    layer = make_mlp(3, 1)
    with torch.no_grad():
        layer.gate.gate.bias.copy_(torch.tensor([0.0, 1e4, 0.0], dtype=torch.float64))
    x = randn(NUM_TOKENS, D_MODEL, gen=make_generator(13))
    assert (layer.gate(x)[0] == 1).all()
    compare_with_reference(layer, x, F.gelu, atol=1e-10)


def test_gate_hook_receives_routing():
    calls = []
    layer = make_mlp(4, 2, gate_hook=lambda *args: calls.append(args))
    x = randn(10, D_MODEL, gen=make_generator(14))
    layer(x)
    assert len(calls) == 1
    topk_idx, topk_score, third = calls[0]
    assert third is None
    idx, score = layer.gate(x)
    assert_bitwise_equal(topk_idx, idx, "topk_idx")
    assert_bitwise_equal(topk_score.detach(), score.detach(), "topk_score")
    assert topk_idx.shape == (10, 2) and topk_idx.dtype == torch.int64


def test_get_loss_is_a_usable_zero():
    layer = make_mlp(4, 2)
    x = randn(10, D_MODEL, gen=make_generator(15)).requires_grad_()
    task_loss = layer(x).square().mean()
    aux = layer.get_loss()
    assert isinstance(aux, torch.Tensor) and aux.dim() == 0 and aux.item() == 0.0
    total = task_loss + layer.get_loss()
    total.backward()
    assert x.grad is not None
    torch.testing.assert_close(total, task_loss, rtol=0, atol=0)  # x + 0.0 is x, exactly


def test_gate_get_loss_is_returned():
    """A gate with a balance loss: layer.get_loss() hands it over (and clears it)."""

    class LossGate(NaiveGate):
        def forward(self, inp):
            topk_idx, topk_score = super().forward(inp)
            self.set_loss(topk_score.sum() * 0 + 3.5)
            return topk_idx, topk_score

    layer = FMoE(4, D_MODEL, top_k=2, gate=LossGate, expert=lambda d: nn.Linear(d, d))
    layer(torch.randn(5, D_MODEL))
    assert layer.get_loss().item() == 3.5
    assert layer.get_loss().item() == 0.0  # cleared by the first call
    assert isinstance(layer.gate, BaseGate)


@pytest.mark.parametrize("shape", [(2, 5, D_MODEL), (3, 1, 4, D_MODEL), (D_MODEL,)], ids=["BSd", "ABSd", "d"])
def test_input_shape_is_preserved(shape):
    layer = make_mlp(4, 2)
    x = randn(*shape, gen=make_generator(16))
    y = layer(x)
    assert y.shape == x.shape
    # The layer flattens to the same [T, d] tokens either way: the same ops on the same shapes, bitwise.
    assert_bitwise_equal(y.reshape(-1, D_MODEL), layer(x.reshape(-1, D_MODEL)))


@pytest.mark.parametrize("shape", [(0, D_MODEL), (2, 0, D_MODEL)], ids=["0xd", "2x0xd"])
def test_zero_tokens_forward_backward(shape):
    for layer in (
        make_mlp(4, 2),
        make_mlp(3, 3, activation="swiglu"),
        FMoE(4, D_MODEL, top_k=2, expert=sequential_expert).double(),
    ):
        x = torch.empty(shape, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        assert y.shape == shape
        y.sum().backward()
        assert x.grad.shape == shape
        for name, p in layer.named_parameters():
            assert p.grad is None or (p.grad == 0).all(), name


# ------------------------------------------------------------------------------------------------ parts


def test_fmoe_linear_counts_and_offsets_agree():
    torch.manual_seed(17)
    lin = FMoELinear(3, 5, 4).double()
    randomize_(lin, 17)
    counts = torch.tensor([2, 0, 4])
    x = randn(7, 5, gen=make_generator(18))  # one tail row
    y_counts = lin(x, counts)
    y_offsets = lin(x, expert_offsets=ops.counts_to_offsets(counts))
    assert_bitwise_equal(y_counts, y_offsets)
    assert_bitwise_equal(lin(x, counts.int()), y_counts)
    expected = torch.cat(
        [
            x[:2] @ lin.weight[0].t() + lin.bias[0],
            x[2:6] @ lin.weight[2].t() + lin.bias[2],
            torch.zeros(1, 4, dtype=torch.float64),
        ]
    )
    torch.testing.assert_close(y_counts, expected, rtol=0, atol=1e-13)


def test_fmoe_linear_layout_and_init():
    lin = FMoELinear(3, 5, 4)
    assert lin.weight.shape == (3, 4, 5) and lin.bias.shape == (3, 4)
    assert (lin.bias == 0).all() and lin.weight.abs().max() <= 5**-0.5
    assert FMoELinear(2, 5, 4, bias=False).bias is None


def test_naive_gate_matches_reference():
    torch.manual_seed(19)
    gate = NaiveGate(D_MODEL, 3, world_size=1, top_k=2).double()
    x = randn(20, D_MODEL, gen=make_generator(20))
    idx, score, logits = gate(x, return_all_scores=True)
    # The logits follow the formula within rounding (nn.Linear's addmm and a matmul plus add round differently,
    # and how depends on the CPU's BLAS); they are the same op on the same shapes as gate.gate(x), so bitwise.
    torch.testing.assert_close(logits, x @ gate.gate.weight.t() + gate.gate.bias, rtol=0, atol=1e-14)
    assert_bitwise_equal(logits, gate.gate(x), "logits")
    # The routing of those logits: ids are compared values, bitwise; the scores are fastmoe's softmax against
    # torch's, within rounding.
    ref_idx, ref_score = reference_route_topk(logits, 2)
    assert_bitwise_equal(idx, ref_idx)
    torch.testing.assert_close(score, ref_score, rtol=0, atol=1e-14)


def test_naive_gate_routes_over_global_experts():
    gate = NaiveGate(D_MODEL, 2, world_size=3, top_k=4)
    assert gate.gate.out_features == 6 and gate.tot_expert == 6
    with torch.no_grad():
        gate.gate.weight.zero_()
        gate.gate.bias.copy_(torch.arange(6.0))
    idx, _ = gate(torch.randn(3, D_MODEL))
    assert idx.tolist() == [[5, 4, 3, 2]] * 3


def test_route_scores_sum_to_one_in_layer():
    layer = make_mlp(8, 3)
    _, score = layer.gate(randn(12, D_MODEL, gen=make_generator(21)))
    torch.testing.assert_close(score.sum(-1), torch.ones(12, dtype=torch.float64), rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------------ per-forward state


def test_per_forward_state_keeps_module_semantics():
    """Layers and gates set their per-forward state (losses, drop count, balance record) straight in the module's
    __dict__; a parameter, buffer, submodule or class property of the same name still gets Module's setattr."""
    from fastmoe._checks import set_plain

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("counts", torch.zeros(2))
            self.inner = nn.Linear(2, 2)
            self.seen = []

        @property
        def watched(self):
            return self.seen[-1] if self.seen else None

        @watched.setter
        def watched(self, value):
            self.seen.append(value)

    holder = Holder()
    set_plain(holder, plain=torch.ones(1), counts=torch.full((2,), 3.0), watched=7)
    assert "plain" in holder.__dict__ and torch.equal(holder.plain, torch.ones(1))
    assert "counts" not in holder.__dict__ and torch.equal(holder._buffers["counts"], torch.full((2,), 3.0))
    assert holder.seen == [7] and holder.watched == 7 and "watched" not in holder.__dict__
    with pytest.raises(TypeError, match="inner"):
        set_plain(holder, inner=3)  # as setattr: a submodule cannot become an int


def test_gate_state_and_balance_record_after_a_fused_forward():
    """The fused layer's forward leaves the gate's loss terms, drop count and the balance record in place."""
    layer = FMoETransformerMLP(num_expert=4, d_model=8, d_hidden=16, top_k=2)
    layer.gate.balance_coef = 0.01
    layer(torch.randn(6, 8))
    assert set(layer.gate.get_losses(clear=False)) == {"balance"}
    assert layer.gate.num_dropped is None
    assert layer.balance_record.num_tokens == 6 and layer.balance_record.num_slots == 12
    assert int(layer.balance_record.expert_counts.sum()) == 12
    assert not layer.balance_record.expert_counts.requires_grad
    assert all(not loss.requires_grad for loss in layer.balance_record.losses.values())
