"""Registration of torch.ops.fastmoe: every op is known and classified, has its backend and Autograd kernels,
and passes torch.library.opcheck; AOT dispatch of route_topk is checked through torch.compile."""

import pytest
import torch
from torch.library import opcheck

import fastmoe
from conftest import assert_bitwise_equal, distinct_logits, make_generator, random_topk_idx
from fastmoe import ops

# Every op of the library, classified: True = differentiable (must have an Autograd kernel; the backward ops are
# differentiable too, for gradients of gradients). A new op makes
# test_every_registered_op_is_classified fail until it is added here, with opcheck cases below.
KNOWN_OPS = {
    "route_topk": True,
    "route_topk_backward": True,
    "make_plan": False,
    "permute": True,
    "unpermute_combine": True,
    "unpermute_combine_backward": True,
    "grouped_linear": True,
    "grouped_linear_backward": True,
    "capacity_limit": False,
    "balance_loss": True,
    "balance_loss_backward": True,
    "swiglu": True,
    "swiglu_backward": True,
    "swiglu_scaled_backward": True,
    "gelu_backward_bias": False,  # a backward step inside moe_ffn's (first order); its result has no graph
    "exchange_counts": False,
    "ep_route": False,
    "exchange": True,
    "exchange_hierarchical": True,
    "moe_ffn": True,
}

# The gate ops (csrc/ops/gates.cpp) are compositions of the ops above and ATen, registered as
# CompositeImplicitAutograd: every backend, Meta and autograd come from their components, so they have a
# CompositeImplicitAutograd kernel instead of CPU/CUDA/Meta/Autograd ones. tests/gates/test_gates_formulas.py runs
# opcheck, Meta and torch.compile on each of them. check_same_config takes no tensor, so one kernel serves every
# backend (a collective; tests/distributed covers it).
COMPOSITE_OPS = {
    "check_same_config",
    "check_finite",
    # hot-expert replication: the copies are an exchange of selected rows (their autograd and Meta come from those
    # ops); the policy is host code on a CPU load matrix (tests/distributed/test_replication.py, tests/fuzz)
    "replicate_experts",
    "plan_replication",
    "naive_gate",
    "noisy_gate",
    "gshard_gate",
    "switch_gate",
    "switch_jitter",
    "swipe_gate",
    "expert_choice_gate",
    "sigmoid_gate",
    "gate_capacity",
}

# fastmoe.with_cuda is True exactly when the ops have CUDA kernels (nvcc found and torch built with CUDA); such a
# build must then register a CUDA kernel for every op.
CUDA_KERNELS_EXPECTED = True


def registered_ops():
    return sorted(
        name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("fastmoe::")
    )


def has_kernel(op_name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmoe::{op_name}", key)


def test_every_registered_op_is_classified():
    registered = set(registered_ops())
    unknown = registered - set(KNOWN_OPS) - COMPOSITE_OPS
    missing = (set(KNOWN_OPS) | COMPOSITE_OPS) - registered
    assert not unknown, f"ops registered but unknown to this test (classify them in KNOWN_OPS): {sorted(unknown)}"
    assert not missing, f"ops this test expects but the library does not register: {sorted(missing)}"


def test_ops_reachable_from_python():
    for name in set(KNOWN_OPS) | COMPOSITE_OPS:
        assert callable(getattr(torch.ops.fastmoe, name))


@pytest.mark.parametrize("op_name", sorted(COMPOSITE_OPS))
def test_composite_ops_have_only_the_composite_kernel(op_name):
    assert has_kernel(op_name, "CompositeImplicitAutograd"), (
        f"fastmoe::{op_name} has no CompositeImplicitAutograd kernel"
    )
    for key in ("CPU", "CUDA", "Meta", "Autograd"):
        assert not has_kernel(op_name, key), f"composite fastmoe::{op_name} also has a {key} kernel"


@pytest.mark.parametrize("op_name", sorted(KNOWN_OPS))
def test_backend_and_autograd_kernels(op_name):
    assert has_kernel(op_name, "CPU"), f"fastmoe::{op_name} has no CPU kernel"
    assert has_kernel(op_name, "Meta"), f"fastmoe::{op_name} has no Meta kernel"
    if CUDA_KERNELS_EXPECTED and fastmoe.with_cuda:
        assert has_kernel(op_name, "CUDA"), f"fastmoe::{op_name} has no CUDA kernel in a CUDA build"
    if KNOWN_OPS[op_name]:
        assert has_kernel(op_name, "Autograd"), f"differentiable fastmoe::{op_name} has no Autograd kernel"


def test_cuda_kernels_all_or_none():
    """A partial CUDA registration (some ops only) is a build bug; with_cuda says whether they are there."""
    with_cuda = {name: has_kernel(name, "CUDA") for name in KNOWN_OPS}
    assert len(set(with_cuda.values())) == 1, f"CUDA kernels registered for only some ops: {with_cuda}"
    assert any(with_cuda.values()) == fastmoe.with_cuda


def test_with_cuda_flag_is_bool():
    assert isinstance(fastmoe.with_cuda, bool)


# ------------------------------------------------------------------------------------------------ opcheck


def _opcheck_cases():
    """(id, op name, args, opcheck test_utils or None for all) with realistic inputs; float inputs of the
    forward ops require grad so the autograd registration is exercised."""
    gen = make_generator(0)
    num_tokens, num_experts, k, d, d_out = 10, 4, 2, 6, 5
    logits = distinct_logits(num_tokens, num_experts, gen, dtype=torch.float32)
    topk_idx, topk_score = ops.route_topk(logits, k)
    dropped_idx = random_topk_idx(num_tokens, k, num_experts, gen, drop_prob=0.3)
    plan = ops.make_plan(topk_idx, num_experts)
    x = torch.randn(num_tokens, d, generator=gen)
    y_sorted = torch.randn(num_tokens * k, d, generator=gen)
    weight = torch.randn(num_experts, d_out, d, generator=gen)
    bias = torch.randn(num_experts, d_out, generator=gen)
    grad_y_linear = torch.randn(num_tokens * k, d_out, generator=gen)
    grad_y = torch.randn(num_tokens, d, generator=gen)
    hidden_gated, gen_gated = 3, make_generator(4)  # its own stream: the other cases keep their data
    h_gated = torch.randn(num_tokens, 2 * hidden_gated, generator=gen_gated) * 2
    grad_gated = torch.randn(num_tokens, hidden_gated, generator=gen_gated)
    row_scale = torch.rand(num_tokens, generator=gen_gated) + 0.5

    def req(t):
        return t.detach().clone().requires_grad_(True)

    # route_topk: opcheck's test_aot_dispatch_dynamic fails inside the torch harness itself, not in fastmoe:
    # its helper sums the outputs into an accumulator that starts with the int64 topk_idx ("result type Float
    # can't be cast to the desired output type Long"). So route_topk runs the other three checks here, and
    # test_route_topk_aot_dispatch below covers AOT dispatch with torch.compile(backend="aot_eager").
    route_utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    cases = []
    for score_fn in ("topk_softmax", "softmax_topk"):
        cases.append((f"route_topk-{score_fn}", "route_topk", (req(logits), k, score_fn), route_utils))
        _, score = ops.route_topk(logits, k, score_fn)
        cases.append(
            (
                f"route_topk_backward-{score_fn}",
                "route_topk_backward",
                (torch.randn(num_tokens, k, generator=gen), logits, topk_idx, score, score_fn),
                None,
            )
        )
    cases += [
        ("make_plan", "make_plan", (topk_idx, num_experts), None),
        ("make_plan-dropped", "make_plan", (dropped_idx, num_experts), None),
        ("permute", "permute", (req(x), plan.sorted_pair, plan.pair_pos), None),
        (
            "unpermute_combine-score",
            "unpermute_combine",
            (req(y_sorted), plan.sorted_pair, plan.pair_pos, req(topk_score)),
            None,
        ),
        (
            "unpermute_combine-no-score",
            "unpermute_combine",
            (req(y_sorted), plan.sorted_pair, plan.pair_pos, None),
            None,
        ),
        (
            "unpermute_combine_backward-score-grad",
            "unpermute_combine_backward",
            (grad_y, y_sorted, plan.sorted_pair, plan.pair_pos, topk_score, True),
            None,
        ),
        (
            "unpermute_combine_backward-no-score",
            "unpermute_combine_backward",
            (grad_y, y_sorted, plan.sorted_pair, plan.pair_pos, None, False),
            None,
        ),
        (
            "grouped_linear-bias",
            "grouped_linear",
            (req(y_sorted), plan.expert_offsets, req(weight), req(bias)),
            None,
        ),
        (
            "grouped_linear-no-bias",
            "grouped_linear",
            (req(y_sorted), plan.expert_offsets, req(weight), None),
            None,
        ),
        (
            "grouped_linear_backward-all",
            "grouped_linear_backward",
            (grad_y_linear, y_sorted, plan.expert_offsets, weight, [True, True, True]),
            None,
        ),
        (
            "capacity_limit",
            "capacity_limit",
            (dropped_idx, req(torch.rand(num_tokens, k, generator=gen)), torch.tensor([1, 2, 0, 3])),
            None,
        ),
        ("balance_loss", "balance_loss", (req(logits), plan.expert_counts, num_tokens * k, 0.01), None),
        (
            "balance_loss-float64",
            "balance_loss",
            (req(logits.double()), plan.expert_counts, num_tokens * k, 1.0),
            None,
        ),
        (
            "balance_loss_backward",
            "balance_loss_backward",
            (torch.tensor(0.7), req(logits), plan.expert_counts, num_tokens * k, 0.01),
            None,
        ),
        # swiglu: h [..., 2 * hidden] = [gate | up] of any rank, a transposed h, and the backward op with and
        # without inputs that require grad (the latter records ATen ops, for double backward)
        ("swiglu", "swiglu", (req(h_gated),), None),
        ("swiglu-3d-float64", "swiglu", (req(h_gated.double().reshape(2, 5, 2 * hidden_gated)),), None),
        ("swiglu-transposed", "swiglu", (req(h_gated.t().contiguous().t()),), None),
        ("swiglu_backward", "swiglu_backward", (grad_gated, h_gated), None),
        ("swiglu_backward-requires-grad", "swiglu_backward", (req(grad_gated), req(h_gated)), None),
        # with a row scale (the routing scores): fp32, fp64 and a bf16 scale of fp32 rows
        ("swiglu-scaled", "swiglu", (req(h_gated), req(row_scale)), None),
        ("swiglu-scaled-float64", "swiglu", (req(h_gated.double()), req(row_scale.double())), None),
        ("swiglu-scaled-bf16-scale", "swiglu", (req(h_gated), row_scale.bfloat16()), None),
        ("swiglu_scaled_backward", "swiglu_scaled_backward", (grad_gated, h_gated, row_scale), None),
        (
            "swiglu_scaled_backward-requires-grad",
            "swiglu_scaled_backward",
            (req(grad_gated), req(h_gated), req(row_scale)),
            None,
        ),
        # GELU's backward with the first GEMM's bias gradient: rows grouped by the plan's offsets, and offsets that
        # leave a tail of rows past the last expert
        (
            "gelu_backward_bias",
            "gelu_backward_bias",
            (grad_y_linear, y_sorted[:, :d_out] * 2, plan.expert_offsets),
            None,
        ),
        (
            "gelu_backward_bias-tail-float64",
            "gelu_backward_bias",
            (grad_y_linear.double(), y_sorted[:, :d_out].double(), torch.tensor([0, 3, 3, 9, 15])),
            None,
        ),
        ("ep_route", "ep_route", (dropped_idx, 2, 2), None),
        ("ep_route-one-rank", "ep_route", (topk_idx, 4, 1), None),
        (
            "grouped_linear_backward-x-only",
            "grouped_linear_backward",
            (grad_y_linear, y_sorted, plan.expert_offsets, weight, [True, False, False]),
            None,
        ),
    ]
    # moe_ffn: the whole layer (gate linear, naive_gate, the experts' two grouped GEMMs) with and without the
    # optional biases, with and without the gate's loss terms.
    hidden = 7
    gate_weight = torch.randn(num_experts, d, generator=gen)
    gate_bias = torch.randn(num_experts, generator=gen)
    for activation, h1, with_bias, coefs in (
        ("gelu", hidden, True, (0.01, 1e-3)),
        ("relu", hidden, False, (0.0, 0.0)),
        ("swiglu", 2 * hidden, True, (0.0, 0.0)),
        ("silu", hidden, False, (0.01, 0.0)),
    ):
        w1 = torch.randn(num_experts, h1, d, generator=gen) * 0.4
        b1 = torch.randn(num_experts, h1, generator=gen)
        w2 = torch.randn(num_experts, d_out, hidden, generator=gen) * 0.4
        b2 = torch.randn(num_experts, d_out, generator=gen)

        def maybe(t, with_bias=with_bias):
            return req(t) if with_bias else None

        args = (req(x), req(gate_weight), maybe(gate_bias), req(w1), maybe(b1), req(w2), maybe(b2), k, activation)
        bias_id = "bias" if with_bias else "no-bias"
        cases.append((f"moe_ffn-{activation}-{bias_id}-coef{coefs[0]}-{coefs[1]}", "moe_ffn", args + coefs, None))
    return cases


OPCHECK_IDS = [case[0] for case in _opcheck_cases()]


def _exchange_cases(group_name: str):
    """The exchange ops on a one-rank group (a rank exchanging with itself)."""
    gen = make_generator(3)
    x = torch.randn(7, 4, generator=gen).requires_grad_(True)
    return [
        ("exchange_counts", "exchange_counts", (torch.tensor([3, 0, 4]), group_name), None),
        ("exchange", "exchange", (x, [5], [5], group_name, None), None),
        ("exchange-out-rows", "exchange", (x, [5], [5], group_name, 9), None),
        # one node of one rank: the node and rail groups are the one-rank group itself
        ("exchange_hierarchical", "exchange_hierarchical", (x, [5], [5], group_name, group_name, group_name, 9), None),
    ]


def test_opcheck_exchange_ops(one_rank_group):
    for case_id, op_name, args, _ in _exchange_cases(one_rank_group):
        results = opcheck(getattr(torch.ops.fastmoe, op_name).default, args)
        assert all(value == "SUCCESS" for value in results.values()), (case_id, results)


def test_opcheck_covers_every_op():
    covered = {case[1] for case in _opcheck_cases() + _exchange_cases("unused")}
    assert covered == set(KNOWN_OPS), f"ops without an opcheck case: {sorted(set(KNOWN_OPS) - covered)}"


@pytest.mark.parametrize("case_id", OPCHECK_IDS)
def test_opcheck(case_id):
    ((_, op_name, args, test_utils),) = [case for case in _opcheck_cases() if case[0] == case_id]
    op = getattr(torch.ops.fastmoe, op_name).default
    kwargs = {} if test_utils is None else {"test_utils": test_utils}
    results = opcheck(op, args, **kwargs)
    assert all(value == "SUCCESS" for value in results.values()), results


@pytest.mark.parametrize("score_fn", ["topk_softmax", "softmax_topk"])
def test_route_topk_aot_dispatch(score_fn):
    """route_topk with its backward under torch.compile(aot_eager, dynamic=True) equals eager mode, for two
    token counts (the second run reuses the dynamic graph)."""
    torch._dynamo.reset()

    def loss_fn(logits, weights):
        topk_idx, topk_score = torch.ops.fastmoe.route_topk(logits, 2, score_fn)
        return (topk_score * weights).sum(), topk_idx

    compiled = torch.compile(loss_fn, backend="aot_eager", dynamic=True, fullgraph=True)
    gen = make_generator(1)
    for num_tokens in (9, 14):
        logits = distinct_logits(num_tokens, 5, gen)
        weights = torch.randn(num_tokens, 2, generator=gen, dtype=torch.float64)
        eager_in, compiled_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        eager_loss, eager_idx = loss_fn(eager_in, weights)
        compiled_loss, compiled_idx = compiled(compiled_in, weights)
        eager_loss.backward()
        compiled_loss.backward()
        assert_bitwise_equal(compiled_idx, eager_idx, "topk_idx")
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=0, atol=1e-14)
        torch.testing.assert_close(compiled_in.grad, eager_in.grad, rtol=0, atol=1e-14)


def test_moe_pipeline_aot_dispatch():
    """The whole op chain (route, plan, permute, grouped linear, combine) compiles with dynamic shapes and
    gives eager mode's outputs and gradients."""
    torch._dynamo.reset()

    def moe(x, gate_weight, weight, bias):
        topk_idx, topk_score = torch.ops.fastmoe.route_topk(x @ gate_weight.t(), 2, "topk_softmax")
        plan = ops.make_plan(topk_idx, weight.shape[0])
        y_sorted = ops.grouped_linear(ops.permute(x, plan), plan.expert_offsets, weight, bias)
        return ops.unpermute_combine(y_sorted, plan, topk_score)

    compiled = torch.compile(moe, backend="aot_eager", dynamic=True, fullgraph=True)
    gen = make_generator(2)
    params = [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((4, 6), (4, 6, 6), (4, 6))]
    for num_tokens in (7, 12):
        x = torch.randn(num_tokens, 6, generator=gen, dtype=torch.float64)
        eager_in = [t.clone().requires_grad_() for t in [x] + params]
        compiled_in = [t.clone().requires_grad_() for t in [x] + params]
        grad_out = torch.randn(num_tokens, 6, generator=gen, dtype=torch.float64)
        eager_out, compiled_out = moe(*eager_in), compiled(*compiled_in)
        torch.testing.assert_close(compiled_out, eager_out, rtol=0, atol=1e-13)
        eager_grads = torch.autograd.grad(eager_out, eager_in, grad_out)
        compiled_grads = torch.autograd.grad(compiled_out, compiled_in, grad_out)
        for a, b in zip(compiled_grads, eager_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
