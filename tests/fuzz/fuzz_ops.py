"""Random cases for every registered op: valid inputs of random shapes (0 and 1 included), dtypes and memory
layouts (contiguous, transposed, strided, overlapping), or valid inputs with exactly one thing broken.

A generator takes a seeded ``random.Random`` and a device and returns a :class:`Case`: a call, and either a check
of its result against the plain-PyTorch references (tests/conftest.py, fastmoe.testing) or the error it must
raise, whose message names the argument and the value.

Data-dependent checks (an expert id, a pair id, an offset) raise on the CPU; the CUDA kernels cannot raise
without a host sync, so there such a case must only run to completion (docs/reliability.md).
"""

import math
import random

import torch

from conftest import reference_combine, reference_grouped_linear, reference_permute, segment_sums
from fastmoe import ops
from fastmoe.testing.reference import reference_plan, reference_route_topk
from fuzz_data import (
    FLOATS,
    SCALAR_NAME,
    SCHEMA,
    SIZES,
    TOLERANCE,
    Case,
    F,
    R,
    assert_close,
    assert_equal,
    distinct_logits,
    layout,
    not_dense,
    not_dense_case,
    other_device,
    pick,
    randn,
    random_idx,
    set_one,
    to_meta,
    valid_name,
    wrong_float,
)

# ----------------------------------------------------------------------------------------------- routing


def route_topk_case(rng: random.Random, device: str) -> Case:
    T, E = rng.choice(SIZES), rng.randint(1, 9)
    k, dtype = rng.randint(1, E), rng.choice(FLOATS)
    score_fn = rng.choice(["topk_softmax", "softmax_topk"])
    logits = distinct_logits(rng, T, E, dtype, device)
    via_ops = rng.random() < 0.5
    op = ops.route_topk if via_ops else F.route_topk
    m = pick(
        rng, ["int-logits", "1d", "3d", "no-experts", "k-small", "k-large", "score-fn", "k-float", "list", "dense"]
    )
    name = f"route_topk/{m}"
    if m == "dense":
        bad, kind = not_dense(rng, logits)
        return not_dense_case(name, via_ops, lambda: op(bad, k, score_fn), "logits", kind)
    if m == "int-logits":
        bad = rng.choice([torch.int64, torch.int32, torch.bool])
        return Case(name, lambda: op(logits.to(bad), k, score_fn), error=(R, "logits", SCALAR_NAME[bad]))
    if m == "1d":
        return Case(name, lambda: op(logits.reshape(-1), k, score_fn), error=(R, "logits", f"[{T * E}]"))
    if m == "3d":
        return Case(name, lambda: op(logits[None], k, score_fn), error=(R, "logits", f"[1, {T}, {E}]"))
    if m == "no-experts":
        return Case(name, lambda: op(logits[:, :0], 1, score_fn), error=(R, "logits", f"[{T}, 0]"))
    if m == "k-small":
        bad_k = rng.choice([0, -1, -(2**31), -(2**63)])
        return Case(name, lambda: op(logits, bad_k, score_fn), error=(R, "k", f"k={bad_k}"))
    if m == "k-large":
        bad_k = rng.choice([E + 1, E + rng.randint(2, 9), 2**31, 2**62])
        return Case(name, lambda: op(logits, bad_k, score_fn), error=(R, "k", f"k={bad_k}"))
    if m == "score-fn":
        bad = rng.choice(["softmax", "", "TOPK_SOFTMAX", "sigmoid", "topk_softmax "])
        return Case(name, lambda: op(logits, k, bad), error=(R, "score_fn", f"'{bad}'"))
    if m == "k-float":
        return Case(name, lambda: op(logits, k + 0.5, score_fn), error=(SCHEMA, "k", str(k + 0.5)))
    if m == "list":
        return Case(name, lambda: op(logits.tolist(), k, score_fn), error=(SCHEMA, "logits", "list"))

    def check(result):
        idx, score = result
        ref_idx, ref_score = reference_route_topk(logits.double().cpu(), k, score_fn)
        assert_equal(idx, ref_idx.to(idx.device), "topk_idx")
        assert_close(score, ref_score, dtype, "topk_score")

    return Case(
        valid_name(name), lambda: op(logits, k, score_fn), check, meta_call=lambda: op(to_meta(logits), k, score_fn)
    )


def route_topk_backward_case(rng: random.Random, device: str) -> Case:
    T, E = rng.choice(SIZES), rng.randint(1, 9)
    k, dtype = rng.randint(1, E), rng.choice(FLOATS)
    score_fn = rng.choice(["topk_softmax", "softmax_topk"])
    logits = distinct_logits(rng, T, E, dtype, device)
    idx, score = F.route_topk(logits, k, score_fn)
    idx, score = layout(rng, idx), layout(rng, score)
    grad = randn(rng, T, k, dtype=dtype, device=device)
    op = F.route_topk_backward
    m = pick(rng, ["bad-id", "grad-shape", "score-shape", "tokens", "grad-dtype", "idx-int32", "device"])
    name = f"route_topk_backward/{m}"
    if m == "bad-id" and T > 0:
        pos = rng.randrange(T * k)
        value = rng.choice([-1, -2, E, E + 3, 2**40, -(2**63)])
        bad_idx = set_one(idx, pos, value)
        error = (R, f"topk_idx[{pos // k}, {pos % k}]", f"= {value}") if device == "cpu" else None
        return Case(name, lambda: op(grad, logits, bad_idx, score, score_fn), error=error)
    if m == "grad-shape":
        return Case(name, lambda: op(grad[:, :0], logits, idx, score, score_fn), error=(R, "grad_score", f"[{T}, 0]"))
    if m == "score-shape":
        return Case(name, lambda: op(grad, logits, idx, score[:, :0], score_fn), error=(R, "topk_score", f"[{T}, 0]"))
    if m == "tokens":
        return Case(name, lambda: op(grad, logits[:0], idx, score, score_fn), error=(R, "logits", "0") if T else None)
    if m == "grad-dtype":
        bad = wrong_float(rng, dtype)
        return Case(
            name, lambda: op(grad.to(bad), logits, idx, score, score_fn), error=(R, "grad_score", SCALAR_NAME[bad])
        )
    if m == "idx-int32":
        return Case(name, lambda: op(grad, logits, idx.int(), score, score_fn), error=(R, "topk_idx", "Int"))
    if m == "device":
        moved = rng.choice(["grad_score", "logits", "topk_idx", "topk_score"])
        args = dict(grad_score=grad, logits=logits, topk_idx=idx, topk_score=score)
        args[moved] = args[moved].to(other_device(device))
        # Every device check pairs an argument with logits, so the message names the moved one and its device.
        return Case(name, lambda: op(*args.values(), score_fn), error=(R, moved, other_device(device)))

    def check(grad_logits):
        leaf = logits.detach().double().cpu().requires_grad_(True)
        _, ref_score = reference_route_topk(leaf, k, score_fn)
        (expected,) = torch.autograd.grad(ref_score, leaf, grad.double().cpu())
        assert_close(grad_logits, expected, dtype, "grad_logits", scale=max(1.0, float(grad.double().abs().sum())))

    return Case(
        valid_name(name),
        lambda: op(grad, logits, idx, score, score_fn),
        check,
        meta_call=lambda: op(to_meta(grad), to_meta(logits), to_meta(idx), to_meta(score), score_fn),
    )


# ----------------------------------------------------------------------------------------------- dispatch


def _plan(rng, device, T, k, E):
    idx = random_idx(rng, T, k, E, device)
    return idx, ops.Plan(*F.make_plan(idx, E))


def make_plan_case(rng: random.Random, device: str) -> Case:
    T, E = rng.choice(SIZES), rng.randint(1, 9)
    k = rng.randint(1, E + 2)  # k > E is legal for a plan (repeated experts)
    idx = random_idx(rng, T, k, E, device)
    via_ops = rng.random() < 0.5
    op = ops.make_plan if via_ops else F.make_plan
    m = pick(rng, ["bad-id", "dtype", "1d", "3d", "num-experts", "num-experts-float", "num-experts-huge", "dense"])
    name = f"make_plan/{m}"
    if m == "dense":
        bad, kind = not_dense(rng, idx)
        return not_dense_case(name, via_ops, lambda: op(bad, E), "topk_idx", kind)
    if m == "num-experts-huge":
        bad_e = rng.choice([2**31 - 1, 2**40, 2**63 - 1])
        return Case(name, lambda: op(idx, bad_e), error=(R, "num_experts", str(bad_e)))
    if m == "bad-id" and T > 0:
        pos = rng.randrange(T * k)
        value = rng.choice([-2, E, E + 7, 2**62, -(2**63)])
        bad_idx = set_one(idx, pos, value)
        if device == "cpu":
            return Case(name, lambda: op(bad_idx, E), error=(R, "topk_idx", f"expert id {value}"))

        def check_dropped(plan):  # CUDA drops the invalid id (FASTMOE_CHECK_IDS=1 raises instead)
            expected = reference_plan(set_one(bad_idx, pos, -1).cpu(), E)
            for got, want, what in zip(plan, expected, ("counts", "offsets", "sorted_pair", "pair_pos"), strict=True):
                assert_equal(got, want, what)

        return Case(name, lambda: op(bad_idx, E), check_dropped)
    if m == "dtype":
        bad = rng.choice([torch.int32, torch.float32, torch.bool, torch.uint8])
        return Case(name, lambda: op(idx.to(bad), E), error=(R, "topk_idx", SCALAR_NAME[bad]))
    if m == "1d":
        return Case(name, lambda: op(idx.reshape(-1), E), error=(R, "topk_idx", f"[{T * k}]"))
    if m == "3d":
        return Case(name, lambda: op(idx[None], E), error=(R, "topk_idx", f"[1, {T}, {k}]"))
    if m == "num-experts":
        bad_e = rng.choice([0, -1, -(2**40)])
        return Case(name, lambda: op(idx, bad_e), error=(R, "num_experts", str(bad_e)))
    if m == "num-experts-float":
        return Case(name, lambda: op(idx, E + 0.5), error=(SCHEMA, "num_experts", str(E + 0.5)))

    def check(plan):
        expected = reference_plan(idx.cpu(), E)
        for got, want, what in zip(plan, expected, ("counts", "offsets", "sorted_pair", "pair_pos"), strict=True):
            assert_equal(got, want, what)

    return Case(valid_name(name), lambda: op(idx, E), check, meta_call=lambda: op(to_meta(idx), E))


def permute_case(rng: random.Random, device: str) -> Case:
    T, E, d = rng.choice(SIZES), rng.randint(1, 6), rng.choice([1, 2, 3, 8, 13])
    k, dtype = rng.randint(1, E), rng.choice(FLOATS)
    idx, plan = _plan(rng, device, T, k, E)
    sp, pp = layout(rng, plan.sorted_pair), layout(rng, plan.pair_pos)
    x = randn(rng, T, d, dtype=dtype, device=device)
    via_ops = rng.random() < 0.5

    def op(x_, sp_, pp_):
        return (
            ops.permute(x_, ops.Plan(plan.expert_counts, plan.expert_offsets, sp_, pp_))
            if via_ops
            else F.permute(x_, sp_, pp_)
        )

    m = pick(rng, ["x-tokens", "x-int", "x-1d", "sp-long", "sp-value", "pp-dtype", "device", "dense"])
    name = f"permute/{m}"
    if m == "dense":
        bad, kind = not_dense(rng, x)
        return not_dense_case(name, via_ops, lambda: op(bad, sp, pp), "x", kind)
    if m == "x-tokens":
        x_more = randn(rng, T + 1, d, dtype=dtype, device=device)
        return Case(name, lambda: op(x_more, sp, pp), error=(R, "x", str(T + 1)))
    if m == "x-int":
        return Case(name, lambda: op(x.long(), sp, pp), error=(R, "x", "Long"))
    if m == "x-1d":
        return Case(name, lambda: op(x.reshape(-1), sp, pp), error=(R, "x", f"[{T * d}]"))
    if m == "sp-long" and T > 0:  # shorter is legal (a plan cut to its routed rows); longer is not
        longer = torch.cat([sp, sp[:1]])
        return Case(name, lambda: op(x, longer, pp), error=(R, "sorted_pair", str(T * k + 1)))
    if m == "sp-value" and T > 0:
        r, value = rng.randrange(T * k), rng.choice([T * k, T * k + 5, -2, 2**50, -(2**63)])
        bad = set_one(sp, r, value)
        error = (R, f"sorted_pair[{r}]", str(value)) if device == "cpu" else None
        return Case(name, lambda: op(x, bad, pp), error=error)
    if m == "pp-dtype":
        return Case(name, lambda: op(x, sp, pp.int()), error=(R, "pair_pos", "Int"))
    if m == "device":
        return Case(name, lambda: op(x.to(other_device(device)), sp, pp), error=(R, "x", other_device(device)))

    def check(out):
        assert_equal(out, reference_permute(x.cpu(), plan.sorted_pair.cpu(), k), "x_sorted")

    return Case(
        valid_name(name), lambda: op(x, sp, pp), check, meta_call=lambda: op(to_meta(x), to_meta(sp), to_meta(pp))
    )


def combine_case(rng: random.Random, device: str) -> Case:
    T, E, d = rng.choice(SIZES), rng.randint(1, 6), rng.choice([1, 2, 3, 8, 13])
    k, dtype = rng.randint(1, E), rng.choice(FLOATS)
    idx, plan = _plan(rng, device, T, k, E)
    sp, pp = layout(rng, plan.sorted_pair), layout(rng, plan.pair_pos)
    y = randn(rng, T * k, d, dtype=dtype, device=device)
    score = randn(rng, T, k, dtype=rng.choice(FLOATS), device=device) if rng.random() < 0.7 else None
    via_ops = rng.random() < 0.5

    def op(y_, sp_, pp_, s_):
        if via_ops:
            return ops.unpermute_combine(y_, ops.Plan(plan.expert_counts, plan.expert_offsets, sp_, pp_), s_)
        return F.unpermute_combine(y_, sp_, pp_, s_)

    m = pick(rng, ["y-rows", "y-int", "score-shape", "score-int", "pp-value", "pp-dtype", "device"])
    name = f"unpermute_combine/{m}"
    if m == "y-rows":
        y_more = randn(rng, T * k + 1, d, dtype=dtype, device=device)
        return Case(name, lambda: op(y_more, sp, pp, score), error=(R, "y_sorted", str(T * k + 1)))
    if m == "y-int":
        return Case(name, lambda: op(y.int(), sp, pp, score), error=(R, "y_sorted", "Int"))
    if m == "score-shape":
        s_bad = randn(rng, T, k + 1, device=device)
        return Case(name, lambda: op(y, sp, pp, s_bad), error=(R, "topk_score", f"[{T}, {k + 1}]"))
    if m == "score-int":
        s_bad = torch.ones(T, k, dtype=torch.int64, device=device)
        return Case(name, lambda: op(y, sp, pp, s_bad), error=(R, "topk_score", "Long"))
    if m == "pp-value" and T > 0:
        pos, value = rng.randrange(T * k), rng.choice([T * k, T * k + 2, -2, 2**45, -(2**63)])
        bad = set_one(pp, pos, value)
        error = (R, f"pair_pos[{pos // k}, {pos % k}]", str(value)) if device == "cpu" else None
        return Case(name, lambda: op(y, sp, bad, score), error=error)
    if m == "pp-dtype":
        return Case(name, lambda: op(y, sp, pp.int(), score), error=(R, "pair_pos", "Int"))
    if m == "device":
        return Case(
            name, lambda: op(y.to(other_device(device)), sp, pp, score), error=(R, "y_sorted", other_device(device))
        )

    def check(out):
        s = None if score is None else score.double().cpu()
        expected = reference_combine(y.double().cpu(), plan.pair_pos.cpu(), s)
        assert_close(out, expected, dtype, "y", scale=k)

    return Case(
        valid_name(name),
        lambda: op(y, sp, pp, score),
        check,
        meta_call=lambda: op(to_meta(y), to_meta(sp), to_meta(pp), to_meta(score)),
    )


def combine_backward_case(rng: random.Random, device: str) -> Case:
    T, E, d = rng.choice(SIZES), rng.randint(1, 6), rng.choice([1, 2, 3, 8])
    k, dtype = rng.randint(1, E), rng.choice(FLOATS)
    idx, plan = _plan(rng, device, T, k, E)
    sp, pp = plan.sorted_pair, plan.pair_pos
    y = randn(rng, T * k, d, dtype=dtype, device=device)
    grad_y = randn(rng, T, d, dtype=dtype, device=device)
    score = randn(rng, T, k, dtype=dtype, device=device) if rng.random() < 0.7 else None
    need = score is not None and rng.random() < 0.7
    op = F.unpermute_combine_backward
    m = pick(rng, ["grad-shape", "grad-dtype", "need-without-score", "device"])
    name = f"unpermute_combine_backward/{m}"
    if m == "grad-shape":
        g_bad = randn(rng, T + 1, d, dtype=dtype, device=device)
        return Case(name, lambda: op(g_bad, y, sp, pp, score, need), error=(R, "grad_y", f"[{T + 1}, {d}]"))
    if m == "grad-dtype":
        bad = wrong_float(rng, dtype)
        return Case(name, lambda: op(grad_y.to(bad), y, sp, pp, score, need), error=(R, "grad_y", SCALAR_NAME[bad]))
    if m == "need-without-score":
        return Case(name, lambda: op(grad_y, y, sp, pp, None, True), error=(R, "need_score_grad", "True"))
    if m == "device":
        return Case(
            name,
            lambda: op(grad_y.to(other_device(device)), y, sp, pp, score, need),
            error=(R, "grad_y", other_device(device)),
        )

    def check(result):
        grad_rows, grad_score = result
        y_leaf = y.detach().double().cpu().requires_grad_(True)
        s_leaf = None if score is None else score.detach().double().cpu().requires_grad_(True)
        out = reference_combine(y_leaf, pp.cpu(), s_leaf)
        inputs = [y_leaf] + ([s_leaf] if need else [])
        expected = torch.autograd.grad(out, inputs, grad_y.double().cpu(), allow_unused=True, materialize_grads=True)
        assert_close(grad_rows, expected[0], dtype, "grad_y_sorted")
        if need:
            assert_close(grad_score, expected[1], dtype, "grad_score", scale=d)
        else:
            assert grad_score.numel() == 0, "grad_score must be empty without need_score_grad"

    return Case(
        valid_name(name),
        lambda: op(grad_y, y, sp, pp, score, need),
        check,
        meta_call=lambda: op(to_meta(grad_y), to_meta(y), to_meta(sp), to_meta(pp), to_meta(score), need),
    )


# ----------------------------------------------------------------------------------------------- expert


def _offsets(rng: random.Random, num_rows: int, num_experts: int, device) -> torch.Tensor:
    """``[E + 1]`` offsets of random non-negative counts whose total is at most ``num_rows``."""
    cuts = sorted(rng.randint(0, num_rows) for _ in range(num_experts))
    return layout(rng, torch.tensor([0] + cuts, dtype=torch.int64, device=device))


def _bad_offsets(rng: random.Random, offsets: torch.Tensor, num_rows: int):
    """offsets with one broken entry, and the (argument, value) the CPU check names."""
    E = offsets.numel() - 1
    kind = rng.choice(["first", "decreasing", "past-rows"])
    if kind == "first":
        value = rng.choice([1, -1, 2**40])
        return set_one(offsets, 0, value), ("expert_offsets[0]", str(value))
    if kind == "decreasing" and E >= 2 and int(offsets[1]) > 0:
        return set_one(offsets, 1, -1), ("expert_offsets", "offsets[1] = -1")
    value = num_rows + rng.choice([1, 5, 2**40])
    bad = set_one(offsets, E, value)
    return bad, (f"expert_offsets[{E}]", str(value))


def grouped_linear_case(rng: random.Random, device: str) -> Case:
    N, E = rng.choice(SIZES), rng.randint(1, 5)
    d_in, d_out, dtype = rng.choice([1, 2, 3, 8, 13]), rng.choice([1, 2, 5, 8]), rng.choice(FLOATS)
    x = randn(rng, N, d_in, dtype=dtype, device=device)
    w = randn(rng, E, d_out, d_in, dtype=dtype, device=device) * 0.5
    b = randn(rng, E, d_out, dtype=dtype, device=device) if rng.random() < 0.6 else None
    off = _offsets(rng, N, E, device)
    via_ops = rng.random() < 0.5
    op = ops.grouped_linear if via_ops else F.grouped_linear
    mutations = ["offsets-value", "offsets-len", "offsets-int32", "weight-2d", "features", "dtype", "bias", "device"]
    m = pick(rng, mutations + ["dense"])
    name = f"grouped_linear/{m}"
    if m == "dense":
        bad, kind = not_dense(rng, w)
        return not_dense_case(name, via_ops, lambda: op(x, off, bad, b), "weight", kind)
    if m == "offsets-value":
        bad, (arg, value) = _bad_offsets(rng, off, N)
        return Case(name, lambda: op(x, bad, w, b), error=(R, arg, value) if device == "cpu" else None)
    if m == "offsets-len":
        return Case(name, lambda: op(x, off[:-1], w, b), error=(R, "expert_offsets", f"got {E}"))
    if m == "offsets-int32":
        return Case(name, lambda: op(x, off.int(), w, b), error=(R, "expert_offsets", "Int"))
    if m == "weight-2d":
        return Case(name, lambda: op(x, off, w[0], b), error=(R, "weight", f"[{d_out}, {d_in}]"))
    if m == "features":
        x_wide = randn(rng, N, d_in + 1, dtype=dtype, device=device)
        return Case(name, lambda: op(x_wide, off, w, b), error=(R, "x", str(d_in + 1)))
    if m == "dtype":
        bad = wrong_float(rng, dtype)
        return Case(name, lambda: op(x, off, w.to(bad), None), error=(R, "weight", SCALAR_NAME[bad]))
    if m == "bias":
        b_bad = randn(rng, E, d_out + 1, dtype=dtype, device=device)
        return Case(name, lambda: op(x, off, w, b_bad), error=(R, "bias", f"[{E}, {d_out + 1}]"))
    if m == "device":
        return Case(name, lambda: op(x, off, w.to(other_device(device)), b), error=(R, "weight", other_device(device)))

    def check(y):
        ref_b = None if b is None else b.double().cpu()
        expected = reference_grouped_linear(x.double().cpu(), off.cpu(), w.double().cpu(), ref_b)
        assert_close(y, expected, dtype, "y", scale=d_in)

    return Case(
        valid_name(name),
        lambda: op(x, off, w, b),
        check,
        meta_call=lambda: op(to_meta(x), to_meta(off), to_meta(w), to_meta(b)),
    )


def grouped_linear_backward_case(rng: random.Random, device: str) -> Case:
    N, E = rng.choice(SIZES), rng.randint(1, 5)
    d_in, d_out, dtype = rng.choice([1, 2, 3, 8]), rng.choice([1, 2, 5, 8]), rng.choice(FLOATS)
    x = randn(rng, N, d_in, dtype=dtype, device=device)
    w = randn(rng, E, d_out, d_in, dtype=dtype, device=device)
    grad_y = randn(rng, N, d_out, dtype=dtype, device=device)
    off = _offsets(rng, N, E, device)
    mask = [rng.random() < 0.7 for _ in range(3)]
    op = F.grouped_linear_backward
    m = pick(rng, ["grad-shape", "grad-dtype", "offsets-value", "device"])
    name = f"grouped_linear_backward/{m}"
    if m == "grad-shape":
        g_bad = randn(rng, N, d_out + 1, dtype=dtype, device=device)
        return Case(name, lambda: op(g_bad, x, off, w, mask), error=(R, "grad_y", f"[{N}, {d_out + 1}]"))
    if m == "grad-dtype":
        bad = wrong_float(rng, dtype)
        return Case(name, lambda: op(grad_y.to(bad), x, off, w, mask), error=(R, "grad_y", SCALAR_NAME[bad]))
    if m == "offsets-value":
        bad, (arg, value) = _bad_offsets(rng, off, N)
        return Case(name, lambda: op(grad_y, x, bad, w, mask), error=(R, arg, value) if device == "cpu" else None)
    if m == "device":
        other = other_device(device)
        return Case(name, lambda: op(grad_y.to(other), x, off, w, mask), error=(R, "grad_y", other))

    def check(result):
        x_leaf = x.detach().double().cpu().requires_grad_(True)
        w_leaf = w.detach().double().cpu().requires_grad_(True)
        b_leaf = torch.zeros(E, d_out, dtype=torch.float64, requires_grad=True)
        out = reference_grouped_linear(x_leaf, off.cpu(), w_leaf, b_leaf)
        expected = torch.autograd.grad(out, [x_leaf, w_leaf, b_leaf], grad_y.double().cpu(), materialize_grads=True)
        scales = (d_out, max(N, 1), max(N, 1))
        for got, want, wanted, what, scale in zip(
            result, expected, mask, ("grad_x", "grad_weight", "grad_bias"), scales, strict=True
        ):
            if wanted:
                assert_close(got, want, dtype, what, scale=scale)
            else:
                assert got.numel() == 0, f"{what} must be empty when its mask entry is False"

    return Case(
        valid_name(name),
        lambda: op(grad_y, x, off, w, mask),
        check,
        meta_call=lambda: op(to_meta(grad_y), to_meta(x), to_meta(off), to_meta(w), mask),
    )


def gelu_backward_bias_case(rng: random.Random, device: str) -> Case:
    N, E = rng.choice(SIZES), rng.randint(0, 5)
    H, dtype = rng.choice([1, 2, 3, 8, 13, 16]), rng.choice(FLOATS)
    grad = randn(rng, N, H, dtype=dtype, device=device)
    h = randn(rng, N, H, dtype=dtype, device=device) * 2
    off = _offsets(rng, N, E, device)
    op = F.gelu_backward_bias
    m = pick(rng, ["grad-shape", "grad-dtype", "offsets-value", "offsets-int32", "device"])
    name = f"gelu_backward_bias/{m}"
    if m == "grad-shape":
        g_bad = randn(rng, N, H + 1, dtype=dtype, device=device)
        return Case(name, lambda: op(g_bad, h, off), error=(R, "grad", f"[{N}, {H + 1}]"))
    if m == "grad-dtype":
        bad = wrong_float(rng, dtype)
        return Case(name, lambda: op(grad.to(bad), h, off), error=(R, "grad", SCALAR_NAME[bad]))
    if m == "offsets-value":
        bad, (arg, value) = _bad_offsets(rng, off, N)
        return Case(name, lambda: op(grad, h, bad), error=(R, arg, value) if device == "cpu" else None)
    if m == "offsets-int32":
        return Case(name, lambda: op(grad, h, off.int()), error=(R, "expert_offsets", "Int"))
    if m == "device":
        other = other_device(device)
        return Case(name, lambda: op(grad, h.to(other), off), error=(R, "h", other))

    def check(result):
        grad_h, grad_bias = result
        exact = torch.ops.aten.gelu_backward(grad.double().cpu(), h.double().cpu())
        assert_close(grad_h, exact, dtype, "grad_h")
        assert_close(grad_bias, segment_sums(exact, off.cpu().tolist()), dtype, "grad_bias", scale=max(N, 1))

    return Case(
        valid_name(name),
        lambda: op(grad, h, off),
        check,
        meta_call=lambda: op(to_meta(grad), to_meta(h), to_meta(off)),
    )


# ----------------------------------------------------------------------------------------------- swiglu


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(size) for size in shape) + "]"


def _gated_inputs(rng: random.Random, device: str):
    """h [..., 2 * hidden] (1 to 3 dims, empty sizes included, any layout) and a grad [..., hidden]."""
    lead = [rng.choice(SIZES) for _ in range(rng.randint(0, 2))]
    hidden, dtype = rng.choice([0, 1, 2, 3, 5, 8, 17]), rng.choice(FLOATS)
    h = randn(rng, *lead, 2 * hidden, dtype=dtype, device=device)
    grad = randn(rng, *lead, hidden, dtype=dtype, device=device)
    return lead, hidden, dtype, h, grad


def reference_swiglu(h: torch.Tensor, grad: torch.Tensor | None = None):
    """silu(gate) * up in fp64 for h = [gate | up], and (with ``grad``) its gradient for h by autograd."""
    leaf = h.detach().double().cpu().requires_grad_(True)
    gate, up = leaf.chunk(2, dim=-1)
    y = torch.nn.functional.silu(gate) * up
    if grad is None:
        return y.detach()
    (grad_h,) = torch.autograd.grad(y, leaf, grad.double().cpu())
    return grad_h


def swiglu_case(rng: random.Random, device: str) -> Case:
    lead, hidden, dtype, h, _ = _gated_inputs(rng, device)
    via_ops = rng.random() < 0.5
    op = ops.swiglu if via_ops else F.swiglu
    m = pick(rng, ["odd", "0-dim", "int", "list", "dense"])
    name = f"swiglu/{m}"
    if m == "dense":
        bad, kind = not_dense(rng, h)
        return not_dense_case(name, via_ops, lambda: op(bad), "h", kind)
    if m == "odd":
        odd = randn(rng, *lead, 2 * hidden + 1, dtype=dtype, device=device)
        return Case(name, lambda: op(odd), error=(ValueError, "h", _shape_str([*lead, 2 * hidden + 1])))
    if m == "0-dim":
        scalar = torch.tensor(1.5, dtype=dtype, device=device)
        return Case(name, lambda: op(scalar), error=(R, "h", "0-dim"))
    if m == "int":
        bad = rng.choice([torch.int64, torch.int32, torch.bool])
        return Case(name, lambda: op(h.to(bad)), error=(R, "h", SCALAR_NAME[bad]))
    if m == "list":
        return Case(name, lambda: op(h.tolist()), error=(SCHEMA, "h", "list"))

    def check(y):
        assert y.device == h.device, f"y on {y.device}, h on {h.device}"
        assert_close(y, reference_swiglu(h), dtype, "y")

    return Case(valid_name(name), lambda: op(h), check, meta_call=lambda: op(to_meta(h)))


def swiglu_backward_case(rng: random.Random, device: str) -> Case:
    """Valid cases run the kernel, or (h requiring grad) the backward recorded as ATen ops for double backward."""
    lead, hidden, dtype, h, grad = _gated_inputs(rng, device)
    via_ops = rng.random() < 0.5
    op = ops.swiglu_backward if via_ops else F.swiglu_backward
    m = pick(rng, ["grad-shape", "grad-rank", "grad-dtype", "grad-int", "h-odd", "device", "dense"])
    name = f"swiglu_backward/{m}"
    if m == "dense":
        bad, kind = not_dense(rng, grad)
        return not_dense_case(name, via_ops, lambda: op(bad, h), "grad", kind)
    if m == "grad-shape":
        wide = randn(rng, *lead, hidden + 1, dtype=dtype, device=device)
        return Case(name, lambda: op(wide, h), error=(R, "grad", _shape_str([*lead, hidden + 1])))
    if m == "grad-rank":
        return Case(name, lambda: op(grad[None], h), error=(R, "grad", _shape_str([1, *lead, hidden])))
    if m == "grad-dtype":
        bad = wrong_float(rng, dtype)
        return Case(name, lambda: op(grad.to(bad), h), error=(R, "grad", SCALAR_NAME[bad]))
    if m == "grad-int":
        bad = rng.choice([torch.int64, torch.int32])
        return Case(name, lambda: op(grad.to(bad), h), error=(R, "grad", SCALAR_NAME[bad]))
    if m == "h-odd":
        odd = randn(rng, *lead, 2 * hidden + 1, dtype=dtype, device=device)
        return Case(name, lambda: op(grad, odd), error=(ValueError, "h", _shape_str([*lead, 2 * hidden + 1])))
    if m == "device":
        other = other_device(device)
        if rng.random() < 0.5:
            return Case(name, lambda: op(grad.to(other), h), error=(R, "grad", other))
        return Case(name, lambda: op(grad, h.to(other)), error=(R, "grad and h", other))

    recorded = rng.random() < 0.3
    h_in = h.detach().requires_grad_(True) if recorded else h

    def check(grad_h):
        assert grad_h.device == h.device, f"grad_h on {grad_h.device}, h on {h.device}"
        assert (grad_h.grad_fn is not None) == recorded, "the backward is recorded exactly when h requires grad"
        assert_close(grad_h, reference_swiglu(h, grad), dtype, "grad_h")

    return Case(
        valid_name(name), lambda: op(grad, h_in), check, meta_call=lambda: op(to_meta(grad), to_meta(h_in.detach()))
    )


def reference_scaled_swiglu(h: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor):
    """swiglu(h) * scale in fp64 and its gradients (grad_h, grad_scale) by autograd."""
    leaf = h.detach().double().cpu().requires_grad_(True)
    factor = scale.detach().double().cpu().requires_grad_(True)
    gate, up = leaf.chunk(2, dim=-1)
    y = torch.nn.functional.silu(gate) * up * factor.unsqueeze(-1)
    grad_h, grad_scale = torch.autograd.grad(y, (leaf, factor), grad.double().cpu())
    return y.detach(), grad_h, grad_scale


def swiglu_scaled_backward_case(rng: random.Random, device: str) -> Case:
    """swiglu(h, scale) through autograd and swiglu_scaled_backward on its own; the scale in any float dtype."""
    lead, hidden, dtype, h, grad = _gated_inputs(rng, device)
    scale_dtype = rng.choice(FLOATS)
    scale = (torch.rand(lead, dtype=torch.float64) + 0.25).to(dtype=scale_dtype, device=device)
    via_ops = rng.random() < 0.5
    op = ops.swiglu_scaled_backward if via_ops else F.swiglu_scaled_backward
    m = pick(rng, ["scale-shape", "scale-int", "scale-device", "grad-shape", "dense"])
    name = f"swiglu_scaled_backward/{m}"
    if m == "dense":
        bad, kind = not_dense(rng, grad)
        return not_dense_case(name, via_ops, lambda: op(bad, h, scale), "grad", kind)
    if m == "scale-shape":
        wrong = torch.ones([*lead, 1], dtype=scale_dtype, device=device)
        return Case(name, lambda: op(grad, h, wrong), error=(ValueError, "scale", _shape_str([*lead, 1])))
    if m == "scale-int":
        bad = rng.choice([torch.int64, torch.int32])
        return Case(name, lambda: op(grad, h, scale.to(bad)), error=(R, "scale", SCALAR_NAME[bad]))
    if m == "scale-device":
        other = other_device(device)
        return Case(name, lambda: op(grad, h, scale.to(other)), error=(R, "scale and h", other))
    if m == "grad-shape":
        wide = randn(rng, *lead, hidden + 1, dtype=dtype, device=device)
        return Case(name, lambda: op(wide, h, scale), error=(R, "grad", _shape_str([*lead, hidden + 1])))

    through_autograd = rng.random() < 0.5

    def run():
        if not through_autograd:
            return op(grad, h, scale)
        leaf, factor = h.detach().requires_grad_(True), scale.detach().requires_grad_(True)
        y = ops.swiglu(leaf, factor)
        return (y, *torch.autograd.grad(y, (leaf, factor), grad))

    def meta():
        backward = op(to_meta(grad), to_meta(h), to_meta(scale))
        return (ops.swiglu(to_meta(h), to_meta(scale)), *backward) if through_autograd else backward

    def check(result):
        y_ref, grad_h_ref, grad_scale_ref = reference_scaled_swiglu(h, scale, grad)
        if len(result) == 3:
            assert_close(result[0], y_ref, dtype, "y")
        grad_h, grad_scale = result[-2], result[-1]
        assert grad_h.device == h.device and grad_scale.device == h.device, "outputs on h's device"
        assert_close(grad_h, grad_h_ref, dtype, "grad_h")
        # computed from h's precision whatever the scale's dtype, and a sum over the row: its error grows with the
        # row's width; compared in the coarser of the two dtypes
        assert grad_scale.dtype == scale_dtype, f"grad_scale: dtype {grad_scale.dtype} != the scale's {scale_dtype}"
        coarse = max((dtype, scale_dtype), key=lambda t: TOLERANCE[t])
        assert_close(grad_scale.to(coarse), grad_scale_ref, coarse, "grad_scale", scale=max(1.0, float(hidden)))

    return Case(valid_name(name), run, check, meta_call=meta)


# ----------------------------------------------------------------------------------------------- the layer in one op

# The activations as the composed layer runs them: swiglu is the registered op (fp32 math rounded once, so not
# torch's silu(gate) * up bit for bit; swiglu_case checks the op against that formula).
_ACTIVATIONS = {
    "gelu": torch.nn.functional.gelu,
    "relu": torch.nn.functional.relu,
    "silu": torch.nn.functional.silu,
    "swiglu": F.swiglu,
}
_MOE_FFN_ARGS = ("x", "gate_weight", "gate_bias", "w1", "b1", "w2", "b2")


def reference_moe_ffn(x, gate_weight, gate_bias, w1, b1, w2, b2, top_k, activation, balance_coef, z_loss_coef):
    """moe_ffn composed from the registered ops and ATen, as FMoETransformerMLP's token path runs the layer."""
    logits = torch.nn.functional.linear(x, gate_weight, gate_bias)
    topk_idx, topk_score, balance, z_loss, _ = F.naive_gate(logits, top_k, balance_coef, z_loss_coef)
    counts, offsets, sorted_pair, pair_pos = F.make_plan(topk_idx, gate_weight.shape[0])
    h = F.grouped_linear(F.permute(x, sorted_pair, pair_pos), offsets, w1, b1)
    if activation == "swiglu" and b2 is None:  # each row's routing score inside swiglu; the combine only sums
        row_score = torch.where(sorted_pair >= 0, topk_score.reshape(-1).index_select(0, sorted_pair.clamp_min(0)), 0.0)
        y_sorted = F.grouped_linear(F.swiglu(h, row_score), offsets, w2, None)
        return F.unpermute_combine(y_sorted, sorted_pair, pair_pos, None), balance, z_loss, counts
    y_sorted = F.grouped_linear(_ACTIVATIONS[activation](h), offsets, w2, b2)
    return F.unpermute_combine(y_sorted, sorted_pair, pair_pos, topk_score), balance, z_loss, counts


def moe_ffn_case(rng: random.Random, device: str) -> Case:
    """The whole layer: a valid case gives the composed ops' outputs and gradients bit for bit (the same kernels
    on the same tensors, in any layout); a broken tensor or option is named with its value."""
    T, E = rng.choice(SIZES), rng.randint(1, 6)
    k, dtype = rng.randint(1, E), rng.choice(FLOATS)
    d, hidden, d_out = rng.choice([1, 2, 3, 8]), rng.choice([1, 2, 5]), rng.choice([1, 2, 5, 8])
    activation = rng.choice(list(_ACTIVATIONS))
    h1 = 2 * hidden if activation == "swiglu" else hidden
    coefs = (rng.choice([0.0, 0.01, 1.0]), rng.choice([0.0, 1e-3]))

    def maybe(t):
        return t if rng.random() < 0.6 else None

    args = dict(
        x=randn(rng, T, d, dtype=dtype, device=device),
        gate_weight=randn(rng, E, d, dtype=dtype, device=device),
        gate_bias=maybe(randn(rng, E, dtype=dtype, device=device)),
        w1=randn(rng, E, h1, d, dtype=dtype, device=device) * 0.5,
        b1=maybe(randn(rng, E, h1, dtype=dtype, device=device)),
        w2=randn(rng, E, d_out, hidden, dtype=dtype, device=device) * 0.5,
        b2=maybe(randn(rng, E, d_out, dtype=dtype, device=device)),
    )
    op = F.moe_ffn

    def call(act=activation, top_k=k, balance_coef=coefs[0], z_loss_coef=coefs[1], **changed):
        tensors = {**args, **changed}
        return lambda: op(*tensors.values(), top_k, act, balance_coef, z_loss_coef)

    m = pick(
        rng,
        ["x-int", "x-1d", "gate-weight", "gate-bias", "w1", "b1", "w2", "b2", "swiglu-odd", "activation", "top-k"]
        + ["top-k-float", "coef", "dtype", "device", "dense"],
    )
    name = f"moe_ffn/{m}"
    if m == "dense":
        bad, kind = not_dense(rng, args["w1"])
        return not_dense_case(name, False, call(w1=bad), "w1", kind)
    if m == "x-int":
        return Case(name, call(x=args["x"].long()), error=(R, "x", "Long"))
    if m == "x-1d":
        return Case(name, call(x=args["x"].reshape(-1)), error=(R, "x", f"[{T * d}]"))
    wrong_shapes = {  # per tensor argument, shapes the op must refuse, naming the argument and the shape
        "gate_weight": [[E, d + 1]],
        "gate_bias": [[E + 1]],
        "w1": [[E + 1, h1, d], [E, h1, d + 1], [h1, d]],
        "b1": [[E, h1 + 1]],
        "w2": [[E + 1, d_out, hidden], [E, d_out, hidden + 1], [d_out, hidden]],
        "b2": [[E, d_out + 1]],
    }
    if m.replace("-", "_") in wrong_shapes:
        arg = m.replace("-", "_")
        shape = rng.choice(wrong_shapes[arg])
        bad = randn(rng, *shape, dtype=dtype, device=device)
        return Case(name, call(**{arg: bad}), error=(R, arg, str(shape)))
    if m == "swiglu-odd":
        odd = randn(rng, E, 2 * hidden + 1, d, dtype=dtype, device=device)
        return Case(name, call("swiglu", w1=odd, b1=None), error=(R, "w1", f"got {2 * hidden + 1}"))
    if m == "activation":
        bad = rng.choice(["tanh", "", "GELU", "swiglu ", "geglu"])
        return Case(name, call(bad), error=(ValueError, "activation", f"'{bad}'"))
    if m == "top-k":
        bad = rng.choice([0, -1, E + 1, E + rng.randint(2, 9)])
        return Case(name, call(top_k=bad), error=(ValueError, "top_k must be in", f"got {bad}"))
    if m == "top-k-float":
        return Case(name, call(top_k=k + 0.5), error=(SCHEMA, "top_k", str(k + 0.5)))
    if m == "coef":
        arg, bad = rng.choice(["balance_coef", "z_loss_coef"]), rng.choice([-1.0, float("nan"), float("inf")])
        return Case(name, call(**{arg: bad}), error=(ValueError, arg, repr(bad)))
    present = [arg for arg in _MOE_FFN_ARGS if args[arg] is not None]
    if m == "dtype":
        arg, bad = rng.choice(present[1:]), wrong_float(rng, dtype)
        return Case(name, call(**{arg: args[arg].to(bad)}), error=(R, arg, SCALAR_NAME[bad]))
    if m == "device":
        arg = rng.choice(present)
        return Case(name, call(**{arg: args[arg].to(other_device(device))}), error=(R, arg, other_device(device)))

    # Leaf copies (same values and layout) for the op and for the reference, so both can be differentiated.
    leaves = {arg: None if t is None else t.detach().requires_grad_(True) for arg, t in args.items()}
    ref_leaves = {arg: None if t is None else t.detach().requires_grad_(True) for arg, t in args.items()}
    options = (k, activation, *coefs)
    grad_y = randn(rng, T, d_out, dtype=dtype, device=device, overlap_ok=False)
    grad_terms = [randn(rng, 1, dtype=dtype, device=device)[0] for _ in range(2)]

    def differentiate(outputs, inputs):
        """Gradients of y and of the recorded loss terms (0-dim; [0] when the coefficient is 0)."""
        y, balance, z_loss, _ = outputs
        outs, grads = [y], [grad_y]
        for term, grad in zip((balance, z_loss), grad_terms, strict=True):
            if term.dim() == 0:
                outs.append(term)
                grads.append(grad.to(term.dtype))
        wrt = [t for t in inputs.values() if t is not None]
        return torch.autograd.grad(outs, wrt, grads, allow_unused=True, materialize_grads=True)

    def check(result):
        expected = reference_moe_ffn(*ref_leaves.values(), *options)
        for got, want, what in zip(result, expected, ("y", "balance_loss", "z_loss", "expert_counts"), strict=True):
            assert_equal(got.detach(), want.detach(), what)
        assert not result[3].requires_grad, "expert_counts must not be differentiable"
        got_grads, want_grads = differentiate(result, leaves), differentiate(expected, ref_leaves)
        for got, want, what in zip(got_grads, want_grads, present, strict=True):
            assert_equal(got, want, f"grad of {what}")

    return Case(
        valid_name(name),
        lambda: op(*leaves.values(), *options),
        check,
        meta_call=lambda: op(*[to_meta(None if t is None else t.detach()) for t in args.values()], *options),
    )


# ----------------------------------------------------------------------------------------------- balance


def reference_capacity(idx: torch.Tensor, score: torch.Tensor, capacity: torch.Tensor):
    """Per expert keep the ``capacity[e]`` best pairs: larger score first, NaN last, lower pair id on ties."""
    flat, s = idx.reshape(-1).tolist(), score.reshape(-1).double().tolist()
    kept = list(flat)
    for e, cap in enumerate(capacity.tolist()):
        pairs = [p for p, i in enumerate(flat) if i == e]
        pairs.sort(key=lambda p: (s[p] != s[p], -s[p] if s[p] == s[p] else 0.0, p))
        for p in pairs[cap:]:
            kept[p] = -1
    dropped = sum(1 for a, b in zip(flat, kept, strict=True) if a >= 0 and b < 0)
    return torch.tensor(kept, dtype=torch.int64).view(idx.shape), dropped


def capacity_limit_case(rng: random.Random, device: str) -> Case:
    T, E = rng.choice(SIZES), rng.randint(1, 6)
    k, dtype = rng.randint(1, E), rng.choice(FLOATS)
    idx = random_idx(rng, T, k, E, device)
    # Coarse scores (many ties) and sometimes a NaN, -0.0 or an Inf.
    values = [rng.choice([0.0, -0.0, 0.25, 0.5, 0.75, 1.0, float("nan"), float("inf")]) for _ in range(T * k)]
    score = layout(rng, torch.tensor(values, dtype=torch.float64).view(T, k).to(dtype=dtype, device=device))
    cap = torch.tensor([rng.randint(0, T * k + 1) for _ in range(E)], dtype=torch.int64, device=device)
    op = ops.capacity_limit if rng.random() < 0.5 else F.capacity_limit
    m = pick(rng, ["negative-capacity", "bad-id", "idx-int32", "score-shape", "capacity-2d", "capacity-empty"])
    name = f"capacity_limit/{m}"
    if m == "negative-capacity":
        e, value = rng.randrange(E), rng.choice([-1, -(2**40)])
        bad = set_one(cap, e, value)
        # The CUDA kernel cannot raise on a device-side value without a host sync: it keeps nothing for a negative
        # capacity (docs/ops.md); the CPU reference raises.
        error = (R, f"expert_capacity[{e}]", str(value)) if device == "cpu" else None
        return Case(name, lambda: op(idx, score, bad), error=error)
    if m == "bad-id" and T > 0:
        pos, value = rng.randrange(T * k), rng.choice([-2, E, 2**40])
        bad = set_one(idx, pos, value)
        error = (R, "topk_idx", f"expert id {value}") if device == "cpu" else None
        return Case(name, lambda: op(bad, score, cap), error=error)
    if m == "idx-int32":
        return Case(name, lambda: op(idx.int(), score, cap), error=(R, "topk_idx", "Int"))
    if m == "score-shape":
        return Case(name, lambda: op(idx, score[:, :0], cap), error=(R, "topk_score", f"[{T}, 0]"))
    if m == "capacity-2d":
        return Case(name, lambda: op(idx, score, cap[None]), error=(R, "expert_capacity", f"[1, {E}]"))
    if m == "capacity-empty":
        return Case(name, lambda: op(idx, score, cap[:0]), error=(R, "expert_capacity", "[0]"))

    def check(result):
        kept, num_dropped = result
        expected, dropped = reference_capacity(idx.cpu(), score.cpu(), cap.cpu())
        assert_equal(kept, expected, "kept_idx")
        assert int(num_dropped) == dropped, f"num_dropped {int(num_dropped)} != {dropped}"

    return Case(
        valid_name(name),
        lambda: op(idx, score, cap),
        check,
        meta_call=lambda: op(to_meta(idx), to_meta(score), to_meta(cap)),
    )


def reference_balance(logits: torch.Tensor, counts: torch.Tensor, num_pairs: int, coef: float):
    """coef * E / (pairs * T) * sum_t sum_e softmax(logits[t])_e * counts[e] in fp64, and its gradient for the logits
    (autograd of the same formula)."""
    T, E = logits.shape
    z = logits.detach().cpu().double().requires_grad_(True)
    scale = coef * E / (max(num_pairs, 1) * max(T, 1))
    loss = (torch.softmax(z, -1) * counts.cpu().double()).sum() * scale
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


def _balance_inputs(rng: random.Random, device: str):
    T, E = rng.choice(SIZES), rng.randint(1, 40)
    dtype, coef = rng.choice(FLOATS), rng.choice([0.0, 0.01, 1.0, 3.5])
    logits = layout(rng, randn(rng, T, E, dtype=dtype, device=device))
    counts = torch.tensor([rng.randint(0, 3 * T + 1) for _ in range(E)], dtype=torch.int64, device=device)
    return T, E, dtype, coef, logits, counts, int(counts.sum())


def balance_loss_case(rng: random.Random, device: str) -> Case:
    T, E, dtype, coef, logits, counts, pairs = _balance_inputs(rng, device)
    op = ops.balance_loss if rng.random() < 0.5 else F.balance_loss
    m = pick(rng, ["counts-int32", "counts-shape", "logits-1d", "negative-pairs", "bad-coef", "no-experts"])
    name = f"balance_loss/{m}"
    if m == "counts-int32":
        return Case(name, lambda: op(logits, counts.int(), pairs, coef), error=(R, "expert_counts", "Int"))
    if m == "counts-shape":
        return Case(name, lambda: op(logits, counts[:-1], pairs, coef), error=(R, "expert_counts", f"[{E - 1}]"))
    if m == "logits-1d":
        return Case(name, lambda: op(logits[0:1].reshape(-1), counts, pairs, coef), error=(R, "logits", "[num_tokens"))
    if m == "negative-pairs":
        return Case(name, lambda: op(logits, counts, -3, coef), error=((ValueError, R), "num_pairs", "-3"))
    if m == "bad-coef":
        value = rng.choice([-1.5, float("nan"), float("inf")])
        return Case(name, lambda: op(logits, counts, pairs, value), error=((ValueError, R), "coef", str(value)))
    if m == "no-experts":
        return Case(name, lambda: op(logits[:, :0], counts[:0], pairs, coef), error=(R, "logits", "[" + str(T)))

    def check(result):
        expected, _ = reference_balance(logits, counts, pairs, coef)
        loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert_close(result, expected.to(loss_dtype), loss_dtype, "loss", scale=max(1.0, coef * E))

    return Case(
        valid_name(name),
        lambda: op(logits, counts, pairs, coef),
        check,
        meta_call=lambda: op(to_meta(logits), to_meta(counts), pairs, coef),
    )


def balance_loss_backward_case(rng: random.Random, device: str) -> Case:
    T, E, dtype, coef, logits, counts, pairs = _balance_inputs(rng, device)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    grad = torch.tensor(rng.choice([1.0, -0.5, 2.0]), dtype=loss_dtype, device=device)
    op = ops.balance_loss_backward if rng.random() < 0.5 else F.balance_loss_backward
    m = pick(rng, ["grad-shape", "grad-dtype"])
    name = f"balance_loss_backward/{m}"
    if m == "grad-shape":
        return Case(name, lambda: op(grad.reshape(1), logits, counts, pairs, coef), error=(R, "grad", "[1]"))
    if m == "grad-dtype":
        other = torch.float32 if loss_dtype == torch.float64 else torch.float64
        return Case(name, lambda: op(grad.to(other), logits, counts, pairs, coef), error=(R, "grad", "dtype"))

    def check(result):
        _, expected = reference_balance(logits, counts, pairs, coef)
        assert_close(result, expected * float(grad), dtype, "grad_logits", scale=max(1.0, coef * E))

    return Case(
        valid_name(name),
        lambda: op(grad, logits, counts, pairs, coef),
        check,
        meta_call=lambda: op(to_meta(grad), to_meta(logits), to_meta(counts), pairs, coef),
    )


# ----------------------------------------------------------------------------------------------- exchange


def reference_ep_route(idx: list, num_local: int, world: int):
    """(token_ranks, dest_counts) as lists, by the definition: rank p once per token, slots and tokens per rank."""
    ranks, counts = [], [[0] * (num_local + 1) for _ in range(world)]
    for row in idx:
        mine = [-1] * world
        for g in row:
            if g < 0:
                continue
            p = g // num_local
            counts[p][g % num_local] += 1
            if mine[p] < 0:
                mine[p] = p
                counts[p][num_local] += 1
        ranks.append(mine)
    return ranks, [c for per_rank in counts for c in per_rank]


def ep_route_case(rng: random.Random, device: str) -> Case:
    world, num_local, T, k = rng.randint(1, 4), rng.randint(1, 3), rng.choice(SIZES), rng.randint(1, 4)
    E = world * num_local
    idx_list = [[rng.choice([-1] + list(range(E))) for _ in range(k)] for _ in range(T)]
    idx = layout(rng, torch.tensor(idx_list, dtype=torch.int64, device=device).reshape(T, k))
    via_ops = rng.random() < 0.5
    op = ops.ep_route if via_ops else F.ep_route
    m = pick(rng, ["idx-int32", "idx-1d", "num-local", "world", "bad-id", "valid"])
    name = f"ep_route/{m}"
    if m == "idx-int32":
        return Case(name, lambda: op(idx.int(), num_local, world), error=(R, "topk_idx", "Int"))
    if m == "idx-1d":
        return Case(name, lambda: op(idx.reshape(-1), num_local, world), error=(R, "topk_idx", f"[{T * k}]"))
    if m == "num-local":
        bad = rng.choice([0, -1])
        return Case(name, lambda: op(idx, bad, world), error=(R, "num_local", str(bad)))
    if m == "world":
        bad = rng.choice([0, -3])
        return Case(name, lambda: op(idx, num_local, bad), error=(R, "world", str(bad)))
    if m == "bad-id" and T > 0:
        pos, value = rng.randrange(T * k), rng.choice([-2, E, 2**40])
        bad = set_one(idx, pos, value)
        error = (R, "topk_idx", str(value)) if device == "cpu" else None  # CUDA drops it (no host sync)
        return Case(name, lambda: op(bad, num_local, world), error=error)

    def check(out):
        ranks, counts = reference_ep_route(idx_list, num_local, world)
        assert out[0].tolist() == (ranks if T else []), "token_ranks"
        assert out[1].tolist() == counts, "dest_counts"

    return Case(
        valid_name(name), lambda: op(idx, num_local, world), check, meta_call=lambda: op(to_meta(idx), num_local, world)
    )


# ----------------------------------------------------------------------------------------------- gates
# The gate ops' formulas are tested
# against the papers in tests/gates/test_gates_formulas.py; here random sizes (0 tokens included), dtypes and
# layouts: a valid case must give the op's result on a contiguous copy of its input (seeded alike), a well-formed
# routing and finite 0-dim or [0] loss terms, and a broken argument must be named with its value.


def _gate_call(op_name: str, rng: random.Random, T: int, E: int, dtype, device):
    """(call(logits, others) -> outputs, others (the op's other tensors), width of the routing, logits) for one
    gate op with random valid arguments."""
    logits = distinct_logits(rng, T, E, dtype, device)
    coef, k, training = rng.choice([0.0, 0.01, 1.0]), rng.randint(1, E), rng.random() < 0.5
    factor, random_routing, ec_factor = rng.choice([None, 0.5, 1.0, 2.0]), rng.random() < 0.5, rng.choice([0.5, 1, 2])
    if op_name == "naive_gate":
        return (lambda lg, o: F.naive_gate(lg, k, coef, coef)), {}, k, logits
    if op_name == "noisy_gate":
        others = {"noise": randn(rng, T, E, dtype=dtype, device=device) if training else None}
        return (lambda lg, o: F.noisy_gate(lg, o["noise"], k, 1e-2, 1.0, coef, coef)), others, k, logits
    if op_name == "gshard_gate":
        logits = distinct_logits(rng, T, max(E, 2), dtype, device)
        return (lambda lg, o: F.gshard_gate(lg, training, factor, random_routing, 1.0, coef)), {}, 2, logits
    if op_name == "switch_gate":
        return (lambda lg, o: F.switch_gate(lg, factor, 0.01, coef)), {}, 1, logits
    if op_name == "swipe_gate":
        return (lambda lg, o: F.swipe_gate(lg, k, training, coef)), {}, k, logits
    if op_name == "expert_choice_gate":
        slots = rng.randint(1, E)
        return (lambda lg, o: F.expert_choice_gate(lg, k, ec_factor, slots, coef)), {}, slots, logits
    groups = rng.choice([g for g in range(1, E + 1) if E % g == 0])
    keep = rng.randint(1, groups)
    k = rng.randint(1, keep * (E // groups)) if groups > 1 else k
    others = {"bias": randn(rng, E, device=device)}
    return (
        (lambda lg, o: F.sigmoid_gate(lg, o["bias"], k, groups, keep, True, 1.0, coef, training, 1e-3)),
        others,
        k,
        logits,
    )


def gate_case(op_name: str):
    def generate(rng: random.Random, device: str) -> Case:
        T, E, dtype = rng.choice(SIZES), rng.randint(1, 6), rng.choice(FLOATS)
        call_with, others, width, logits = _gate_call(op_name, rng, T, E, dtype, device)

        def call(lg):
            return call_with(lg, others)

        E = logits.shape[1]
        m = pick(rng, ["int-logits", "1d", "coef", "k"])
        name = f"{op_name}/{m}"
        if m == "int-logits":
            return Case(name, lambda: call(logits.long()), error=(R, "logits", "Long"))
        if m == "1d":
            return Case(name, lambda: call(logits.reshape(-1)), error=(R, "logits", f"[{T * E}]"))
        if m == "coef":
            bad = rng.choice([-1.0, float("nan"), float("inf")])
            name_of = {"naive_gate": "z_loss_coef", "noisy_gate": "w_importance", "sigmoid_gate": "aux_loss_coef"}
            arg = name_of.get(op_name, "z_loss_coef")
            calls = {
                "naive_gate": lambda: F.naive_gate(logits, 1, 0.0, bad),
                "noisy_gate": lambda: F.noisy_gate(logits, None, 1, 1e-2, bad),
                "gshard_gate": lambda: F.gshard_gate(logits, False, None, True, 1.0, bad),
                "switch_gate": lambda: F.switch_gate(logits, None, 0.01, bad),
                "swipe_gate": lambda: F.swipe_gate(logits, 1, False, bad),
                "expert_choice_gate": lambda: F.expert_choice_gate(logits, 1, 1.0, 1, bad),
                "sigmoid_gate": lambda: F.sigmoid_gate(logits, torch.zeros(E, device=device), 1, 1, 1, True, 1.0, bad),
            }
            if op_name == "gshard_gate" and E < 2:
                return Case(valid_name(name), lambda: call(logits), None)
            return Case(name, calls[op_name], error=(ValueError, arg, repr(bad)))
        if m == "k" and op_name not in ("gshard_gate", "switch_gate"):
            bad = rng.choice([0, E + 1])
            calls = {
                "naive_gate": lambda: F.naive_gate(logits, bad),
                "noisy_gate": lambda: F.noisy_gate(logits, None, bad),
                "swipe_gate": lambda: F.swipe_gate(logits, bad, False),
                "expert_choice_gate": lambda: F.expert_choice_gate(logits, bad, 1.0, 1),
                "sigmoid_gate": lambda: F.sigmoid_gate(logits, torch.zeros(E, device=device), bad),
            }
            return Case(name, calls[op_name], error=(ValueError, "k", str(bad)))
        laid_out = layout(rng, logits)

        def run(lg):
            torch.manual_seed(11)
            return call(lg)

        def check(result):
            idx, score, balance, z_loss, num_dropped, *rest = result
            assert idx.shape == score.shape == (T, width) and idx.dtype == torch.int64, f"routing {idx.shape}"
            assert score.dtype == dtype, f"topk_score dtype {score.dtype}"
            assert ((idx >= -1) & (idx < E)).all(), "expert id out of range"
            assert (score[idx < 0] == 0).all(), "an empty slot has a score"
            for term_name, term in (("balance_loss", balance), ("z_loss", z_loss)):
                assert term.shape in ((), (0,)) and torch.isfinite(term).all(), f"{term_name} {term}"
            assert num_dropped.shape in ((), (0,)) and num_dropped.dtype == torch.int64, "num_dropped"
            expected = run(logits.contiguous())
            assert_equal(idx, expected[0], "topk_idx")
            assert_close(score, expected[1], dtype, "topk_score")

        meta_others = {key: to_meta(value) for key, value in others.items()}
        return Case(
            valid_name(name), lambda: run(laid_out), check, meta_call=lambda: call_with(to_meta(logits), meta_others)
        )

    return generate


def switch_jitter_case(rng: random.Random, device: str) -> Case:
    T, d, dtype = rng.choice(SIZES), rng.randint(1, 9), rng.choice(FLOATS)
    eps = rng.choice([0.0, 0.1, 0.5])
    x = randn(rng, T, d, dtype=dtype, device=device)
    m = pick(rng, ["eps", "int-x"])
    name = f"switch_jitter/{m}"
    if m == "eps":
        bad = rng.choice([-0.1, 1.0, float("nan")])
        return Case(name, lambda: F.switch_jitter(x, bad), error=(ValueError, "switch_eps", repr(bad)))
    if m == "int-x":
        return Case(name, lambda: F.switch_jitter(x.long(), eps), error=(R, "x", "Long"))

    def check(out):
        ratio = (out.double() / x.double())[x != 0]
        slack = 4 * torch.finfo(dtype).eps
        assert ((ratio >= 1 - eps - slack) & (ratio <= 1 + eps + slack)).all(), "jitter outside [1 - eps, 1 + eps]"
        assert (out[x == 0] == 0).all(), "a zero moved"

    return Case(
        valid_name(name), lambda: F.switch_jitter(x, eps), check, meta_call=lambda: F.switch_jitter(to_meta(x), eps)
    )


def gate_capacity_case(rng: random.Random, device: str) -> Case:
    T, E = rng.choice(SIZES), rng.randint(1, 6)
    k, dtype = rng.randint(1, E), rng.choice(FLOATS)
    idx = random_idx(rng, T, k, E, device)
    score = layout(
        rng,
        torch.rand(T, k, generator=torch.Generator().manual_seed(rng.getrandbits(31))).to(dtype=dtype, device=device),
    )
    factor = rng.choice([None, 0.25, 0.5, 1.0, 3.0])
    m = pick(rng, ["factor", "offset", "shape"])
    name = f"gate_capacity/{m}"
    if m == "factor":
        bad = rng.choice([0.0, -1.0, float("nan")])
        return Case(name, lambda: F.gate_capacity(idx, score, bad, E), error=(ValueError, "capacity_factor", repr(bad)))
    if m == "offset":
        bad = rng.choice([-1, 1])
        return Case(
            name,
            lambda: F.gate_capacity(idx, score, 1.0, E, idx, score, bad),
            error=(ValueError, "group_offset", str(bad)),
        )
    if m == "shape":
        return Case(name, lambda: F.gate_capacity(idx, score[:, :0], 1.0, E), error=(R, "topk_score", f"[{T}, 0]"))

    def check(result):
        kept, kept_score, num_dropped = result
        if factor is None:
            assert_equal(kept, idx.contiguous(), "kept_idx")
        else:
            cap = torch.full((E,), math.ceil(factor * T * k / E), dtype=torch.int64)
            expected, dropped = reference_capacity(idx.cpu(), score.cpu(), cap)
            assert_equal(kept, expected, "kept_idx")
            assert int(num_dropped) == dropped, f"num_dropped {int(num_dropped)} != {dropped}"
        assert torch.equal(kept_score.cpu(), torch.where(kept >= 0, score, torch.zeros_like(score)).cpu()), "kept_score"

    return Case(
        valid_name(name),
        lambda: F.gate_capacity(idx, score, factor, E),
        check,
        meta_call=lambda: F.gate_capacity(to_meta(idx), to_meta(score), factor, E),
    )


def check_finite_case(rng: random.Random, device: str) -> Case:
    """Debug mode's check: finite and integer tensors pass, a NaN or Inf anywhere raises naming the owner, the
    tensor and the first bad index."""
    T, d, dtype = rng.choice(SIZES), rng.randint(1, 9), rng.choice(FLOATS)
    x = randn(rng, max(T, 1), d, dtype=dtype, device=device)
    m = pick(rng, ["finite", "integer", "nan", "inf"])
    name = f"check_finite/{m}"
    if m in ("nan", "inf"):
        bad = x.clone()
        row, col = rng.randrange(bad.shape[0]), rng.randrange(d)
        bad[row, col] = float("nan") if m == "nan" else float("inf")
        count = "1 NaN and 0 Inf" if m == "nan" else "0 NaN and 1 Inf"
        return Case(name, lambda: F.check_finite(bad, "fuzz", "rows"), error=(R, "fuzz: rows", count))
    t = x if m == "finite" else x.long()

    def check(out):
        assert out is None, f"check_finite returned {out!r}"
        # it returns nothing, so the meta call is checked here: meta tensors are never read
        assert F.check_finite(to_meta(t), "fuzz", "rows") is None

    return Case(valid_name(name), lambda: F.check_finite(t, "fuzz", "rows"), check)


# ----------------------------------------------------------------------------------------------- replication


def replicate_experts_case(rng: random.Random, device: str) -> Case:
    """Hot-expert replication's copies on one process (group "", where the op is a row selection): the copies
    are the chosen experts' rows bit for bit, in any layout; bad ids and a weight of another expert count are
    named. tests/distributed/test_replication.py runs the collective."""
    L, dtype = rng.randint(1, 5), rng.choice(FLOATS)
    shape = [L] + [rng.randint(1, 4) for _ in range(rng.randint(0, 2))]
    w = (
        layout(rng, randn(rng, *shape, dtype=dtype, device=device))
        if len(shape) == 2
        else randn(rng, *shape, dtype=dtype, device=device)
    )
    experts = sorted(rng.sample(range(L), rng.randint(0, L)))
    m = pick(rng, ["descending", "out-of-range", "num-local", "valid"])
    name = f"replicate_experts/{m}"
    if m == "descending" and len(experts) >= 2:
        bad = experts[::-1]
        return Case(name, lambda: F.replicate_experts(w, bad, L, ""), error=(R, "experts", str(bad)))
    if m == "out-of-range":
        bad = experts + [L + rng.randint(0, 3)]
        return Case(name, lambda: F.replicate_experts(w, bad, L, ""), error=(R, "experts", str(bad)))
    if m == "num-local":
        bad = L + rng.randint(1, 3)
        return Case(name, lambda: F.replicate_experts(w, [], bad, ""), error=(R, "num_local", str(bad)))

    def check(out):
        assert_equal(out, w.contiguous()[experts] if experts else w.new_zeros(0, *shape[1:]), "copies")

    return Case(
        valid_name(name),
        lambda: F.replicate_experts(w, experts, L, ""),
        check,
        meta_call=lambda: F.replicate_experts(to_meta(w), experts, L, ""),
    )


def plan_replication_case(rng: random.Random, device: str) -> Case:
    """The replication policy on random loads (one hot expert or none): the plan is ascending, within the cap and
    among the experts other ranks send slots to; copies that cost more than any saving are never made; a negative
    load, a load of the wrong shape and a negative cost are named."""
    world, L = rng.randint(1, 5), rng.randint(1, 3)
    E = world * L
    hot = rng.randrange(E)
    load = torch.tensor(
        [[rng.randrange(50) + (rng.randrange(2000) if e == hot else 0) for e in range(E)] for _ in range(world)],
        dtype=torch.int64,
    )
    costs = [rng.choice([1e-6, 1e-8]), rng.choice([1e-6, 1e-8]), rng.choice([1e-6, 1e-4])]
    cap = rng.randint(0, E)
    m = pick(rng, ["negative", "shape", "cost", "dear", "valid"])
    name = f"plan_replication/{m}"
    if m == "negative":
        bad = load.clone()
        bad[rng.randrange(world), rng.randrange(E)] = -rng.randint(1, 9)
        return Case(name, lambda: F.plan_replication(bad, L, *costs, cap), error=(R, "load", "must be >= 0"))
    if m == "shape":
        bad = load[:, : E - 1] if E > 1 else load.reshape(1, world, E)
        return Case(name, lambda: F.plan_replication(bad, L, *costs, cap), error=(R, "load", str(list(bad.shape))))
    if m == "cost":
        return Case(
            name, lambda: F.plan_replication(load, L, costs[0], -1.0, costs[2], cap), error=(R, "row_cost", "-1")
        )
    if m == "dear":  # a copy costs more than the whole step without it
        return Case(
            valid_name(name),
            lambda: F.plan_replication(load, L, *costs[:2], 1e3, cap),
            lambda out: _assert_no_copies(out),
        )

    def check(out):
        assert out == sorted(set(out)), f"plan {out} is not ascending without repeats"
        assert len(out) <= cap, f"plan {out} exceeds max_experts={cap}"
        for e in out:
            remote = sum(int(load[s, e]) for s in range(world) if s != e // L)
            assert remote > 0, f"plan {out} copies expert {e}, which no other rank sends slots to"

    return Case(valid_name(name), lambda: F.plan_replication(load, L, *costs, cap), check)


def _assert_no_copies(out):
    assert out == [], f"copies costing more than the step were made: {out}"


GATE_GENERATORS = {
    **{
        name: gate_case(name)
        for name in (
            "naive_gate",
            "noisy_gate",
            "gshard_gate",
            "switch_gate",
            "swipe_gate",
            "expert_choice_gate",
            "sigmoid_gate",
        )
    },
    "switch_jitter": switch_jitter_case,
    "check_finite": check_finite_case,
    "gate_capacity": gate_capacity_case,
}


GENERATORS = {
    "ep_route": ep_route_case,
    "route_topk": route_topk_case,
    "route_topk_backward": route_topk_backward_case,
    "make_plan": make_plan_case,
    "permute": permute_case,
    "unpermute_combine": combine_case,
    "unpermute_combine_backward": combine_backward_case,
    "grouped_linear": grouped_linear_case,
    "grouped_linear_backward": grouped_linear_backward_case,
    "gelu_backward_bias": gelu_backward_bias_case,
    "swiglu": swiglu_case,
    "swiglu_backward": swiglu_backward_case,
    "swiglu_scaled_backward": swiglu_scaled_backward_case,
    "capacity_limit": capacity_limit_case,
    "balance_loss": balance_loss_case,
    "balance_loss_backward": balance_loss_backward_case,
    "replicate_experts": replicate_experts_case,
    "plan_replication": plan_replication_case,
    "moe_ffn": moe_ffn_case,
}
GENERATORS.update(GATE_GENERATORS)
