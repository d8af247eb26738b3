"""fastmoe.fmoefy, FastMoE's name: moefy with FastMoE's arguments on any model but a Megatron-LM one, which it
refuses with a pointer; ``fmoe.megatron.fmoefy`` under the opt-in alias."""

import sys

import pytest
import torch
from moefy_models import toy_lm
from torch import nn

import fastmoe
from conftest import mentions
from fastmoe.compat import install_fmoe_alias, uninstall_fmoe_alias
from fastmoe.gates import NoisyGate
from fastmoe.integrations import is_megatron_model


def test_fmoefy_is_moefy_with_fastmoes_argument_names():
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    ours = fastmoe.fmoefy(toy_lm(), fmoe_num_experts=3)
    torch.manual_seed(1)
    reference = fastmoe.moefy(toy_lm(), num_expert=3, top_k=2)
    ours_sd, reference_sd = ours.state_dict(), reference.state_dict()
    assert ours_sd.keys() == reference_sd.keys()
    assert all(torch.equal(ours_sd[key], reference_sd[key]) for key in ours_sd)
    assert torch.equal(ours(ids), reference(ids))
    layer = ours.layers[0].mlp
    assert layer.top_k == 2 and layer.world_size == 1 and layer.num_expert == 3
    # distributed_experts=True (the default) without torch.distributed: world_size 1, experts marked as FastMoE's
    assert {p.dp_comm for p in layer.experts.parameters()} == {"none"}


def test_fmoefy_maps_each_argument():
    model = fastmoe.fmoefy(
        toy_lm(num_layers=3), num_experts=4, distributed_experts=False, hidden_hidden_size=24, top_k=1, gate=NoisyGate
    )
    layers = [layer.mlp for layer in model.layers]
    assert all(isinstance(m, fastmoe.FMoE) for m in layers)
    assert all(m.num_expert == 4 and m.top_k == 1 and isinstance(m.gate, NoisyGate) for m in layers)
    assert {p.dp_comm for m in layers for p in m.experts.parameters()} == {"dp"}  # replicated experts
    partial = fastmoe.fmoefy(toy_lm(num_layers=3), 2, layers=[2], noise=0.01)
    assert [isinstance(layer.mlp, fastmoe.FMoE) for layer in partial.layers] == [False, False, True]


@pytest.mark.parametrize(
    "kwargs,error,argument,value",
    [
        ({}, ValueError, "fmoe_num_experts", "None"),
        ({"fmoe_num_experts": 2, "num_experts": 3}, ValueError, "num_experts", "3"),
        ({"fmoe_num_experts": 0}, ValueError, "fmoe_num_experts", "0"),
        ({"fmoe_num_experts": 2, "hidden_hidden_size": 64}, ValueError, "hidden_hidden_size", "64"),
        ({"fmoe_num_experts": 2, "hidden_hidden_size": -1}, ValueError, "hidden_hidden_size", "-1"),
        ({"fmoe_num_experts": 2, "top_k": 3}, ValueError, "top_k", "3"),
        ({"fmoe_num_experts": 2, "distributed_experts": "yes"}, TypeError, "distributed_experts", "'yes'"),
        ({"fmoe_num_experts": 2, "every": 0}, ValueError, "every", "0"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, argument, value):
    model = toy_lm()
    with pytest.raises(error, match=mentions(argument, value)):
        fastmoe.fmoefy(model, **kwargs)
    assert not any(isinstance(m, fastmoe.FMoE) for m in model.modules())


class ParallelMLP(nn.Module):
    """Megatron-LM's MLP layout (dense_h_to_4h, dense_4h_to_h), returning (output, bias)."""

    def __init__(self, d_model=16):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(d_model, 4 * d_model)
        self.dense_4h_to_h = nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        return self.dense_4h_to_h(torch.relu(self.dense_h_to_4h(x))), None


class ParallelTransformerLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = ParallelMLP()


class TransformerLanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(50, 16)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(ParallelTransformerLayer() for _ in range(2))


class GPTModel(nn.Module):
    """The layout FastMoE's fmoefy walked: model.language_model.{embedding, encoder.layers[i].mlp}."""

    def __init__(self):
        super().__init__()
        self.language_model = TransformerLanguageModel()


class CoreMLP(ParallelMLP):
    """A class of a megatron package (megatron.core), found by its module name alone."""


CoreMLP.__module__ = "megatron.core.transformer.mlp"


def megatron_core_model():
    model = toy_lm()
    model.layers[0].mlp = CoreMLP()
    return model


@pytest.mark.parametrize(
    "make,kwargs",
    [
        pytest.param(GPTModel, {}, id="language_model-layout"),
        pytest.param(lambda: nn.Sequential(GPTModel()), {}, id="wrapped"),
        pytest.param(megatron_core_model, {}, id="megatron.core-class"),
        pytest.param(toy_lm, {"megatron_version": "v2.2"}, id="megatron_version"),
    ],
)
def test_a_megatron_model_is_refused_with_a_pointer(make, kwargs):
    model = make()
    before = [m for m in model.modules()]
    with pytest.raises(NotImplementedError, match=mentions("moefy", "docs/porting-from-fastmoe.md")) as info:
        fastmoe.fmoefy(model, fmoe_num_experts=2, **kwargs)
    assert "Megatron-LM" in str(info.value)
    assert [m for m in model.modules()] == before


def test_megatron_detection_does_not_flag_other_models():
    assert is_megatron_model(GPTModel()) and is_megatron_model(megatron_core_model())
    assert not is_megatron_model(toy_lm())
    t5_like = nn.Module()
    t5_like.language_model = nn.Module()
    t5_like.language_model.encoder = nn.Linear(2, 2)  # an encoder, but no embedding beside it
    assert not is_megatron_model(t5_like)
    assert "megatron" not in sys.modules  # decided without importing megatron


def test_fmoe_megatron_fmoefy_is_fastmoes_under_the_alias():
    assert "fmoe" not in sys.modules
    install_fmoe_alias()
    try:
        import fmoe.megatron
        from fmoe.megatron import fmoefy

        assert fmoefy is fastmoe.fmoefy is fastmoe.integrations.fmoefy
        assert fmoe.megatron is sys.modules["fastmoe.integrations.megatron"]
        with pytest.raises(AttributeError, match=mentions("MegatronMLP", "docs/porting-from-fastmoe.md")):
            fmoe.megatron.MegatronMLP  # noqa: B018
        with pytest.raises(ModuleNotFoundError, match="fmoe.functions"):
            import fmoe.functions  # noqa: F401
    finally:
        uninstall_fmoe_alias()
    assert "fmoe" not in sys.modules and not any(name.startswith("fmoe.") for name in sys.modules)
