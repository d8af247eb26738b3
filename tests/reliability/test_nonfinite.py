"""NaN and Inf policy (docs/reliability.md): outside debug mode non-finite gate logits and expert outputs give a
defined result that stays in the rows of the tokens they belong to; in debug mode (fastmoe.set_debug(True) or
FASTMOE_DEBUG=1) the first one raises fastmoe.NonFiniteError naming the layer and the tensor."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastmoe
from conftest import assert_bitwise_equal
from fastmoe import ops

NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def debug_off():
    previous = fastmoe.set_debug(False)
    yield
    fastmoe.set_debug(previous)


def mlp(device, num_expert=4, d_model=6, top_k=2, seed=0, activation="gelu"):
    torch.manual_seed(seed)
    return fastmoe.FMoETransformerMLP(num_expert, d_model, 8, top_k=top_k, activation=activation).to(device)


def linear(d):
    return nn.Linear(d, d)


# ----------------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("score_fn", ["topk_softmax", "softmax_topk"])
def test_route_topk_nonfinite_rows(device, score_fn):
    """NaN ranks above every number and +Inf above every finite one (ties: lower id); a row holding a NaN or a
    selected +Inf gets NaN scores, as torch.softmax gives; -Inf ranks last and scores 0 next to a finite max; a
    row of -Inf only gets NaN scores. Other rows are bitwise what they are without the non-finite rows."""
    clean = torch.tensor([[1.0, 3.0, 0.5, 2.0]] * 5, device=device)
    logits = clean.clone()
    logits[0, 1] = NAN
    logits[1, 2] = INF
    logits[2, :2] = -INF
    logits[3] = -INF
    idx, score = ops.route_topk(logits, 3, score_fn)
    assert idx[0].tolist() == [1, 3, 0] and bool(score[0].isnan().all())
    assert idx[1].tolist() == [2, 1, 3] and bool(score[1].isnan().all())
    assert idx[2].tolist() == [3, 2, 0] and score[2, 2].item() == 0.0 and bool(score[2].isfinite().all())
    assert idx[3].tolist() == [0, 1, 2] and bool(score[3].isnan().all())
    clean_idx, clean_score = ops.route_topk(clean, 3, score_fn)
    assert_bitwise_equal(idx[4], clean_idx[4], "idx of the finite row")
    assert_bitwise_equal(score[4], clean_score[4], "score of the finite row")
    # Same as torch.softmax over the selected (topk_softmax) or all (softmax_topk) logits.
    expected = torch.softmax(logits[:3].gather(1, idx[:3]) if score_fn == "topk_softmax" else logits[:3], dim=-1)
    if score_fn == "softmax_topk":
        expected = expected.gather(1, idx[:3])
    torch.testing.assert_close(score[:3], expected, equal_nan=True)


def test_capacity_limit_drops_nan_first(device):
    """NaN scores rank below every number, -Inf included, so an over-full expert drops them first."""
    topk_idx = torch.zeros(4, 1, dtype=torch.int64, device=device)
    topk_score = torch.tensor([[NAN], [-INF], [0.5], [NAN]], device=device)
    kept, num_dropped = ops.capacity_limit(topk_idx, topk_score, torch.tensor([2], device=device))
    assert kept.flatten().tolist() == [-1, 0, 0, -1] and int(num_dropped) == 2


# ----------------------------------------------------------------------------------------------- layers


class RowwiseAffine(nn.Module):
    """An expert whose every output element is one multiply and one add of its own input element: IEEE-exact
    operations, so a row's result cannot depend on which other rows share the expert's block."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.scale + self.shift


def _layers(device):
    torch.manual_seed(0)
    return {
        # relu, not gelu: ATen computes the tail of a vectorised loop with scalar code that may round gelu, silu
        # or sigmoid differently, and a changed routing moves rows into or out of that tail
        "mlp": mlp(device, activation="relu"),
        "fmoe-rowwise": fastmoe.FMoE(4, 6, top_k=2, expert=RowwiseAffine).to(device),
        "fmoe-linear": fastmoe.FMoE(4, 6, top_k=2, expert=linear).to(device),
    }


@pytest.mark.parametrize("kind", ["mlp", "fmoe-rowwise", "fmoe-linear"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_nonfinite_input_stays_in_its_token(device, kind, value):
    """A non-finite input row poisons that token's output only. The bad token's new routing changes the other
    tokens' expert groups, so the others are bitwise unchanged only where no reduction's order depends on a
    group's size: fastmoe's fused experts in deterministic mode (the CPU's BLAS GEMMs round by their blocking,
    which follows the group sizes) and experts without reductions. Experts that are torch GEMMs (nn.Linear) keep
    the other tokens finite and equal within rounding; whether they are bitwise is the BLAS library's choice and
    differs between CPUs."""
    layer = _layers(device)[kind]
    x = torch.randn(7, 6, device=device)
    previous = fastmoe.use_deterministic(True)
    try:
        y_clean = layer(x)
        x_bad = x.clone()
        x_bad[3, 2] = value
        y = layer(x_bad)
    finally:
        fastmoe.use_deterministic(previous)
    assert not bool(y[3].isfinite().all()), "the poisoned token's output must show it"
    keep = [t for t in range(7) if t != 3]
    if kind == "fmoe-linear":
        assert bool(y[keep].isfinite().all())
        torch.testing.assert_close(y[keep], y_clean[keep])
    else:
        assert_bitwise_equal(y[keep], y_clean[keep], "outputs of the other tokens")


def test_nonfinite_expert_poisons_only_its_tokens(device):
    """A NaN in one expert's weights reaches exactly the tokens routed to that expert (a 0 score included:
    0 * NaN = NaN); the others are bitwise unchanged."""
    layer = mlp(device)
    x = torch.randn(16, 6, device=device)
    y_clean = layer(x)
    topk_idx, _ = layer.gate(x)
    with torch.no_grad():
        layer.experts.h4toh.weight[1, 0, 0] = NAN
    y = layer(x)
    routed = (topk_idx == 1).any(dim=1)
    assert bool(routed.any()) and not bool(routed.all()), "the seed must route some tokens to expert 1, not all"
    assert bool(y[routed].isnan().any(dim=1).all())
    assert_bitwise_equal(y[~routed], y_clean[~routed], "tokens not routed to the poisoned expert")


# ----------------------------------------------------------------------------------------------- debug mode


def test_debug_reports_nan_logits_with_the_layer_name(device):
    model = nn.Sequential(nn.Identity(), mlp(device))
    fastmoe.debug.name_modules(model)
    x = torch.randn(5, 6, device=device)
    x[2, 0] = NAN
    fastmoe.set_debug(True)
    with pytest.raises(fastmoe.NonFiniteError, match=r"NaiveGate '1\.gate': gate logits .* 4 NaN and 0 Inf"):
        model(x)


def test_debug_reports_nonfinite_expert_outputs(device):
    layer = mlp(device)
    with torch.no_grad():
        layer.experts.htoh4.weight[:, 0, 0] = INF  # every expert: h[:, 0] = +-Inf, then Inf - Inf or Inf * 0
    fastmoe.set_debug(True)
    with pytest.raises(fastmoe.NonFiniteError, match=r"FMoETransformerMLP: expert outputs \(y_sorted\)"):
        layer(torch.randn(5, 6, device=device))


def test_debug_reports_nonfinite_scores_and_bad_ids(device):
    class FixedGate(nn.Module):
        def __init__(self, idx, score):
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(1, device=device))
            self.idx, self.score = idx, score

        def forward(self, x):
            return self.idx, self.score

    idx = torch.tensor([[0, 1], [1, 0]], device=device)
    fastmoe.set_debug(True)
    score = torch.tensor([[0.5, NAN], [0.5, 0.5]], device=device)
    bad_score = fastmoe.FMoE(2, 3, top_k=2, gate=FixedGate(idx, score), expert=linear).to(device)
    with pytest.raises(fastmoe.NonFiniteError, match=r"gate scores \(topk_score\) .* 1 NaN"):
        bad_score(torch.randn(2, 3, device=device))
    bad_ids = torch.tensor([[0, 5], [1, 0]], device=device)
    bad_idx = fastmoe.FMoE(2, 3, top_k=2, gate=FixedGate(bad_ids, torch.ones(2, 2, device=device)), expert=linear)
    bad_idx = bad_idx.to(device)
    with pytest.raises(ValueError, match=r"topk_idx holds 1 expert ids outside \[-1, num_experts=2\) .* value 5"):
        bad_idx(torch.randn(2, 3, device=device))


def test_debug_mode_changes_no_result(device):
    layer = mlp(device)
    x = torch.randn(9, 6, device=device)
    y = layer(x)
    fastmoe.set_debug(True)
    assert_bitwise_equal(layer(x), y, "output in debug mode")


def test_set_debug_returns_previous_and_checks_type():
    assert fastmoe.set_debug(True) is False
    assert fastmoe.is_debug() and fastmoe.set_debug(False) is True
    with pytest.raises(TypeError, match="enabled must be a bool, got 1"):
        fastmoe.set_debug(1)


def test_fastmoe_debug_environment_variable():
    """FASTMOE_DEBUG=1 at import turns debug mode on (a child process; this one imported fastmoe already)."""
    env = dict(os.environ, FASTMOE_DEBUG="1")
    code = "import fastmoe; print(fastmoe.is_debug())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"
