"""The gate ops (torch.ops.fastmoe.*_gate, csrc/ops/gates.cpp) against plain-PyTorch transcriptions of the papers
(tests/gates/gate_reference.py) on fixed fp64 inputs: indices, scores, loss terms and the gradients of the input and
of every parameter; plus the capacity rule, the z-loss, the bias balancing rule, 0 tokens, Meta and torch.compile.
Then the Python gate classes, thinly: each forward is its op on its logits, and their API and argument errors."""

import functools
import math

import gate_reference as ref
import pytest
import torch
from torch import nn
from torch.library import opcheck

from conftest import CUDA_SKIP_REASON, leaf, make_generator, mentions, randn
from fastmoe import FMoE, FMoETransformerMLP
from fastmoe.gates import (
    GATES,
    BaseGate,
    DCGate,
    ExpertChoiceGate,
    GShardGate,
    NaiveGate,
    NoisyGate,
    SigmoidGate,
    SwipeGate,
    SwitchGate,
    ZeroGate,
)

ops = torch.ops.fastmoe
D_MODEL, NUM_EXPERT, NUM_TOKENS = 5, 6, 12  # d not a multiple of 8 on purpose
ATOL = 1e-12
RTOL = 1e-10
TOP_K = {SwitchGate: 1}  # every other gate runs top-2 here


def params(seed: int, device="cpu", num_experts=NUM_EXPERT, shapes=None, scale=0.7) -> dict:
    """Random fp64 router parameters: ``weight [E, d]`` and ``bias [E]`` by default."""
    gen = make_generator(seed)
    shapes = shapes or {"weight": (num_experts, D_MODEL), "bias": (num_experts,)}
    return {name: randn(*shape, gen=gen, device=device, scale=scale) for name, shape in shapes.items()}


def linear(x, p):
    return x @ p["weight"].t() + p["bias"]


def tokens(device, seed=1, num_tokens=NUM_TOKENS):
    return randn(num_tokens, D_MODEL, gen=make_generator(seed), device=device)


def objective(score, losses, seed=123):
    """A scalar that uses every score with a distinct weight plus every loss term."""
    weight = torch.randn(score.shape, generator=make_generator(seed), dtype=torch.float64).to(score.device)
    return (score * weight).sum() + sum(losses.values())


def loss_terms(balance, z_loss) -> dict:
    """The recorded terms of an op's outputs (a ``[0]`` term is not recorded)."""
    return {name: term for name, term in (("balance", balance), ("z", z_loss)) if term.dim() == 0}


def run_op(route, x, p, seed=7):
    """``route(x, params)`` returns an op's outputs; gives (idx, score, losses, grads {input, params}, num_dropped)
    with torch seeded by ``seed``."""
    xg, leaves = leaf(x), {name: leaf(t) for name, t in p.items()}
    torch.manual_seed(seed)
    idx, score, balance, z_loss, num_dropped, *_ = route(xg, leaves)
    losses = loss_terms(balance, z_loss)
    grads = torch.autograd.grad(
        objective(score, losses), [xg, *leaves.values()], allow_unused=True, materialize_grads=True
    )
    return idx, score, losses, dict(zip(["input", *leaves], grads, strict=True)), num_dropped


def run_reference(fn, x, p, *args, **kwargs):
    xr, leaves = leaf(x.cpu()), {name: leaf(t.cpu()) for name, t in p.items()}
    idx, score, losses, *_ = fn(xr, leaves, *args, **kwargs)
    grads = torch.autograd.grad(
        objective(score, losses), [xr, *leaves.values()], allow_unused=True, materialize_grads=True
    )
    return idx, score, losses, dict(zip(["input", *leaves], grads, strict=True))


def assert_matches(got, want):
    idx, score, losses, grads = got[:4]
    ridx, rscore, rlosses, rgrads = want
    assert idx.dtype == torch.int64 and idx.shape == ridx.shape, (idx.shape, ridx.shape)
    # Ids are exact, though the two sides compute their fp64 scores with different ops (rounding that varies by
    # CPU): a comparison could only flip at a near-tie, and these seeded inputs keep every decision apart by far
    # more than rounding.
    assert torch.equal(idx.cpu(), ridx), f"topk_idx differs:\n{idx.cpu()}\nvs reference\n{ridx}"
    torch.testing.assert_close(score.detach().cpu(), rscore.detach(), rtol=RTOL, atol=ATOL)
    assert set(losses) == set(rlosses), (set(losses), set(rlosses))
    for name in losses:
        torch.testing.assert_close(losses[name].detach().cpu(), rlosses[name].detach(), rtol=RTOL, atol=ATOL)
    for name, g in grads.items():
        torch.testing.assert_close(
            g.cpu(), rgrads[name], rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"grad of {name}: {m}"
        )


def skew_(p, expert=0, amount=2.5):
    """Pushes most tokens to ``expert`` so capacity limits bite."""
    p["bias"][expert] += amount
    return p


# ----------------------------------------------------------------------------------------------- naive_gate


@pytest.mark.parametrize("balance_coef", [0.0, 0.05])
def test_naive_gate_matches_formula(device, balance_coef):
    p = skew_(params(0, device), amount=1.0)
    x = tokens(device)

    def naive(xr, q):
        logits = linear(xr, q)
        idx = ref.topk_rows(logits, 2)
        losses = {"z": 0.3 * ref.z_loss(logits)}
        if balance_coef:
            losses["balance"] = ref.naive_balance_loss(logits, idx, balance_coef)
        return idx, ref.softmax_rows(logits.gather(1, idx)), losses

    got = run_op(lambda xg, q: ops.naive_gate(linear(xg, q), 2, balance_coef, 0.3), x, p)
    assert_matches(got, run_reference(naive, x, p))
    assert got[4].shape == (0,)  # never drops


def test_naive_gate_balance_is_coef_when_uniform_and_grows_with_skew():
    """Uniform probabilities and an even load give exactly coef; every slot on 2 of E experts with those experts
    holding most of the probability gives more."""
    logits = torch.zeros(NUM_TOKENS, 4, dtype=torch.float64)  # ties: every token on experts 0 and 1, P uniform
    _, _, balance, z_loss, _ = ops.naive_gate(logits, 2, 0.01)
    torch.testing.assert_close(balance, torch.tensor(0.01, dtype=torch.float64), rtol=0, atol=1e-15)
    assert z_loss.shape == (0,)
    logits[:, :2] = 3.0
    assert ops.naive_gate(logits, 2, 0.01)[2].item() > 1.5 * 0.01
    assert ops.naive_gate(logits, 2)[2].shape == (0,)  # no coefficient, no term


# ----------------------------------------------------------------------------------------------- noisy_gate

NOISY_SHAPES = {"w_gate": (D_MODEL, NUM_EXPERT), "w_noise": (D_MODEL, NUM_EXPERT)}


def noisy_route(k, training=True, **kwargs):
    def route(xg, q):
        return ops.noisy_gate(xg @ q["w_gate"], xg @ q["w_noise"] if training else None, k, **kwargs)

    return route


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_noisy_gate_training_matches_paper(device, top_k):
    p = params(2, device, shapes=NOISY_SHAPES)
    x = tokens(device, 3)
    torch.manual_seed(7)
    noise = torch.randn(NUM_TOKENS, NUM_EXPERT, dtype=torch.float64, device=device).cpu()  # the op's one draw
    got = run_op(noisy_route(top_k, w_importance=0.4, w_load=0.9), x, p, seed=7)
    want = run_reference(
        lambda xr, q: ref.noisy_gate(xr, q["w_gate"], q["w_noise"], top_k, noise, 1e-2, 0.4, 0.9), x, p
    )
    assert_matches(got, want)
    assert got[0].shape == (NUM_TOKENS, top_k)  # [T, k], not FastMoE's flattened indices
    assert got[3]["w_noise"].abs().sum() > 0  # the load estimator trains the noise weights


def test_noisy_gate_eval_has_no_noise_and_counts_the_load(device):
    p = params(4, device, shapes=NOISY_SHAPES)
    x = tokens(device, 5)
    got = run_op(noisy_route(2, training=False), x, p)
    assert_matches(got, run_reference(lambda xr, q: ref.noisy_gate(xr, q["w_gate"], q["w_noise"], 2, None), x, p))


def test_noisy_gate_k_equals_num_experts():
    p = params(6, shapes={"w_gate": (D_MODEL, 3), "w_noise": (D_MODEL, 3)})
    x = tokens("cpu")
    torch.manual_seed(7)
    noise = torch.randn(NUM_TOKENS, 3, dtype=torch.float64)
    got = run_op(noisy_route(3), x, p, seed=7)
    assert_matches(got, run_reference(lambda xr, q: ref.noisy_gate(xr, q["w_gate"], q["w_noise"], 3, noise), x, p))


def test_noisy_gate_zero_weights_and_one_expert_give_finite_losses(device):
    """All-zero logits (a fresh gate): finite in eval (FastMoE divided by a zero noise there) and in training;
    one expert: the loss is 0 on the logits' device."""
    clean = torch.zeros(NUM_TOKENS, NUM_EXPERT, dtype=torch.float64, device=device, requires_grad=True)
    for noise in (None, torch.zeros_like(clean)):
        _, score, balance, _, _ = ops.noisy_gate(clean, noise, 2)
        assert torch.isfinite(balance) and torch.isfinite(score).all()
        torch.autograd.grad(balance + score.sum(), clean)
    one = ops.noisy_gate(torch.randn(NUM_TOKENS, 1, dtype=torch.float64, device=device), None, 1)[2]
    assert one.device.type == torch.device(device).type and one.item() == 0.0


# ----------------------------------------------------------------------------------------------- gshard_gate


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("random_routing", [True, False], ids=["random", "no-random"])
def test_gshard_gate_matches_paper(device, training, random_routing):
    factor = 0.8 if training else 1.1
    p = skew_(params(8, device))
    x = tokens(device, 9, num_tokens=20)
    uniform = None
    if training and random_routing:
        torch.manual_seed(7)
        uniform = torch.rand(20, dtype=torch.float64, device=device).cpu()
    cap = math.ceil(factor * 20 * 2 / NUM_EXPERT)

    def gshard(xr, q):
        idx, score, losses, logits = ref.gshard_gate(xr, q["weight"], q["bias"], uniform, cap)
        losses["z"] = 0.1 * ref.z_loss(logits)
        return idx, score, losses

    got = run_op(lambda xg, q: ops.gshard_gate(linear(xg, q), training, factor, random_routing, 1.0, 0.1), x, p)
    assert_matches(got, run_reference(gshard, x, p))
    demand = ref.gshard_gate(x.cpu(), p["weight"].cpu(), p["bias"].cpu(), uniform, None)[0]
    assert got[4].item() == int((demand >= 0).sum() - (got[0] >= 0).sum()) > 0  # capacity did drop


def test_gshard_random_routing_only_in_training():
    logits = linear(tokens("cpu", 4, num_tokens=200), params(3))
    torch.manual_seed(0)
    train_idx, train_score, *_ = ops.gshard_gate(logits, True, None)
    assert (train_idx[:, 1] == -1).any() and (train_idx[:, 0] >= 0).all()
    assert (train_score[train_idx < 0] == 0).all()
    eval_idx, _, _, _, num_dropped = ops.gshard_gate(logits, False, None)
    assert (eval_idx >= 0).all() and num_dropped.item() == 0


# ----------------------------------------------------------------------------------------------- switch_gate


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_switch_gate_matches_paper(device, training):
    eps, factor = 0.3, (1.0 if training else 1.5)
    p = skew_(params(10, device))
    x = tokens(device, 11, num_tokens=18)
    jitter = None
    if training:
        torch.manual_seed(7)
        jitter = torch.empty(18, D_MODEL, dtype=torch.float64, device=device).uniform_(1 - eps, 1 + eps).cpu()

    def switch(xg, q):
        return ops.switch_gate(linear(ops.switch_jitter(xg, eps) if training else xg, q), factor, 0.05)

    cap = math.ceil(factor * 18 / NUM_EXPERT)
    got = run_op(switch, x, p)
    assert_matches(
        got, run_reference(lambda xr, q: ref.switch_gate(xr, q["weight"], q["bias"], jitter, cap, 0.05), x, p)
    )
    assert got[4].item() > 0


def test_switch_jitter_multiplies_the_input():
    """A zero row stays zero under multiplicative jitter (FastMoE's additive noise on the logits would move it);
    the other rows are scaled within [1 - eps, 1 + eps]."""
    x = tokens("cpu", 13)
    x[3] = 0
    jittered = ops.switch_jitter(x, 0.5)
    assert torch.equal(jittered[3], x[3])
    ratio = jittered[x != 0] / x[x != 0]
    assert (ratio >= 0.5).all() and (ratio <= 1.5).all() and not torch.equal(jittered, x)


# ----------------------------------------------------------------------------------------------- swipe_gate


def test_swipe_gate_matches_documented_greedy(device):
    p = skew_(params(14, device), expert=2, amount=3.0)
    x = tokens(device, 15, num_tokens=25)

    def swipe(xr, q):
        idx, score, _, logits = ref.swipe_gate(xr, q["weight"], q["bias"], 2)
        return idx, score, {"z": 0.2 * ref.z_loss(logits)}

    got = run_op(lambda xg, q: ops.swipe_gate(linear(xg, q), 2, True, 0.2), x, p)
    assert_matches(got, run_reference(swipe, x, p))
    idx = got[0].cpu()
    capacity = math.ceil(25 * 2 / NUM_EXPERT)
    assert torch.bincount(idx[idx >= 0], minlength=NUM_EXPERT).max() <= capacity
    plain = ref.topk_rows(linear(x, p).cpu(), 2)
    assert torch.bincount(plain.reshape(-1), minlength=NUM_EXPERT).max() > capacity  # it had to rebalance
    assert ((idx >= 0).sum(1) >= 1).all() and got[4].item() == int((idx < 0).sum())
    for row in idx.tolist():  # distinct experts per token
        kept = [e for e in row if e >= 0]
        assert len(set(kept)) == len(kept)


def test_swipe_gate_without_pressure_or_in_eval_is_naive_gate():
    """Token t prefers experts t, then t+1: every expert is wanted exactly twice, the capacity, so training gives
    the plain top-k; eval is the naive gate's routing on any logits."""
    logits = torch.zeros(NUM_EXPERT, NUM_EXPERT, dtype=torch.float64)
    for t in range(NUM_EXPERT):
        logits[t, t], logits[t, (t + 1) % NUM_EXPERT] = 2.0, 1.0
    naive_idx, naive_score, *_ = ops.naive_gate(logits, 2)
    idx, score, _, _, num_dropped = ops.swipe_gate(logits, 2, True)
    assert torch.equal(idx, naive_idx) and num_dropped.item() == 0
    torch.testing.assert_close(score, naive_score, rtol=0, atol=1e-15)
    skewed = linear(tokens("cpu", 19, num_tokens=30), skew_(params(18), amount=3.0))
    eval_idx, eval_score, _, _, num_dropped = ops.swipe_gate(skewed, 2, False)
    assert torch.equal(eval_idx, ops.naive_gate(skewed, 2)[0]) and torch.equal(eval_score, ops.naive_gate(skewed, 2)[1])
    assert num_dropped.item() == 0


# ----------------------------------------------------------------------------------------------- expert_choice_gate


@pytest.mark.parametrize("max_experts", [None, 1, 2], ids=["uncapped", "cap1", "cap2"])
@pytest.mark.parametrize("capacity_factor", [1.0, 0.5])
def test_expert_choice_gate_matches_paper(device, max_experts, capacity_factor):
    p = params(20, device)
    x = tokens(device, 21, num_tokens=15)
    width = NUM_EXPERT if max_experts is None else max_experts
    got = run_op(lambda xg, q: ops.expert_choice_gate(linear(xg, q), 2, capacity_factor, width), x, p)
    want = run_reference(
        lambda xr, q: ref.expert_choice_gate(xr, q["weight"], q["bias"], 2, capacity_factor, max_experts), x, p
    )
    assert_matches(got, want)
    assert got[0].shape == (15, width)
    cap, idx = min(15, math.ceil(capacity_factor * 15 * 2 / NUM_EXPERT)), got[0].cpu()
    assert got[4].item() == NUM_EXPERT * cap - int((idx >= 0).sum())  # the choices a cap cut
    if max_experts is None:  # every expert processes exactly C tokens, nothing is cut
        assert torch.equal(torch.bincount(idx[idx >= 0], minlength=NUM_EXPERT), torch.full((NUM_EXPERT,), cap))
        assert got[4].item() == 0
    elif max_experts == 1:
        assert got[4].item() > 0


# ----------------------------------------------------------------------------------------------- sigmoid_gate

EXPERT_BIAS = torch.tensor([0.3, -0.2, 0.0, 0.5, -0.4, 0.1])


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(n_groups=3, topk_groups=2, routed_scaling_factor=2.5),
        dict(n_groups=2, topk_groups=1, normalize=False),
        dict(n_groups=6, topk_groups=2, aux_loss_coef=0.3),
    ],
    ids=["plain", "groups3-keep2-scaled", "groups2-keep1-unnormalised", "groups6-aux"],
)
def test_sigmoid_gate_matches_deepseek_v3(device, config):
    p = params(22, device, shapes={"weight": (NUM_EXPERT, D_MODEL)})
    x = tokens(device, 23)
    bias = EXPERT_BIAS.to(device)
    got = run_op(lambda xg, q: ops.sigmoid_gate(xg @ q["weight"].t(), bias, 2, **config), x, p)
    assert_matches(
        got, run_reference(lambda xr, q: ref.sigmoid_gate(xr, q["weight"], None, EXPERT_BIAS, 2, **config), x, p)
    )
    assert "z" not in got[2] and got[4].shape == (0,)  # no z-loss, never drops


def test_sigmoid_bias_steers_selection_only():
    """A bias changes which experts are picked but not the weights' formula, and gets no gradient."""
    logits = linear(tokens("cpu", 25), params(24)).requires_grad_()
    bias = torch.zeros(NUM_EXPERT, requires_grad=True)
    idx0, *_ = ops.sigmoid_gate(logits, bias, 2)
    steered = torch.zeros(NUM_EXPERT).index_fill(0, idx0[0, :1], -10.0).requires_grad_()
    idx1, score1, *_ = ops.sigmoid_gate(logits, steered, 2)
    assert idx1[0, 0] != idx0[0, 0]
    picked = torch.sigmoid(logits).detach().gather(1, idx1)
    torch.testing.assert_close(score1.detach(), picked / picked.sum(1, keepdim=True), rtol=0, atol=1e-15)
    (grad,) = torch.autograd.grad(score1.sum(), steered, allow_unused=True)
    assert grad is None
    shifted = ops.sigmoid_gate(logits, steered + 0.5, 2)  # a uniform shift changes no ranking: nothing changes
    assert torch.equal(shifted[0], idx1) and torch.equal(shifted[1], score1)


def test_sigmoid_bias_update_rule(device):
    logits = linear(tokens(device, 27), params(26, device))
    idx, *_, update = ops.sigmoid_gate(
        logits, torch.zeros(NUM_EXPERT, device=device), 2, training=True, bias_update_rate=0.05
    )
    load = torch.bincount(idx.cpu().reshape(-1), minlength=NUM_EXPERT).float()
    want = 0.05 * torch.sign(NUM_TOKENS * 2 / NUM_EXPERT - load)
    assert update.dtype == torch.float32 and torch.equal(update.cpu(), want) and (want != 0).any()
    for training, rate in ((False, 0.05), (True, 0.0)):  # no update in eval, none at rate 0
        assert ops.sigmoid_gate(
            logits, torch.zeros(NUM_EXPERT, device=device), 2, training=training, bias_update_rate=rate
        )[5].shape == (0,)


# ----------------------------------------------------------------------------------------------- gate_capacity


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op", ["gshard", "switch"])
def test_capacity_keeps_the_highest_scored_assignments(op, training, device):
    """Per expert: exactly min(capacity, demand) assignments survive and each beats every dropped one; the kept
    scores are bitwise those of the routing before capacity."""
    logits = linear(tokens(device, 35, num_tokens=60), skew_(params(34, device), amount=3.0)).detach()
    factor = 0.7 if training else 0.9
    if op == "gshard":
        k, (want_idx, want_score, *_) = 2, ops.naive_gate(logits, 2)  # the top-2 before capacity
        idx, score, _, _, num_dropped = ops.gshard_gate(logits, training, factor, False)
    else:
        k, (want_idx, want_score) = 1, torch.ops.fastmoe.route_topk(logits, 1, "softmax_topk")
        idx, score, _, _, num_dropped = ops.switch_gate(logits, factor)
    cap = math.ceil(factor * 60 * k / NUM_EXPERT)
    for e in range(NUM_EXPERT):
        kept = (idx == e) & (want_idx == e)
        assert ((idx == e) == kept).all()
        kept_scores, dropped_scores = want_score[kept], want_score[(want_idx == e) & ~kept]
        assert kept_scores.numel() == min(cap, int((want_idx == e).sum()))
        if dropped_scores.numel():
            assert kept_scores.min() >= dropped_scores.max()
    assert torch.equal(score, torch.where(idx >= 0, want_score, 0.0))
    assert num_dropped.item() == int((want_idx >= 0).sum() - (idx >= 0).sum()) > 0


def test_gate_capacity_over_a_group_is_the_capacity_of_the_concatenated_routing(device):
    """Each rank's share of the group's decision equals the one-process capacity on the ranks' rows in rank order,
    and the ranks' drop counts add up to it."""
    logits = linear(tokens(device, 41, num_tokens=30), skew_(params(40, device), amount=3.0))
    idx, score, *_ = ops.gshard_gate(logits, False, None, False)
    whole_idx, whole_score, whole_dropped = ops.gate_capacity(idx, score, 0.8, NUM_EXPERT)
    dropped = 0
    for start, stop in ((0, 11), (11, 11), (11, 30)):  # three ranks, one without tokens
        kept, kept_score, num_dropped = ops.gate_capacity(
            idx[start:stop], score[start:stop], 0.8, NUM_EXPERT, idx, score, start
        )
        assert torch.equal(kept, whole_idx[start:stop]) and torch.equal(kept_score, whole_score[start:stop])
        dropped += num_dropped.item()
    assert dropped == whole_dropped.item() > 0
    with pytest.raises(ValueError, match=mentions("group_offset", "20")):
        ops.gate_capacity(idx[:11], score[:11], 0.8, NUM_EXPERT, idx, score, 20)


# ----------------------------------------------------------------------------------------------- every op


def op_cases(logits, x):
    """(name, op, args): every gate op in training, on ``logits [T, E]`` (and ``x`` for the jitter)."""
    num_experts = logits.shape[1]
    noise = (logits * 0.5).detach().requires_grad_(logits.requires_grad)  # a leaf of its own, as x @ w_noise is
    return [
        ("naive", ops.naive_gate, (logits, 2, 0.1, 0.1)),
        ("noisy", ops.noisy_gate, (logits, noise, 2, 1e-2, 1.0, 1.0, 0.1)),
        ("gshard", ops.gshard_gate, (logits, True, 1.0, True, 1.0, 0.1)),
        ("switch", ops.switch_gate, (logits, 1.0, 0.01, 0.1)),
        ("swipe", ops.swipe_gate, (logits, 2, True, 0.1)),
        ("expert_choice", ops.expert_choice_gate, (logits, 2, 1.0, 3, 0.1)),
        (
            "sigmoid",
            ops.sigmoid_gate,
            (logits, torch.zeros(num_experts, device=logits.device), 2, 2, 1, True, 2.5, 0.2, True, 1e-3),
        ),
        ("switch_jitter", ops.switch_jitter, (x, 0.1)),
        ("gate_capacity", ops.gate_capacity, (*ops.naive_gate(logits, 2)[:2], 0.5, num_experts)),
    ]


SOFTMAX_OPS = {
    "naive": lambda logits, z: ops.naive_gate(logits, 2, 0.0, z),
    "noisy": lambda logits, z: ops.noisy_gate(logits, None, 2, z_loss_coef=z),
    "gshard": lambda logits, z: ops.gshard_gate(logits, False, None, z_loss_coef=z),
    "switch": lambda logits, z: ops.switch_gate(logits, None, z_loss_coef=z),
    "swipe": lambda logits, z: ops.swipe_gate(logits, 2, False, z),
    "expert_choice": lambda logits, z: ops.expert_choice_gate(logits, 2, 1.0, NUM_EXPERT, z),
}


@pytest.mark.parametrize("name", sorted(SOFTMAX_OPS))
def test_z_loss_on_every_softmax_gate(name):
    """The z-loss term equals coef * mean logsumexp(logits)^2 of the logits the softmax sees, and turning it on
    changes nothing else."""
    logits = linear(tokens("cpu", 29), params(28))
    without, with_z = SOFTMAX_OPS[name](logits, 0.0), SOFTMAX_OPS[name](logits, 0.25)
    assert without[3].shape == (0,)
    torch.testing.assert_close(with_z[3], 0.25 * ref.z_loss(logits), rtol=1e-12, atol=0)
    for a, b in zip(without[:3] + without[4:], with_z[:3] + with_z[4:], strict=True):
        assert torch.equal(a, b)


def test_gradcheck_of_every_op():
    """Finite differences agree with the analytic gradient of the scores and losses (fp64, fixed draws)."""
    logits = linear(tokens("cpu", 37, num_tokens=7), params(36)).detach().requires_grad_()
    x = tokens("cpu", 38, num_tokens=7).requires_grad_()
    for name, op, args in op_cases(logits, x):

        def fn(*inputs, op=op, args=args):
            torch.manual_seed(3)
            return tuple(t for t in op(*inputs, *args[len(inputs) :]) if t.is_floating_point() and t.numel())

        inputs = (x,) if name == "switch_jitter" else (args[0], args[1]) if name == "noisy" else (logits,)
        if name == "gate_capacity":
            inputs = (args[0], leaf(args[1]))
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7), name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_op_on_zero_tokens(device, training):
    logits = torch.zeros(0, NUM_EXPERT, dtype=torch.float64, device=device, requires_grad=True)
    for name, op, args in op_cases(logits, torch.zeros(0, D_MODEL, dtype=torch.float64, device=device)):
        args = tuple(training if a is True else a for a in args) if name in ("gshard", "swipe", "sigmoid") else args
        outputs = op(*args)
        if name == "switch_jitter":
            assert outputs.shape == (0, D_MODEL)
            continue
        assert outputs[0].shape[0] == 0 and outputs[0].dtype == torch.int64 and outputs[1].shape == outputs[0].shape
        total = outputs[1].sum()
        for term in outputs[2:4]:
            assert torch.isfinite(term).all()
            total = total + term.sum()
        total.backward()


def test_every_op_on_meta():
    """Shapes and dtypes from the arguments alone: the Meta device runs every op (T = 9, E = 6)."""
    logits, x = torch.empty(9, NUM_EXPERT, device="meta"), torch.empty(9, D_MODEL, device="meta")
    for name, op, args in op_cases(logits, x):
        if name == "gate_capacity":
            args = (torch.empty(9, 2, dtype=torch.int64, device="meta"), torch.empty(9, 2, device="meta"), *args[2:])
        outputs = op(*args)
        if name == "switch_jitter":
            assert outputs.shape == (9, D_MODEL) and outputs.device.type == "meta"
            continue
        width = {"expert_choice": 3, "switch": 1}.get(name, 2)
        assert outputs[0].shape == outputs[1].shape == (9, width) and outputs[0].dtype == torch.int64, name
        assert outputs[-1].device.type == "meta"


def test_opcheck_of_every_op():
    """Schema, autograd registration and fake-tensor checks. (opcheck's AOT-dispatch check fails in its own
    harness on an int64 first output, as for route_topk; test_compiled_gate_ops_equal_eager covers AOT dispatch.)"""
    logits = linear(tokens("cpu", 43), params(42)).detach().requires_grad_()
    for name, op, args in op_cases(logits, tokens("cpu", 44).requires_grad_()):
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
        results = opcheck(op.default, args, test_utils=utils)
        assert all(value == "SUCCESS" for value in results.values()), (name, results)


@pytest.mark.parametrize("name", ["naive", "gshard", "sigmoid"])
def test_compiled_gate_ops_equal_eager(name):
    """Under torch.compile(aot_eager, dynamic=True), for two token counts, a gate op gives eager mode's routing,
    losses and gradients (eval mode: no random draws)."""
    torch._dynamo.reset()
    bias = torch.zeros(NUM_EXPERT, dtype=torch.float64)
    route = {
        "naive": lambda logits: ops.naive_gate(logits, 2, 0.1, 0.1),
        "gshard": lambda logits: ops.gshard_gate(logits, False, 0.8, True, 1.0, 0.1),
        "sigmoid": lambda logits: ops.sigmoid_gate(logits, bias, 2, 2, 1, True, 1.0, 0.2),
    }[name]

    def loss_fn(logits, weights):
        idx, score, balance, z_loss, *_ = route(logits)
        return (score * weights).sum() + sum(loss_terms(balance, z_loss).values()), idx

    compiled = torch.compile(loss_fn, backend="aot_eager", dynamic=True, fullgraph=True)
    for num_tokens in (9, 14):
        logits = linear(tokens("cpu", num_tokens, num_tokens=num_tokens), params(45))
        weights = torch.randn(num_tokens, 2, generator=make_generator(num_tokens), dtype=torch.float64)
        eager_in, compiled_in = leaf(logits), leaf(logits)
        (eager_loss, eager_idx), (compiled_loss, compiled_idx) = (
            loss_fn(eager_in, weights),
            compiled(compiled_in, weights),
        )
        eager_loss.backward()
        compiled_loss.backward()
        assert torch.equal(compiled_idx, eager_idx)
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=0, atol=1e-14)
        torch.testing.assert_close(compiled_in.grad, eager_in.grad, rtol=0, atol=1e-14)


def test_ops_name_bad_arguments():
    logits = torch.randn(4, NUM_EXPERT)
    cases = [
        (lambda: ops.naive_gate(logits, 7), ValueError, ("k", "7")),
        (lambda: ops.naive_gate(logits, 2, -1.0), ValueError, ("balance_coef", "-1.0")),
        (lambda: ops.noisy_gate(logits, torch.randn(4, 3), 2), RuntimeError, ("noise_logits", "[4, 3]")),
        (lambda: ops.gshard_gate(torch.randn(4, 1), True, None), ValueError, ("2 expert columns", "[4, 1]")),
        (lambda: ops.gshard_gate(logits, True, 0.0), ValueError, ("capacity_factor", "0.0")),
        (lambda: ops.switch_jitter(logits, 1.0), ValueError, ("switch_eps", "1.0")),
        (lambda: ops.expert_choice_gate(logits, 2, 1.0, 7), ValueError, ("slots_per_token", "7")),
        (lambda: ops.sigmoid_gate(logits, torch.zeros(5), 2), RuntimeError, ("expert_bias", "[5]")),
        (lambda: ops.sigmoid_gate(logits, torch.zeros(6), 2, 4), ValueError, ("n_groups", "4")),
        (
            lambda: ops.gate_capacity(torch.zeros(4, 2, dtype=torch.int64), logits, 1.0, 6),
            RuntimeError,
            ("topk_score", "[4, 6]"),
        ),
        (
            lambda: ops.gate_capacity(torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 2), 1.0, 6, None, None, 1),
            ValueError,
            ("group_offset", "1"),
        ),
        (lambda: ops.naive_gate(logits.long(), 2), RuntimeError, ("logits", "Long")),
    ]
    for call, exc, needle in cases:
        with pytest.raises(exc, match=mentions(*needle)):
            call()


# ----------------------------------------------------------------------------------------------- gate classes


def make_gate(cls, seed=0, device="cpu", num_expert=NUM_EXPERT, world_size=1, **kwargs):
    gate = cls(D_MODEL, num_expert, world_size, TOP_K.get(cls, 2), **kwargs).double()
    gen = make_generator(seed)
    with torch.no_grad():
        for param in gate.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64).mul_(0.7))
    return gate.to(device)


def expected_routing(gate, x):
    """The op a gate must call, on the logits its parameters give: what the class's forward may add is nothing."""
    if isinstance(gate, NoisyGate):
        noise = x @ gate.w_noise if gate.training else None
        args = (gate.top_k, gate.noise_epsilon, gate.w_importance, gate.w_load, gate.z_loss_coef)
        return ops.noisy_gate(x @ gate.w_gate, noise, *args)
    if isinstance(gate, SigmoidGate):
        g = gate
        args = (g.top_k, g.n_groups, g.topk_groups, g.normalize, g.routed_scaling_factor, g.aux_loss_coef, g.training)
        return ops.sigmoid_gate(g.gate(x), g.expert_bias.clone(), *args, g.bias_update_rate)
    if isinstance(gate, SwitchGate):
        jittered = ops.switch_jitter(x, gate.switch_eps) if gate.training and gate.switch_eps > 0 else x
        return ops.switch_gate(gate.gate(jittered), gate.capacity_factor(), gate.aux_loss_coef, gate.z_loss_coef)
    logits = gate.gate(x)
    if isinstance(gate, GShardGate):
        args = (gate.capacity_factor(), gate.random_routing, gate.aux_loss_coef, gate.z_loss_coef)
        return ops.gshard_gate(logits, gate.training, *args)
    if isinstance(gate, SwipeGate):
        return ops.swipe_gate(logits, gate.top_k, gate.training, gate.z_loss_coef)
    if isinstance(gate, ExpertChoiceGate):
        return ops.expert_choice_gate(logits, gate.top_k, gate.capacity_factor, gate.slots_per_token, gate.z_loss_coef)
    return ops.naive_gate(logits, gate.top_k, gate.balance_coef, gate.z_loss_coef)


CLASS_CASES = [
    (NaiveGate, {"balance_coef": 0.05, "z_loss_coef": 0.1}),
    (NoisyGate, {"z_loss_coef": 0.1}),
    (GShardGate, {"capacity": (0.8, 1.0), "z_loss_coef": 0.1}),
    (SwitchGate, {"capacity": (0.8, 1.0)}),
    (SwipeGate, {}),
    (ExpertChoiceGate, {"max_experts_per_token": 2}),
    (SigmoidGate, {"n_groups": 2, "aux_loss_coef": 0.2, "bias_update_rate": 0.01}),
    (DCGate, {"capacity": (0.8, 1.0)}),  # world_size 1: GShardGate's op
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("cls", "kwargs"), CLASS_CASES, ids=[c[0].__name__ for c in CLASS_CASES])
def test_gate_forward_is_its_op_on_its_logits(cls, kwargs, training):
    """Bitwise: the same op on the same logits with the same seed. The losses and the drop count are the op's
    (None where it has none), and SigmoidGate adds the op's bias update to its buffer."""
    gate = make_gate(cls, 46, **kwargs).train(training)
    x = tokens("cpu", 47, num_tokens=20)
    torch.manual_seed(5)
    want = expected_routing(gate, x)
    bias_before = gate.expert_bias.clone() if cls is SigmoidGate else None
    torch.manual_seed(5)
    idx, score = gate(x.reshape(4, 5, D_MODEL))  # [..., d_model] inputs are flattened to tokens
    assert torch.equal(idx, want[0]) and torch.equal(score, want[1])
    losses = gate.get_losses()
    assert set(losses) == set(loss_terms(*want[2:4]))
    for name, term in loss_terms(*want[2:4]).items():
        assert torch.equal(losses[name], term)
    assert (gate.num_dropped is None) == (want[4].dim() == 1)
    if gate.num_dropped is not None:
        assert torch.equal(gate.num_dropped, want[4])
    if cls is SigmoidGate:
        update = want[5] if training else torch.zeros(NUM_EXPERT)
        assert torch.equal(gate.expert_bias, bias_before + update) and gate.expert_bias.dtype == torch.float32


@pytest.mark.parametrize(
    "cls", [NaiveGate, GShardGate, SwitchGate, SwipeGate, ExpertChoiceGate], ids=lambda c: c.__name__
)
def test_return_all_scores_gives_the_logits(cls):
    gate = make_gate(cls, 48).eval()
    x = tokens("cpu", 49)
    idx, score, logits = gate(x, return_all_scores=True)
    assert torch.equal(logits, gate.gate(x)) and torch.equal(idx, gate(x)[0])


def test_gshard_loss_uses_the_global_expert_count():
    """Uniform probabilities and every first choice on expert 0: E^2 * mean(f m) = 1 with the global
    E = num_expert * world_size = 4 (FastMoE's local num_expert**2 would give 0.25)."""
    gate = GShardGate(D_MODEL, 2, 2, 2, capacity=None).double()
    with torch.no_grad():
        gate.gate.weight.zero_()
        gate.gate.bias.zero_()
    idx, _ = gate(tokens("cpu"))
    assert (idx[:, 0] == 0).all()
    torch.testing.assert_close(gate.get_loss(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-14)


def test_noisy_gate_eval_does_not_use_the_noise_weights():
    for training in (False, True):
        gate = NoisyGate(D_MODEL, NUM_EXPERT, 1, 2).double().train(training)
        gate(tokens("cpu"))
        gate.get_loss().backward()
        assert torch.isfinite(gate.w_gate.grad).all() and (gate.w_noise.grad is None) == (not training)


def test_sigmoid_bias_stays_fp32_and_is_no_parameter():
    gate = SigmoidGate(D_MODEL, NUM_EXPERT, 1, 2, bias_update_rate=1e-3)
    gate.to(torch.bfloat16)
    assert gate.gate.weight.dtype == torch.bfloat16 and gate.expert_bias.dtype == torch.float32
    gate(torch.randn(8, D_MODEL, dtype=torch.bfloat16))
    assert gate.expert_bias.dtype == torch.float32 and (gate.expert_bias.abs() == 1e-3).all()
    gate.double()
    assert gate.expert_bias.dtype == torch.float32 and (gate.expert_bias.abs() == 1e-3).all()
    assert gate.state_dict()["expert_bias"].dtype == torch.float32
    assert "expert_bias" not in dict(gate.named_parameters()) and not gate.expert_bias.requires_grad


def test_losses_api():
    gate = make_gate(GShardGate, 30, capacity=None, z_loss_coef=0.5)
    gate(tokens("cpu"))
    losses = gate.get_losses()
    assert set(losses) == {"balance", "z"} and gate.has_loss
    # Two terms: one addition, the same in either order, so exact.
    torch.testing.assert_close(gate.loss, losses["balance"] + losses["z"], rtol=0, atol=0)
    assert gate.get_loss() is not None and gate.get_loss() is None  # the first call clears
    gate.set_loss(torch.tensor(2.0))
    assert gate.get_losses() == {"loss": torch.tensor(2.0)}
    gate.reset_stats()
    assert gate.loss is None and gate.num_dropped is None
    naive = make_gate(NaiveGate)
    naive(tokens("cpu"))
    assert naive.get_loss() is None and naive.get_losses() == {} and not naive.has_loss


@pytest.mark.parametrize("cls", GATES, ids=lambda c: c.__name__)
def test_gates_route_over_global_experts(cls):
    """world_size > 1: the gate routes over num_expert * world_size experts (ids up to 2 * 3 - 1)."""
    gate = cls(D_MODEL, 3, 2, TOP_K.get(cls, 2))
    assert gate.tot_expert == 6 and 6 in (gate.w_gate if cls is NoisyGate else gate.gate.weight).shape
    idx, _ = gate.eval()(torch.randn(40, D_MODEL))
    assert idx.max().item() <= 5 and idx.min().item() >= -1


@pytest.mark.parametrize("cls", GATES, ids=lambda c: c.__name__)
def test_gates_are_deterministic_in_eval(cls):
    gate = make_gate(cls, 32).eval()
    x = tokens("cpu", 33, num_tokens=40)
    a, b = gate(x), gate(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_zero_gate_routes_everything_to_expert_zero():
    gate = ZeroGate(D_MODEL, NUM_EXPERT, 1, 3)
    idx, score = gate(torch.randn(2, 4, D_MODEL, dtype=torch.float64))
    assert torch.equal(idx, torch.zeros(8, 3, dtype=torch.int64)) and score.dtype == torch.float64
    assert torch.equal(score, torch.full((8, 3), 1 / 3, dtype=torch.float64)) and gate.get_loss() is None


# ----------------------------------------------------------------------------------------------- in FMoE


@pytest.mark.parametrize("cls", GATES, ids=lambda c: c.__name__)
def test_every_gate_runs_in_fmoe(cls):
    """FMoE builds each gate as gate(d_model, num_expert, world_size, top_k); forward + backward + get_loss."""
    torch.manual_seed(0)
    layer = FMoETransformerMLP(num_expert=4, d_model=8, d_hidden=6, top_k=TOP_K.get(cls, 2), gate=cls).double()
    assert type(layer.gate) is cls
    x = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    aux = layer.get_loss()
    assert aux.dim() == 0
    (y.square().mean() + aux).backward()
    assert torch.isfinite(x.grad).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.gate.parameters())


def test_fmoe_gate_extra_arguments_through_partial():
    gate = functools.partial(SigmoidGate, n_groups=2, topk_groups=1, bias_update_rate=0.0)
    layer = FMoE(4, 8, top_k=2, gate=gate, expert=lambda d: nn.Linear(d, d)).double()
    assert layer.gate.n_groups == 2
    idx, _ = layer.gate(torch.randn(10, 8, dtype=torch.float64))
    assert ((idx // 2)[:, 0] == (idx // 2)[:, 1]).all()  # both experts from the one kept group


# every gate with its defaults, and the naive gate with both of its optional losses
SYNC_CASES = [(cls, {}) for cls in GATES] + [(NaiveGate, {"balance_coef": 0.01, "z_loss_coef": 1e-3})]


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or "")
@pytest.mark.parametrize(("cls", "kwargs"), SYNC_CASES, ids=lambda c: getattr(c, "__name__", None) or str(c))
def test_gate_forward_has_no_host_sync_on_cuda(cls, kwargs):
    gate = cls(64, 8, 1, TOP_K.get(cls, 2), **kwargs).cuda().train()
    x = torch.randn(256, 64, device="cuda")
    gate(x)  # warm-up (lazy initialisation may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gate(x)
        gate.eval()
        gate(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or "")
def test_transformer_mlp_training_step_has_no_host_sync_on_cuda():
    """Forward, balance loss and backward of the layer fastmoe-train uses, under bf16 autocast: a host sync in
    any of them stalls the GPU once per layer and step."""
    gate = functools.partial(NaiveGate, balance_coef=0.01)
    layer = FMoETransformerMLP(8, d_model=64, d_hidden=128, top_k=2, gate=gate).cuda()
    x = torch.randn(256, 64, device="cuda", requires_grad=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        (y.float().square().mean() + layer.get_loss()).backward()

    step()  # warm-up (lazy initialisation may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


# ----------------------------------------------------------------------------------------------- bad input


def _bad(cls, **kwargs):
    def build():
        args = dict(d_model=D_MODEL, num_expert=NUM_EXPERT, world_size=1, top_k=TOP_K.get(cls, 2))
        args.update(kwargs)
        return cls(**args)

    return build


BAD_CONSTRUCTIONS = [
    ("naive-z", _bad(NaiveGate, z_loss_coef=-1.0), ValueError, ("z_loss_coef", "-1.0")),
    ("naive-balance", _bad(NaiveGate, balance_coef=-0.1), ValueError, ("balance_coef", "-0.1")),
    ("naive-balance-type", _bad(NaiveGate, balance_coef="0.1"), TypeError, ("balance_coef", "'0.1'")),
    ("noisy-eps", _bad(NoisyGate, noise_epsilon=0.0), ValueError, ("noise_epsilon", "0.0")),
    ("noisy-w-load", _bad(NoisyGate, w_load=float("nan")), ValueError, ("w_load", "nan")),
    ("noisy-top-k", _bad(NoisyGate, top_k=7), ValueError, ("top_k", "7")),
    ("gshard-top-k", _bad(GShardGate, top_k=3), ValueError, ("top_k", "3")),
    ("gshard-topk-both", _bad(GShardGate, top_k=2, topk=3), ValueError, ("topk=3", "top_k=2")),
    ("gshard-capacity", _bad(GShardGate, capacity=(1.2, 0.0)), ValueError, ("capacity", "(1.2, 0.0)")),
    ("gshard-capacity-len", _bad(GShardGate, capacity=(1.0, 2.0, 3.0)), ValueError, ("capacity", "3.0")),
    ("gshard-random", _bad(GShardGate, random_routing="yes"), TypeError, ("random_routing", "yes")),
    ("gshard-aux", _bad(GShardGate, aux_loss_coef=-0.5), ValueError, ("aux_loss_coef", "-0.5")),
    ("dc-group", _bad(DCGate, moe_group="group"), TypeError, ("moe_group", "group")),
    ("switch-top-k", _bad(SwitchGate, top_k=2), ValueError, ("top_k", "2")),
    ("switch-eps", _bad(SwitchGate, switch_eps=1.5), ValueError, ("switch_eps", "1.5")),
    ("switch-capacity", _bad(SwitchGate, capacity=-1), ValueError, ("capacity", "-1")),
    ("ec-factor", _bad(ExpertChoiceGate, capacity_factor=0), ValueError, ("capacity_factor", "0.0")),
    ("ec-max", _bad(ExpertChoiceGate, max_experts_per_token=7), ValueError, ("max_experts_per_token", "7")),
    ("sigmoid-groups", _bad(SigmoidGate, n_groups=4), ValueError, ("n_groups", "4")),
    ("sigmoid-topk-groups", _bad(SigmoidGate, n_groups=2, topk_groups=3), ValueError, ("topk_groups", "3")),
    ("sigmoid-top-k-groups", _bad(SigmoidGate, n_groups=6, topk_groups=1, top_k=2), ValueError, ("top_k", "2")),
    ("sigmoid-scale", _bad(SigmoidGate, routed_scaling_factor=0.0), ValueError, ("routed_scaling_factor", "0.0")),
    ("sigmoid-rate", _bad(SigmoidGate, bias_update_rate=-1e-3), ValueError, ("bias_update_rate", "-0.001")),
    ("sigmoid-normalize", _bad(SigmoidGate, normalize=None), TypeError, ("normalize", "None")),
    ("swipe-d", _bad(SwipeGate, d_model=0), ValueError, ("d_model", "0")),
    ("world-size", _bad(SigmoidGate, world_size=0), ValueError, ("world_size", "0")),
]


@pytest.mark.parametrize("build,exc,needle", [c[1:] for c in BAD_CONSTRUCTIONS], ids=[c[0] for c in BAD_CONSTRUCTIONS])
def test_constructor_rejects_bad_arguments(build, exc, needle):
    with pytest.raises(exc, match=mentions(*needle)):
        build()


@pytest.mark.parametrize("cls", GATES, ids=lambda c: c.__name__)
def test_forward_rejects_bad_input(cls):
    gate = cls(D_MODEL, NUM_EXPERT, 1, TOP_K.get(cls, 2))
    with pytest.raises(ValueError, match=mentions("inp", "(3, 4)")):
        gate(torch.randn(3, 4))
    with pytest.raises(TypeError, match=mentions("inp", "torch.int64")):
        gate(torch.ones(3, D_MODEL, dtype=torch.int64))
    with pytest.raises(TypeError, match=mentions("inp", "torch.float64")):
        gate(torch.randn(3, D_MODEL, dtype=torch.float64))


def test_gates_list_and_base():
    assert {cls.__name__ for cls in GATES} == {
        "NaiveGate",
        "NoisyGate",
        "GShardGate",
        "SwitchGate",
        "SwipeGate",
        "ExpertChoiceGate",
        "SigmoidGate",
    }
    assert all(issubclass(cls, BaseGate) and "arXiv" in cls.__doc__ for cls in GATES)
