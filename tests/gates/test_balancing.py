"""Load balancing in training: 200 steps of a skewed token stream (half of every batch carries a direction that the
gate's expert 0 likes) through a trainable FMoETransformerMLP (E=8, k=2, T=256, d=16), trained with Adam on a
regression task.

- SigmoidGate with its bias balancing (the paper's rate 1e-3): max/mean expert load falls to <= 1.2.
- NaiveGate with its Switch-style balance loss (balance_coef=0.1): max/mean load ends below the same run
  without the loss, with no dropped token.
- GShardGate (default capacity and random routing) with its aux loss added to the objective: max/mean load ends
  below where it started, and below the same run without the aux loss.

The load at the end is the expert counts summed over the last 20 steps (one batch of 512 assignments has a
sampling noise of its own: ~1.15 max/mean even for an even router); the start is the first step. Run with
``-s`` to see the numbers.
"""

import functools

import torch

from conftest import make_generator
from fastmoe import FMoETransformerMLP
from fastmoe.gates import GShardGate, NaiveGate, SigmoidGate

D_MODEL, D_HIDDEN, NUM_EXPERT, TOP_K, NUM_TOKENS = 16, 32, 8, 2, 256
STEPS, WINDOW = 200, 20


def max_over_mean(counts: torch.Tensor) -> float:
    return (counts.max() / counts.mean()).item()


def train_on_skewed_stream(gate, aux_weight: float | None = None, seed: int = 0) -> dict:
    """Runs the 200 steps; returns max/mean of the first step and of the last WINDOW steps, and the drop rates."""
    torch.manual_seed(seed)
    layer = FMoETransformerMLP(num_expert=NUM_EXPERT, d_model=D_MODEL, d_hidden=D_HIDDEN, top_k=TOP_K, gate=gate)
    gen = make_generator(seed)
    direction = torch.randn(D_MODEL, generator=gen)
    direction /= direction.norm()
    with torch.no_grad():  # expert 0 likes the direction that half the tokens carry
        layer.gate.gate.weight[0] += direction
    teacher = torch.randn(D_MODEL, D_MODEL, generator=gen) / D_MODEL**0.5
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    counts, drop_rates = [], []
    for _ in range(STEPS):
        x = torch.randn(NUM_TOKENS, D_MODEL, generator=gen)
        x[: NUM_TOKENS // 2] += 3.0 * direction
        y = layer(x)
        loss = (y - torch.tanh(x @ teacher)).square().mean()
        aux = layer.get_loss()
        if aux_weight is not None:
            loss = loss + aux_weight * aux
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        stats = layer.balance_stats()
        counts.append(torch.tensor(stats["expert_counts"], dtype=torch.float64))
        drop_rates.append(stats["drop_rate"])
    return {
        "start": max_over_mean(counts[0]),
        "end": max_over_mean(torch.stack(counts[-WINDOW:]).sum(0)),
        "start_drop_rate": drop_rates[0],
        "end_drop_rate": sum(drop_rates[-WINDOW:]) / WINDOW,
    }


def test_sigmoid_gate_bias_balancing_evens_the_load():
    result = train_on_skewed_stream(functools.partial(SigmoidGate, bias_update_rate=1e-3))
    print(f"\nSigmoidGate bias balancing: max/mean load {result['start']:.3f} -> {result['end']:.3f}")
    assert result["start"] >= 2.0  # the stream is skewed: expert 0 takes about half of the tokens
    assert result["end"] <= 1.2


def test_sigmoid_gate_without_bias_updates_stays_skewed():
    """The control: the same run with bias_update_rate=0 does not balance, so the bias did the work above."""
    result = train_on_skewed_stream(functools.partial(SigmoidGate, bias_update_rate=0.0))
    print(f"\nSigmoidGate without bias updates: max/mean load {result['start']:.3f} -> {result['end']:.3f}")
    assert result["end"] > 1.5


def test_gshard_aux_loss_lowers_the_load_imbalance():
    with_aux = train_on_skewed_stream(GShardGate, aux_weight=0.1)
    without_aux = train_on_skewed_stream(GShardGate, aux_weight=None)
    print(
        f"\nGShardGate + 0.1 * aux loss: max/mean load {with_aux['start']:.3f} -> {with_aux['end']:.3f}, "
        f"drop rate {with_aux['start_drop_rate']:.3f} -> {with_aux['end_drop_rate']:.3f}; without the aux loss: "
        f"{without_aux['start']:.3f} -> {without_aux['end']:.3f}, drop rate {without_aux['end_drop_rate']:.3f}"
    )
    assert with_aux["end"] < with_aux["start"]
    assert with_aux["end"] < without_aux["end"]
    assert with_aux["end_drop_rate"] < with_aux["start_drop_rate"]


def test_naive_gate_balance_loss_lowers_the_load_imbalance():
    with_loss = train_on_skewed_stream(functools.partial(NaiveGate, balance_coef=0.1), aux_weight=1.0)
    without_loss = train_on_skewed_stream(NaiveGate)
    print(
        f"\nNaiveGate + balance loss 0.1: max/mean load {with_loss['start']:.3f} -> {with_loss['end']:.3f}; "
        f"without it: {without_loss['start']:.3f} -> {without_loss['end']:.3f}"
    )
    assert with_loss["start"] >= 2.0
    assert with_loss["end"] < 0.8 * without_loss["end"]
    assert with_loss["end_drop_rate"] == 0.0
