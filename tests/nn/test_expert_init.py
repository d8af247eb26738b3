"""Expert initialisation: each global expert draws from its own random stream (fastmoe._rng), one base seed per
layer from the CPU default generator.

So local expert e of rank r holds what global expert r * E + e holds in a one-rank layer built from the same
seed, ranks seeded alike still hold different experts, and building a layer moves the default generator by the
same amount whatever its number of experts (the modules built after it do not depend on the world size). The
multi-process version of these checks is tests/distributed/test_ep_init.py."""

import math

import pytest
import torch
from torch import nn

from conftest import DEVICE_PARAMS, assert_bitwise_equal
from fastmoe import FMoE, FMoELinear, FMoETransformerMLP, _rng
from fastmoe.gates import NaiveGate

D_MODEL, D_HIDDEN = 6, 10


def linear_expert(d: int) -> nn.Module:
    return nn.Linear(d, d)


def mlp_expert(d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, D_HIDDEN), nn.GELU(), nn.Linear(D_HIDDEN, d))


def assert_all_experts_differ(weight: torch.Tensor, name: str) -> None:
    """No two experts (rows of dimension 0) of ``weight`` are equal."""
    for i in range(weight.shape[0]):
        for j in range(i + 1, weight.shape[0]):
            assert not torch.equal(weight[i], weight[j]), f"{name}: experts {i} and {j} are equal"


def generator_states(device: str) -> list:
    """The default generators a layer built on ``device`` may draw from."""
    states = [torch.get_rng_state()]
    if device == "cuda":
        states.append(torch.cuda.get_rng_state())
    return states


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_linear_rank_holds_the_matching_experts_of_the_one_rank_layer(device, rank):
    with torch.device(device):
        torch.manual_seed(5)
        part = FMoELinear(2, 7, 3, rank=rank)
        torch.manual_seed(5)
        whole = FMoELinear(6, 7, 3)
    assert_bitwise_equal(part.weight, whole.weight[2 * rank : 2 * rank + 2], f"rank {rank} weight")
    assert_bitwise_equal(part.bias, whole.bias[2 * rank : 2 * rank + 2], f"rank {rank} bias")


def test_ranks_seeded_alike_hold_different_experts():
    weights = []
    for rank in range(2):
        torch.manual_seed(5)
        weights.append(FMoELinear(2, 7, 3, rank=rank).weight.detach())
    assert_all_experts_differ(torch.cat(weights), "FMoELinear experts of ranks 0 and 1")


@pytest.mark.parametrize("activation", [None, "swiglu"], ids=["gelu", "swiglu"])
def test_transformer_mlp_experts_all_differ(activation):
    torch.manual_seed(0)
    layer = FMoETransformerMLP(4, D_MODEL, D_HIDDEN, activation=activation)
    assert_all_experts_differ(layer.experts.htoh4.weight.detach(), "htoh4")
    assert_all_experts_differ(layer.experts.h4toh.weight.detach(), "h4toh")


@pytest.mark.parametrize("expert", ["callable", "list"])
def test_module_experts_all_differ(expert):
    """Also a list of one callable repeated: the stream belongs to the expert, not to the callable."""
    torch.manual_seed(0)
    layer = FMoE(4, D_MODEL, expert=mlp_expert if expert == "callable" else [mlp_expert] * 4)
    for name in ("0.weight", "0.bias", "2.weight"):
        stacked = torch.stack([dict(m.named_parameters())[name].detach() for m in layer.experts])
        assert_all_experts_differ(stacked, name)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_linear_moves_the_default_generators_alike_whatever_its_experts(device):
    """One draw per layer: the state after FMoELinear(E, rank=r) does not depend on E or r."""
    states = []
    for num_expert, rank in [(1, 0), (4, 0), (2, 3)]:
        torch.manual_seed(9)
        with torch.device(device):
            FMoELinear(num_expert, 7, 3, rank=rank)
        states.append(generator_states(device))
    for state in states[1:]:
        for got, want in zip(state, states[0], strict=True):
            assert torch.equal(got, want), "the default generator's state depends on the number of experts"


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("expert", ["callable", "list"])
def test_module_experts_move_the_default_generators_alike_whatever_their_number(device, expert):
    states = []
    for num_expert in (1, 3):
        with torch.device(device):
            gate = NaiveGate(D_MODEL, num_expert, 1, 1)  # made first: only the experts move the state below
            torch.manual_seed(9)
            makers = mlp_expert if expert == "callable" else [linear_expert, mlp_expert, linear_expert][:num_expert]
            FMoE(num_expert, D_MODEL, top_k=1, gate=gate, expert=makers)
        states.append(generator_states(device))
    for got, want in zip(states[1], states[0], strict=True):
        assert torch.equal(got, want), "the default generator's state depends on the number of experts"


def test_linear_keeps_the_uniform_initialisation():
    """Each expert's weight is uniform in ±1/sqrt(in_feat), like nn.Linear's, and biases are zero."""
    torch.manual_seed(1)
    layer = FMoELinear(4, 64, 48)
    bound = 1.0 / math.sqrt(64)
    weight = layer.weight.detach().double()
    assert weight.abs().max().item() <= bound
    for e in range(4):
        w = weight[e]
        assert w.max().item() > 0.99 * bound and w.min().item() < -0.99 * bound, f"expert {e} range"
        # 3072 draws of U(-b, b): the mean is 0 and the variance b^2 / 3, to within 5 standard errors (0.052 b and 8%)
        assert abs(w.mean().item()) < 0.06 * bound, f"expert {e} mean {w.mean().item()}"
        assert abs(w.var().item() / (bound**2 / 3) - 1) < 0.08, f"expert {e} variance {w.var().item()}"
    assert torch.equal(layer.bias, torch.zeros(4, 48))


def test_reset_parameters_draws_a_new_base_seed_and_keeps_the_rank_rule():
    torch.manual_seed(3)
    part = FMoELinear(2, 5, 4, rank=1)
    first = part.weight.detach().clone()
    with torch.no_grad():
        part.bias.fill_(1.0)
    part.reset_parameters()
    assert not torch.equal(part.weight, first), "reset_parameters() gave the construction's values again"
    assert torch.equal(part.bias, torch.zeros(2, 4))
    torch.manual_seed(4)
    part.reset_parameters()
    torch.manual_seed(4)
    whole = FMoELinear(4, 5, 4)
    assert_bitwise_equal(part.weight, whole.weight[2:], "reset weight of rank 1")


def test_a_layer_built_on_meta_and_reset_gets_the_values_of_one_built_on_the_cpu():
    with torch.device("meta"):
        layer = FMoETransformerMLP(3, D_MODEL, D_HIDDEN, activation="swiglu")
    layer = layer.to_empty(device="cpu")
    torch.manual_seed(6)
    layer.experts.htoh4.reset_parameters()
    torch.manual_seed(6)
    assert_bitwise_equal(layer.experts.htoh4.weight, FMoELinear(3, D_MODEL, 2 * D_HIDDEN).weight, "htoh4 weight")


@pytest.mark.parametrize("rank", [-1, True, 1.0])
def test_linear_rejects_a_bad_rank(rank):
    with pytest.raises(ValueError, match=f"rank must be a non-negative int, got {rank!r}"):
        FMoELinear(2, 4, 4, rank=rank)


def test_expert_seed_is_splitmix64():
    """The one expert_seed both front ends use (include/fastmoe/expert_seed.h through fastmoe._C): SplitMix64's
    published first output for seed 0, and a plain-Python SplitMix64 where the 64-bit sums wrap."""

    def splitmix64(state: int) -> int:
        mask = (1 << 64) - 1
        z = (state + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    assert _rng.expert_seed(0, 0) == 0xE220A8397B1DCDAF
    for base, expert in [(2**63 - 2, 10**6), (12345, 0), (2**62, 7)]:
        assert _rng.expert_seed(base, expert) == splitmix64((base + expert * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
