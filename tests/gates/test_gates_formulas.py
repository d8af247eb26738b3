"""Every gate of fastmoe.gates against a plain-PyTorch transcription of its paper (tests/gates/gate_reference.py)
on fixed fp64 inputs: indices, scores, loss terms and the gradients of the input and of every parameter; plus the
capacity rule, the z-loss, the bias balancing rule, the constructors' errors, world_size > 1 and FMoE."""

import functools
import math

import gate_reference as ref
import pytest
import torch
from torch import nn

from conftest import CUDA_SKIP_REASON, make_generator, mentions, randn
from fastmoe import FMoE, FMoETransformerMLP, ops
from fastmoe.gates import (
    GATES,
    BaseGate,
    ExpertChoiceGate,
    GShardGate,
    NaiveGate,
    NoisyGate,
    SigmoidGate,
    SwipeGate,
    SwitchGate,
)

D_MODEL, NUM_EXPERT, NUM_TOKENS = 5, 6, 12  # d not a multiple of 8 on purpose
ATOL = 1e-12
RTOL = 1e-10
TOP_K = {SwitchGate: 1}  # every other gate runs top-2 here


def randomize_(gate: nn.Module, seed: int, scale: float = 0.7) -> nn.Module:
    gen = make_generator(seed)
    with torch.no_grad():
        for param in gate.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64).mul_(scale))
    return gate


def make_gate(cls, seed=0, device="cpu", num_expert=NUM_EXPERT, world_size=1, **kwargs):
    gate = cls(D_MODEL, num_expert, world_size, TOP_K.get(cls, 2), **kwargs)
    return randomize_(gate.double(), seed).to(device)


def leaves(gate: nn.Module) -> dict:
    """CPU leaf copies of the gate's parameters, by name."""
    return {name: p.detach().cpu().clone().requires_grad_() for name, p in gate.named_parameters()}


def objective(score, losses, seed=123):
    """A scalar that uses every score with a distinct weight plus every loss term."""
    weight = torch.randn(score.shape, generator=make_generator(seed), dtype=torch.float64).to(score.device)
    total = (score * weight).sum()
    for loss in losses.values():
        total = total + loss
    return total


def run_gate(gate, x, seed=7):
    """(idx, score, losses, grads {input, parameter names}) of one forward with torch seeded by ``seed``."""
    xg = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    idx, score = gate(xg)
    losses = gate.get_losses()
    names = [name for name, _ in gate.named_parameters()]
    params = [p for _, p in gate.named_parameters()]
    grads = torch.autograd.grad(objective(score, losses), [xg] + params, allow_unused=True, materialize_grads=True)
    return idx, score, losses, dict(zip(["input"] + names, grads, strict=True))


def run_reference(fn, x, params: dict, *args, **kwargs):
    xr = x.detach().cpu().clone().requires_grad_()
    idx, score, losses, *_ = fn(xr, *args, **kwargs)
    names = list(params)
    grads = torch.autograd.grad(
        objective(score, losses), [xr] + [params[n] for n in names], allow_unused=True, materialize_grads=True
    )
    return idx, score, losses, dict(zip(["input"] + names, grads, strict=True))


def assert_matches(got, want):
    idx, score, losses, grads = got
    ridx, rscore, rlosses, rgrads = want
    assert idx.dtype == torch.int64 and idx.shape == ridx.shape, (idx.shape, ridx.shape)
    # Ids are exact, though the two sides compute their fp64 logits and scores with different ops (rounding that
    # varies by CPU): a comparison could only flip at a near-tie, and these seeded inputs keep every decision
    # apart by far more than rounding (they still pass with the reference's input moved by 1e-13 relative).
    assert torch.equal(idx.cpu(), ridx), f"topk_idx differs:\n{idx.cpu()}\nvs reference\n{ridx}"
    torch.testing.assert_close(score.detach().cpu(), rscore.detach(), rtol=RTOL, atol=ATOL)
    assert set(losses) == set(rlosses), (set(losses), set(rlosses))
    for name in losses:
        torch.testing.assert_close(losses[name].detach().cpu(), rlosses[name].detach(), rtol=RTOL, atol=ATOL)
    for name, g in grads.items():
        torch.testing.assert_close(
            g.cpu(), rgrads[name], rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"grad of {name}: {m}"
        )


def tokens(device, seed=1, num_tokens=NUM_TOKENS):
    return randn(num_tokens, D_MODEL, gen=make_generator(seed), device=device)


# ----------------------------------------------------------------------------------------------- NaiveGate


def test_naive_gate_z_loss_matches_formula(device):
    gate = make_gate(NaiveGate, device=device, z_loss_coef=0.3)
    x = tokens(device)
    p = leaves(gate)

    def naive(xr):
        logits = xr @ p["gate.weight"].t() + p["gate.bias"]
        idx = ref.topk_rows(logits, 2)
        return idx, ref.softmax_rows(logits.gather(1, idx)), {"z": 0.3 * ref.z_loss(logits)}

    assert_matches(run_gate(gate, x), run_reference(naive, x, p))


def test_naive_gate_balance_loss_matches_formula(device):
    gate = skewed_(make_gate(NaiveGate, device=device, balance_coef=0.05, z_loss_coef=0.3), amount=1.0)
    x = tokens(device)
    p = leaves(gate)

    def naive(xr):
        logits = xr @ p["gate.weight"].t() + p["gate.bias"]
        idx = ref.topk_rows(logits, 2)
        losses = {"balance": ref.naive_balance_loss(logits, idx, 0.05), "z": 0.3 * ref.z_loss(logits)}
        return idx, ref.softmax_rows(logits.gather(1, idx)), losses

    got = run_gate(gate, x)
    assert set(got[2]) == {"balance", "z"}
    assert_matches(got, run_reference(naive, x, p))


def test_naive_gate_balance_loss_is_coef_when_uniform_and_grows_with_skew():
    """Uniform probabilities and an even load give exactly coef; every slot on 2 of E experts with those experts
    holding most of the probability gives more."""
    num_expert, coef = 4, 0.01
    gate = NaiveGate(D_MODEL, num_expert, 1, 2, balance_coef=coef).double()
    with torch.no_grad():
        gate.gate.weight.zero_()
        gate.gate.bias.zero_()
    gate(tokens("cpu"))  # ties: every token on experts 0 and 1, but P is uniform
    torch.testing.assert_close(gate.get_loss(), torch.tensor(coef, dtype=torch.float64), rtol=0, atol=1e-15)
    with torch.no_grad():
        gate.gate.bias[:2] = 3.0
    gate(tokens("cpu"))
    assert gate.get_loss().item() > 1.5 * coef


def test_slot_balance_term_skips_unrouted_slots():
    """-1 slots (dropped by a capacity) count for no expert and are left out of the slot total."""
    from fastmoe.gates.base_gate import slot_balance_term

    logits = torch.randn(5, 4, dtype=torch.float64, generator=make_generator(3))
    idx = torch.tensor([[0, 1], [2, -1], [0, 3], [-1, -1], [1, 0]])
    routed = [e for e in idx.flatten().tolist() if e >= 0]
    f = torch.tensor([routed.count(e) / len(routed) for e in range(4)], dtype=torch.float64)
    want = 4 * (f * ref.softmax_rows(logits).mean(0)).sum()
    torch.testing.assert_close(slot_balance_term(logits, idx), want, rtol=1e-14, atol=0)
    everything_dropped = slot_balance_term(logits, torch.full((5, 2), -1))
    assert everything_dropped.item() == 0.0


def test_naive_gate_has_no_loss_by_default():
    gate = make_gate(NaiveGate)
    gate(tokens("cpu"))
    assert gate.get_loss() is None and gate.get_losses() == {} and not gate.has_loss


# ----------------------------------------------------------------------------------------------- NoisyGate


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_noisy_gate_training_matches_paper(device, top_k):
    gate = NoisyGate(D_MODEL, NUM_EXPERT, 1, top_k, w_importance=0.4, w_load=0.9)
    gate = randomize_(gate.double(), 2).to(device).train()
    x = tokens(device, 3)
    p = leaves(gate)
    torch.manual_seed(7)
    noise = torch.randn(NUM_TOKENS, NUM_EXPERT, dtype=torch.float64, device=device).cpu()
    got = run_gate(gate, x, seed=7)
    want = run_reference(ref.noisy_gate, x, p, p["w_gate"], p["w_noise"], top_k, noise, 1e-2, 0.4, 0.9)
    assert_matches(got, want)
    assert got[0].shape == (NUM_TOKENS, top_k)  # [T, k], not FastMoE's flattened indices
    assert got[3]["w_noise"].abs().sum() > 0  # the load estimator trains the noise weights


def test_noisy_gate_eval_has_no_noise_and_counts_the_load(device):
    gate = randomize_(NoisyGate(D_MODEL, NUM_EXPERT, 1, 2).double(), 4).to(device).eval()
    x = tokens(device, 5)
    p = leaves(gate)
    got = run_gate(gate, x)
    assert_matches(got, run_reference(ref.noisy_gate, x, p, p["w_gate"], p["w_noise"], 2, None))
    again = gate(x)
    assert torch.equal(again[0], got[0]) and torch.equal(again[1].detach(), got[1].detach())


def test_noisy_gate_fresh_weights_give_finite_losses(device):
    """Zero-initialised weights: eval has no noise at all (FastMoE divided by zero there); training is noise."""
    for training in (False, True):
        gate = NoisyGate(D_MODEL, NUM_EXPERT, 1, 2).double().to(device).train(training)
        x = tokens(device).requires_grad_()
        _, score = gate(x)
        loss = gate.get_loss()
        assert torch.isfinite(loss) and torch.isfinite(score).all()
        loss.backward()
        assert torch.isfinite(gate.w_gate.grad).all()
        assert (gate.w_noise.grad is None) == (not training)  # eval does not use the noise weights


def test_noisy_gate_k_equals_num_experts():
    gate = randomize_(NoisyGate(D_MODEL, 3, 1, 3).double(), 6)
    x = tokens("cpu")
    p = leaves(gate)
    torch.manual_seed(7)
    noise = torch.randn(NUM_TOKENS, 3, dtype=torch.float64)
    got = run_gate(gate, x, seed=7)
    assert_matches(got, run_reference(ref.noisy_gate, x, p, p["w_gate"], p["w_noise"], 3, noise))


def test_noisy_gate_single_expert_loss_is_zero_on_device(device):
    gate = randomize_(NoisyGate(D_MODEL, 1, 1, 1).double(), 6).to(device)
    gate(tokens(device))
    loss = gate.get_loss()
    assert loss.device.type == torch.device(device).type and loss.item() == 0.0


# ----------------------------------------------------------------------------------------------- GShardGate


def skewed_(gate, expert=0, amount=2.5):
    """Pushes most tokens to ``expert`` so capacity limits bite."""
    with torch.no_grad():
        gate.gate.bias[expert] += amount
    return gate


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("random_routing", [True, False], ids=["random", "no-random"])
def test_gshard_gate_matches_paper(device, training, random_routing):
    capacity = (0.8, 1.1)
    gate = skewed_(make_gate(GShardGate, 8, device, capacity=capacity, random_routing=random_routing, z_loss_coef=0.1))
    gate.train(training)
    x = tokens(device, 9, num_tokens=20)
    p = leaves(gate)
    uniform = None
    if training and random_routing:
        torch.manual_seed(7)
        uniform = torch.rand(20, dtype=torch.float64, device=device).cpu()
    factor = capacity[0] if training else capacity[1]
    cap = math.ceil(factor * 20 * 2 / NUM_EXPERT)

    def gshard(xr):
        idx, score, losses, logits = ref.gshard_gate(xr, p["gate.weight"], p["gate.bias"], uniform, cap)
        losses["z"] = 0.1 * ref.z_loss(logits)
        return idx, score, losses

    got = run_gate(gate, x, seed=7)
    assert_matches(got, run_reference(gshard, x, p))
    demand = ref.gshard_gate(x.cpu(), p["gate.weight"], p["gate.bias"], uniform, None)[0]
    assert gate.num_dropped.item() == int((demand >= 0).sum() - (got[0] >= 0).sum()) > 0  # capacity did drop


def test_gshard_loss_uses_the_global_expert_count():
    """Uniform probabilities and every first choice on expert 0: E^2 * mean(f m) = E^2 * (1/E)/E = 1 with the
    global E = num_expert * world_size = 4 (FastMoE's local num_expert**2 would give 0.25)."""
    gate = GShardGate(D_MODEL, 2, 2, 2, capacity=None).double()
    with torch.no_grad():
        gate.gate.weight.zero_()
        gate.gate.bias.zero_()
    idx, _ = gate(tokens("cpu"))
    assert (idx[:, 0] == 0).all()
    torch.testing.assert_close(gate.get_loss(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-14)


def test_gshard_random_routing_only_in_training():
    gate = make_gate(GShardGate, 3, capacity=None)
    x = tokens("cpu", 4, num_tokens=200)
    torch.manual_seed(0)
    train_idx, train_score = gate(x)
    assert (train_idx[:, 1] == -1).any() and (train_idx[:, 0] >= 0).all()
    assert (train_score[train_idx < 0] == 0).all()
    gate.eval()
    eval_idx, _ = gate(x)
    assert (eval_idx >= 0).all()


# ----------------------------------------------------------------------------------------------- SwitchGate


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_switch_gate_matches_paper(device, training):
    eps = 0.3
    gate = skewed_(make_gate(SwitchGate, 10, device, switch_eps=eps, capacity=(1.0, 1.5), aux_loss_coef=0.05))
    gate.train(training)
    x = tokens(device, 11, num_tokens=18)
    p = leaves(gate)
    jitter = None
    if training:
        torch.manual_seed(7)
        jitter = torch.empty(18, D_MODEL, dtype=torch.float64, device=device).uniform_(1 - eps, 1 + eps).cpu()
    cap = math.ceil((1.0 if training else 1.5) * 18 / NUM_EXPERT)
    got = run_gate(gate, x, seed=7)
    want = run_reference(ref.switch_gate, x, p, p["gate.weight"], p["gate.bias"], jitter, cap, 0.05)
    assert_matches(got, want)
    assert gate.num_dropped.item() > 0


def test_switch_jitter_multiplies_the_input():
    """A zero input row stays zero under multiplicative jitter, so its logits are the bias exactly (FastMoE's
    additive noise on the logits would move them)."""
    gate = make_gate(SwitchGate, 12, switch_eps=0.5, capacity=None).train()
    x = tokens("cpu", 13)
    x[3] = 0
    _, score, logits = gate(x, return_all_scores=True)
    assert torch.equal(logits[3], gate.gate.bias.detach())  # every product is +-0, so exact on any BLAS
    torch.manual_seed(1)
    _, _, logits_again = gate(x, return_all_scores=True)
    assert not torch.equal(logits_again, logits)  # the other rows are jittered


# ----------------------------------------------------------------------------------------------- SwipeGate


def test_swipe_gate_matches_documented_greedy(device):
    gate = skewed_(make_gate(SwipeGate, 14, device, z_loss_coef=0.2), expert=2, amount=3.0)
    x = tokens(device, 15, num_tokens=25)
    p = leaves(gate)

    def swipe(xr):
        idx, score, _, logits = ref.swipe_gate(xr, p["gate.weight"], p["gate.bias"], 2)
        return idx, score, {"z": 0.2 * ref.z_loss(logits)}

    got = run_gate(gate, x)
    assert_matches(got, run_reference(swipe, x, p))
    idx = got[0].cpu()
    capacity = math.ceil(25 * 2 / NUM_EXPERT)
    counts = torch.bincount(idx[idx >= 0], minlength=NUM_EXPERT)
    assert counts.max() <= capacity
    plain = ref.topk_rows(x.cpu() @ p["gate.weight"].detach().t() + p["gate.bias"].detach(), 2)
    assert torch.bincount(plain.reshape(-1), minlength=NUM_EXPERT).max() > capacity  # it had to rebalance
    assert ((idx >= 0).sum(1) >= 1).all()
    for row in idx.tolist():  # distinct experts per token
        kept = [e for e in row if e >= 0]
        assert len(set(kept)) == len(kept)


def test_swipe_gate_without_pressure_is_plain_topk():
    """One-hot tokens where token t prefers experts t, then t+1: every expert is wanted exactly twice, which is
    the capacity, so the balanced assignment must equal the plain top-k (indices and scores)."""
    gate = SwipeGate(NUM_EXPERT, NUM_EXPERT, 1, 2, gate_bias=False).double()
    with torch.no_grad():
        w = torch.zeros(NUM_EXPERT, NUM_EXPERT, dtype=torch.float64)
        for t in range(NUM_EXPERT):
            w[t, t] = 2.0
            w[(t + 1) % NUM_EXPERT, t] = 1.0
        gate.gate.weight.copy_(w)
    x = torch.eye(NUM_EXPERT, dtype=torch.float64)
    plain_idx, plain_score = NaiveGate.forward(gate, x)
    idx, score = gate(x)
    assert torch.equal(idx, plain_idx) and gate.num_dropped.item() == 0
    torch.testing.assert_close(score, plain_score, rtol=0, atol=1e-15)


def test_swipe_gate_eval_is_plain_topk():
    gate = skewed_(make_gate(SwipeGate, 18), amount=3.0).eval()
    x = tokens("cpu", 19, num_tokens=30)
    want_idx, want_score = NaiveGate.forward(gate, x)
    idx, score = gate(x)
    assert torch.equal(idx, want_idx) and torch.equal(score, want_score)
    assert gate.num_dropped.item() == 0


# ----------------------------------------------------------------------------------------------- ExpertChoiceGate


@pytest.mark.parametrize("max_experts", [None, 1, 2], ids=["uncapped", "cap1", "cap2"])
@pytest.mark.parametrize("capacity_factor", [1.0, 0.5])
def test_expert_choice_gate_matches_paper(device, max_experts, capacity_factor):
    gate = make_gate(ExpertChoiceGate, 20, device, capacity_factor=capacity_factor, max_experts_per_token=max_experts)
    x = tokens(device, 21, num_tokens=15)
    p = leaves(gate)
    got = run_gate(gate, x)
    want = run_reference(
        ref.expert_choice_gate, x, p, p["gate.weight"], p["gate.bias"], 2, capacity_factor, max_experts
    )
    assert_matches(got, want)
    width = NUM_EXPERT if max_experts is None else max_experts
    assert got[0].shape == (15, width) and gate.slots_per_token == width
    if max_experts is None:  # every expert processes exactly C tokens
        cap = min(15, math.ceil(capacity_factor * 15 * 2 / NUM_EXPERT))
        idx = got[0].cpu()
        assert torch.equal(torch.bincount(idx[idx >= 0], minlength=NUM_EXPERT), torch.full((NUM_EXPERT,), cap))
        assert gate.num_dropped.item() == 0


# ----------------------------------------------------------------------------------------------- SigmoidGate


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
    gate = make_gate(SigmoidGate, 22, device, **config).eval()
    with torch.no_grad():
        gate.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.5, -0.4, 0.1]))
    x = tokens(device, 23)
    p = leaves(gate)
    bias = gate.expert_bias.cpu()
    got = run_gate(gate, x)
    want = run_reference(ref.sigmoid_gate, x, p, p["gate.weight"], None, bias, 2, **config)
    assert_matches(got, want)


def test_sigmoid_bias_steers_selection_only():
    """The bias changes which experts are picked but never the weights' formula, and has no gradient."""
    gate = make_gate(SigmoidGate, 24).eval()
    x = tokens("cpu", 25)
    idx0, score0 = gate(x)
    with torch.no_grad():
        gate.expert_bias[idx0[0, 0]] = -10.0
    idx1, score1 = gate(x)
    assert idx1[0, 0] != idx0[0, 0]
    s = torch.sigmoid(gate.gate(x)).detach()
    picked = s.gather(1, idx1)
    torch.testing.assert_close(score1.detach(), picked / picked.sum(1, keepdim=True), rtol=0, atol=1e-15)
    assert "expert_bias" not in dict(gate.named_parameters()) and not gate.expert_bias.requires_grad


def test_sigmoid_bias_update_rule(device):
    gate = make_gate(SigmoidGate, 26, device, bias_update_rate=0.05).train()
    x = tokens(device, 27)
    before = gate.expert_bias.clone().cpu()
    idx, _ = gate(x)
    load = torch.bincount(idx.cpu().reshape(-1), minlength=NUM_EXPERT).double()
    want = before + 0.05 * torch.sign(NUM_TOKENS * 2 / NUM_EXPERT - load).float()
    assert torch.equal(gate.expert_bias.cpu(), want)  # rate * (-1, 0 or 1) is exact, then one fp32 add
    assert (want != 0).any()
    gate.eval()
    gate(x)
    assert torch.equal(gate.expert_bias.cpu(), want)  # no update in eval


def test_sigmoid_bias_stays_fp32():
    gate = SigmoidGate(D_MODEL, NUM_EXPERT, 1, 2, bias_update_rate=1e-3)
    gate.to(torch.bfloat16)
    assert gate.gate.weight.dtype == torch.bfloat16 and gate.expert_bias.dtype == torch.float32
    gate(torch.randn(8, D_MODEL, dtype=torch.bfloat16))
    assert gate.expert_bias.dtype == torch.float32 and (gate.expert_bias.abs() == 1e-3).all()
    gate.double()
    assert gate.expert_bias.dtype == torch.float32 and (gate.expert_bias.abs() == 1e-3).all()
    state = gate.state_dict()
    assert state["expert_bias"].dtype == torch.float32


# ----------------------------------------------------------------------------------------------- shared rules


SOFTMAX_GATES = [NaiveGate, NoisyGate, GShardGate, SwitchGate, SwipeGate, ExpertChoiceGate]


@pytest.mark.parametrize("cls", SOFTMAX_GATES, ids=lambda c: c.__name__)
def test_z_loss_on_every_softmax_gate(cls):
    """The z-loss term equals coef * mean logsumexp(logits)^2 of the logits the gate's softmax sees, and turning
    it on changes nothing else."""
    extra = {"capacity": None} if cls in (GShardGate, SwitchGate) else {}
    gate = make_gate(cls, 28, **extra).eval()
    x = tokens("cpu", 29)
    idx0, score0 = gate(x)
    base = gate.get_losses()
    gate.z_loss_coef = 0.25
    if cls is NoisyGate:
        logits = x @ gate.w_gate
    else:
        logits = gate.gate(x)
    idx1, score1 = gate(x)
    losses = gate.get_losses()
    assert torch.equal(idx0, idx1) and torch.equal(score0, score1)
    torch.testing.assert_close(losses.pop("z"), 0.25 * ref.z_loss(logits), rtol=1e-12, atol=0)
    assert set(losses) == set(base)


def test_get_loss_sums_the_terms():
    gate = make_gate(GShardGate, 30, capacity=None, z_loss_coef=0.5)
    gate(tokens("cpu"))
    losses = gate.get_losses()
    assert set(losses) == {"balance", "z"}
    # Two terms: one addition, the same in either order, so exact.
    torch.testing.assert_close(gate.get_loss(clear=False), losses["balance"] + losses["z"], rtol=0, atol=0)
    assert gate.get_loss() is not None and gate.get_loss() is None  # the first call clears


@pytest.mark.parametrize("cls", GATES, ids=lambda c: c.__name__)
def test_gates_route_over_global_experts(cls):
    """world_size > 1: the gate routes over num_expert * world_size experts (ids up to 2 * 3 - 1)."""
    gate = cls(D_MODEL, 3, 2, TOP_K.get(cls, 2))
    assert gate.tot_expert == 6
    linear = gate.w_gate if cls is NoisyGate else gate.gate.weight
    assert 6 in linear.shape
    gate.eval()
    idx, _ = gate(torch.randn(40, D_MODEL))
    assert idx.max().item() <= 5 and idx.min().item() >= -1


@pytest.mark.parametrize("cls", GATES, ids=lambda c: c.__name__)
def test_zero_tokens(cls, device):
    gate = make_gate(cls, 31, device)
    for training in (True, False):
        gate.train(training)
        x = torch.zeros(0, D_MODEL, dtype=torch.float64, device=device, requires_grad=True)
        idx, score = gate(x)
        width = getattr(gate, "slots_per_token", gate.top_k)
        assert idx.shape == (0, width) and score.shape == (0, width) and idx.dtype == torch.int64
        total = score.sum()
        for loss in gate.get_losses().values():
            assert torch.isfinite(loss)
            total = total + loss
        total.backward()


@pytest.mark.parametrize("cls", GATES, ids=lambda c: c.__name__)
def test_gates_are_deterministic_in_eval(cls):
    gate = make_gate(cls, 32).eval()
    x = tokens("cpu", 33, num_tokens=40)
    a, b = gate(x), gate(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("cls", [GShardGate, SwitchGate], ids=lambda c: c.__name__)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_capacity_keeps_the_highest_scored_assignments(cls, training, device):
    """Per expert: exactly min(capacity, demand) assignments survive and each beats every dropped one.

    Capacity only masks the routing, so the kept scores are bitwise those of the gate's own routing op before
    capacity. They are not bitwise torch.softmax's: route_topk's softmax and ATen's vectorised one round exp
    differently (which one wins depends on the CPU), so that comparison is within rounding."""
    extra = {"random_routing": False} if cls is GShardGate else {"switch_eps": 0.0}
    gate = skewed_(make_gate(cls, 34, device, capacity=(0.7, 0.9), **extra), amount=3.0).train(training)
    x = tokens(device, 35, num_tokens=60)
    k = gate.top_k
    if cls is GShardGate:
        want_idx, want_score = NaiveGate.forward(gate, x)  # the top-2 before capacity
    else:
        logits = gate.gate(x).detach()
        want_idx, want_score = ops.route_topk(logits, 1, "softmax_topk")
        torch_score, torch_idx = torch.softmax(logits, -1).max(-1, keepdim=True)
        assert torch.equal(want_idx, torch_idx)
        torch.testing.assert_close(want_score, torch_score, rtol=4 * torch.finfo(logits.dtype).eps, atol=0)
    idx, score = gate(x)
    cap = math.ceil((0.7 if training else 0.9) * 60 * k / NUM_EXPERT)
    for e in range(NUM_EXPERT):
        demand = want_score.detach()[want_idx == e]
        kept = (idx == e) & (want_idx == e)
        assert ((idx == e) == kept).all()
        kept_scores = want_score.detach()[kept]
        dropped_scores = want_score.detach()[(want_idx == e) & ~kept]
        assert kept_scores.numel() == min(cap, demand.numel())
        if dropped_scores.numel():
            assert kept_scores.min() >= dropped_scores.max()
    torch.testing.assert_close(score.detach(), torch.where(idx >= 0, want_score.detach(), 0.0), rtol=0, atol=0)
    assert gate.num_dropped.item() == int((want_idx >= 0).sum() - (idx >= 0).sum()) > 0


def test_gradcheck_of_every_gate():
    """Finite differences agree with the analytic gradient of the scores and losses (fp64, fixed draws)."""
    for cls in GATES:
        extra = {"z_loss_coef": 0.1} if cls in SOFTMAX_GATES else {"aux_loss_coef": 0.2, "bias_update_rate": 0.0}
        gate = make_gate(cls, 36, **extra)
        x = tokens("cpu", 37, num_tokens=7).requires_grad_()

        def fn(inp, gate=gate):
            torch.manual_seed(3)
            _, score = gate(inp)
            return (score,) + tuple(gate.get_losses().values())

        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7), cls.__name__


# ----------------------------------------------------------------------------------------------- in FMoE


@pytest.mark.parametrize("cls", GATES, ids=lambda c: c.__name__)
def test_every_gate_runs_in_fmoe(cls):
    """FMoE builds each gate as gate(d_model, num_expert, world_size, top_k); forward + backward + get_loss."""
    top_k = TOP_K.get(cls, 2)
    torch.manual_seed(0)
    layer = FMoETransformerMLP(num_expert=4, d_model=8, d_hidden=6, top_k=top_k, gate=cls).double()
    assert type(layer.gate) is cls
    x = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    aux = layer.get_loss()
    assert aux.dim() == 0
    (y.square().mean() + aux).backward()
    assert torch.isfinite(x.grad).all()
    gate_grads = [prm.grad for prm in layer.gate.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in gate_grads)


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
    ("noisy-eps", _bad(NoisyGate, noise_epsilon=0.0), ValueError, ("noise_epsilon", "0.0")),
    ("noisy-w-load", _bad(NoisyGate, w_load=float("nan")), ValueError, ("w_load", "nan")),
    ("noisy-top-k", _bad(NoisyGate, top_k=7), ValueError, ("top_k", "7")),
    ("gshard-top-k", _bad(GShardGate, top_k=3), ValueError, ("top_k", "3")),
    ("gshard-capacity", _bad(GShardGate, capacity=(1.2, 0.0)), ValueError, ("capacity", "(1.2, 0.0)")),
    ("gshard-capacity-len", _bad(GShardGate, capacity=(1.0, 2.0, 3.0)), ValueError, ("capacity", "3.0")),
    ("gshard-random", _bad(GShardGate, random_routing="yes"), TypeError, ("random_routing", "yes")),
    ("gshard-aux", _bad(GShardGate, aux_loss_coef=-0.5), ValueError, ("aux_loss_coef", "-0.5")),
    ("switch-top-k", _bad(SwitchGate, top_k=2), ValueError, ("top_k", "2")),
    ("switch-eps", _bad(SwitchGate, switch_eps=1.5), ValueError, ("switch_eps", "1.5")),
    ("switch-capacity", _bad(SwitchGate, capacity=-1), ValueError, ("capacity", "-1")),
    ("ec-factor", _bad(ExpertChoiceGate, capacity_factor=0), ValueError, ("capacity_factor", "0")),
    ("ec-max", _bad(ExpertChoiceGate, max_experts_per_token=7), ValueError, ("max_experts_per_token", "7")),
    ("sigmoid-groups", _bad(SigmoidGate, n_groups=4), ValueError, ("n_groups", "4")),
    ("sigmoid-topk-groups", _bad(SigmoidGate, n_groups=2, topk_groups=3), ValueError, ("topk_groups", "3")),
    (
        "sigmoid-top-k-groups",
        _bad(SigmoidGate, n_groups=6, topk_groups=1, top_k=2),
        ValueError,
        ("top_k", "2"),
    ),
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
