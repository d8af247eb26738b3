"""FMoE's balance statistics (layer.balance_stats) and fastmoe.balance.collect / log_balance: the numbers match
the routing the gate produced, the forward keeps device tensors only, and the flat dict covers every layer."""

import functools
import math

import pytest
import torch
from torch import nn

from conftest import make_generator, mentions, randn
from fastmoe import FMoE, FMoETransformerMLP, balance
from fastmoe.gates import ExpertChoiceGate, GShardGate, NaiveGate, SigmoidGate

D_MODEL, NUM_EXPERT = 8, 4


def make_layer(gate=NaiveGate, top_k=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    return FMoETransformerMLP(num_expert=NUM_EXPERT, d_model=D_MODEL, d_hidden=6, top_k=top_k, gate=gate, **kwargs)


def capture_routing(layer):
    """Installs a gate_hook that keeps the last (topk_idx, topk_score)."""
    seen = {}

    def hook(topk_idx, topk_score, _):
        seen["idx"], seen["score"] = topk_idx.detach().clone(), topk_score.detach().clone()

    layer.gate_hook = hook
    return seen


def expected_stats(idx: torch.Tensor, num_experts: int) -> dict:
    routed = idx[idx >= 0]
    counts = torch.bincount(routed, minlength=num_experts).double()
    mean = counts.mean()
    return {
        "expert_counts": counts.long().tolist(),
        "routed": int(routed.numel()),
        "unrouted_rate": (idx.numel() - routed.numel()) / idx.numel(),
        "load_cv": (counts.var(correction=0).sqrt() / mean).item(),
        "max_over_mean": (counts.max() / mean).item(),
        "max_load": int(counts.max()),
    }


def test_stats_of_a_capacity_gate_match_its_routing():
    gate = functools.partial(GShardGate, capacity=(0.6, 0.6), random_routing=False, z_loss_coef=0.01)
    layer = make_layer(gate)
    with torch.no_grad():
        layer.gate.gate.bias[1] += 3.0  # most tokens want expert 1: capacity drops some
    seen = capture_routing(layer)
    x = torch.randn(3, 10, D_MODEL)
    layer(x)
    losses = {name: loss.item() for name, loss in layer.gate.get_losses().items()}
    dropped = layer.gate.num_dropped.item()
    total = layer.get_loss().item()  # clears the gate's losses; the stats keep their own copy

    stats = layer.balance_stats()
    want = expected_stats(seen["idx"], NUM_EXPERT)
    for key, value in want.items():
        assert stats[key] == pytest.approx(value, rel=1e-12, abs=0), key
    assert stats["num_tokens"] == 30 and stats["num_slots"] == 60
    assert dropped > 0 and stats["dropped"] == dropped
    assert stats["drop_rate"] == pytest.approx(dropped / 60)
    assert stats["routed"] + stats["dropped"] == 60  # no random routing: every empty slot is a capacity drop
    assert stats["max_load"] == math.ceil(0.6 * 30 * 2 / NUM_EXPERT)
    assert set(stats["losses"]) == {"balance", "z"}
    for name, value in losses.items():
        assert stats["losses"][name] == pytest.approx(value, rel=1e-6)
    assert stats["loss"] == pytest.approx(total, rel=1e-6)


def test_gate_without_loss_or_capacity():
    layer = make_layer()
    seen = capture_routing(layer)
    layer(torch.randn(20, D_MODEL))
    stats = layer.balance_stats()
    assert stats["losses"] == {} and stats["loss"] == 0.0
    assert stats["dropped"] == 0 and stats["drop_rate"] == 0.0 and stats["unrouted_rate"] == 0.0
    assert stats["expert_counts"] == expected_stats(seen["idx"], NUM_EXPERT)["expert_counts"]
    assert layer.get_loss().item() == 0.0


def test_forward_records_device_tensors_only(device):
    """The forward keeps tensors on the layer's device, detached; nothing was read on the host."""
    gate = functools.partial(GShardGate, capacity=(1.0, 1.0), z_loss_coef=0.01)
    layer = make_layer(gate).to(device)
    x = torch.randn(16, D_MODEL, device=device, requires_grad=True)
    layer(x).sum().backward()
    record = layer.balance_record
    assert record.num_tokens == 16 and record.num_slots == 32
    tensors = [record.expert_counts, record.num_dropped, *record.losses.values()]
    for t in tensors:
        assert isinstance(t, torch.Tensor) and t.device.type == torch.device(device).type and not t.requires_grad
    assert record.expert_counts.shape == (NUM_EXPERT,) and record.expert_counts.dtype == torch.int64
    assert record.num_dropped.dim() == 0
    assert layer.balance_stats()["num_tokens"] == 16


def test_stats_report_the_last_forward():
    layer = make_layer()
    layer(torch.randn(10, D_MODEL))
    layer(torch.randn(3, D_MODEL))
    assert layer.balance_stats()["num_tokens"] == 3 and sum(layer.balance_stats()["expert_counts"]) == 6


def test_balance_stats_before_any_forward_raises():
    with pytest.raises(RuntimeError, match="has not run a forward"):
        make_layer().balance_stats()


def test_expert_choice_stats():
    """Experts take exactly C tokens each: an even load, and the empty slots of the [T, E] routing."""
    layer = make_layer(ExpertChoiceGate)
    assert layer.slots_per_token == NUM_EXPERT
    layer(torch.randn(12, D_MODEL))
    stats = layer.balance_stats()
    capacity = math.ceil(12 * 2 / NUM_EXPERT)
    assert stats["expert_counts"] == [capacity] * NUM_EXPERT
    assert stats["max_over_mean"] == 1.0 and stats["load_cv"] == 0.0
    assert stats["unrouted_rate"] == pytest.approx(1 - NUM_EXPERT * capacity / (12 * NUM_EXPERT))


def test_zero_tokens_count_as_even():
    layer = make_layer(functools.partial(GShardGate, z_loss_coef=0.1))
    layer(torch.zeros(0, D_MODEL))
    stats = layer.balance_stats()
    assert stats["expert_counts"] == [0] * NUM_EXPERT and stats["num_slots"] == 0
    assert stats["max_over_mean"] == 1.0 and stats["load_cv"] == 0.0 and stats["drop_rate"] == 0.0
    assert all(math.isfinite(v) for v in stats["losses"].values())


def test_module_experts_record_too():
    layer = FMoE(NUM_EXPERT, D_MODEL, top_k=2, gate=SigmoidGate, expert=lambda d: nn.Linear(d, d))
    layer(torch.randn(7, D_MODEL))
    assert sum(layer.balance_stats()["expert_counts"]) == 14


def test_layer_checks_the_gate_width():
    """A gate instance whose routing is wider than the layer's top_k is caught, naming both shapes."""
    layer = FMoE(NUM_EXPERT, D_MODEL, top_k=1, gate=GShardGate(D_MODEL, NUM_EXPERT, 1, 2), expert=nn.Identity)
    with pytest.raises(ValueError, match=mentions("(5, 2)", "[5, 1]")):
        layer(torch.randn(5, D_MODEL))


# ----------------------------------------------------------------------------------------------- collect


class TwoLayerModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = make_layer(functools.partial(GShardGate, capacity=(0.7, 0.7), random_routing=False), seed=1)
        self.mix = nn.Linear(D_MODEL, D_MODEL)
        self.second = make_layer(SigmoidGate, seed=2)
        self.unused = make_layer(seed=3)

    def forward(self, x):
        return self.second(self.mix(self.first(x)))


def test_collect_gives_a_flat_dict_over_the_layers():
    model = TwoLayerModel()
    model(randn(24, D_MODEL, gen=make_generator(0), dtype=torch.float32))
    stats = balance.collect(model)
    first, second = model.first.balance_stats(), model.second.balance_stats()
    for i, layer in enumerate((first, second)):
        for key in balance.SCALAR_KEYS:
            assert stats[f"moe/layer{i}/{key}"] == pytest.approx(float(layer[key]), rel=1e-12, abs=0)
    assert stats["moe/layer0/loss/balance"] == pytest.approx(first["losses"]["balance"])
    assert not any(key.startswith("moe/layer2/") for key in stats)  # the unused layer has no forward
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["moe/all/drop_rate"] == pytest.approx((first["dropped"] + second["dropped"]) / 96)
    assert stats["moe/all/max_over_mean"] == max(first["max_over_mean"], second["max_over_mean"])
    assert stats["moe/all/loss"] == pytest.approx(first["loss"] + second["loss"])
    assert stats["moe/layer0/drop_rate"] > 0

    with_counts = balance.collect(model, prefix="train", include_counts=True, use_names=True)
    assert with_counts["train/second/expert_count/3"] == float(second["expert_counts"][3])
    assert "train/first/drop_rate" in with_counts


def test_log_balance_calls_back_per_entry():
    model = TwoLayerModel()
    model(torch.randn(10, D_MODEL))
    logged = []
    stats = balance.log_balance(model, lambda key, value, step: logged.append((key, value, step)), step=7)
    assert logged == [(key, value, 7) for key, value in stats.items()]
    logged.clear()
    balance.log_balance(model, lambda key, value: logged.append((key, value)))
    assert dict(logged) == stats


def test_collect_without_moe_layers_and_bad_arguments():
    assert balance.collect(nn.Linear(3, 3)) == {}
    with pytest.raises(TypeError, match=mentions("model", "int")):
        balance.collect(5)
    with pytest.raises(TypeError, match=mentions("callback", "3")):
        balance.log_balance(nn.Linear(3, 3), 3)
