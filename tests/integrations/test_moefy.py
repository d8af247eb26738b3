"""fastmoe.moefy on models built here with the FFN structures it converts (Llama's gated MLP, GPT-2's Conv1D
MLP): which blocks it picks, equality with the dense model at initialisation and for which gates, noise, and
the errors. Hugging Face models themselves: test_moefy_hf.py."""

import copy
import functools

import pytest
import torch
from moefy_models import GatedFFN, Layer, toy_lm
from torch import nn

import fastmoe
from conftest import mentions
from fastmoe.gates import (
    ExpertChoiceGate,
    GShardGate,
    NaiveGate,
    NoisyGate,
    SigmoidGate,
    SwipeGate,
    SwitchGate,
    ZeroGate,
)
from fastmoe.integrations import UpcycledExperts, UpcycledMLP, find_ffn_blocks

TOL = 1e-10  # docs/numerics.md: the layers in fp64 match their plain PyTorch counterpart within 1e-10


def ids(batch=3, seq=5, vocab=50, seed=3):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def converted(model) -> list:
    return [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, fastmoe.FMoE)]


@pytest.mark.parametrize("kind,bias", [("gated", False), ("gated", True), ("two_layer", True)])
def test_outputs_and_input_gradients_equal_the_dense_model(kind, bias):
    model = toy_lm(kind=kind, bias=bias, num_layers=3)
    dense = copy.deepcopy(model)
    assert fastmoe.moefy(model, num_expert=4) is model
    assert converted(model) == [0, 1, 2]
    x = ids()
    out, ref = model(x), dense(x)
    assert (out - ref).abs().max() <= TOL
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=out.dtype)
    (out * cotangent).sum().backward()
    (ref * cotangent).sum().backward()
    assert (model.embed.weight.grad - dense.embed.weight.grad).abs().max() <= TOL
    layer = model.layers[0].mlp
    assert isinstance(layer, UpcycledMLP) and layer.num_expert == 4 and layer.top_k == 2
    assert layer.upcycled_from.endswith("GatedFFN" if kind == "gated" else "TwoLayerFFN")
    if kind == "gated":
        assert layer.experts.htoh4.weight.shape == (4, 48, 16)  # gate rows, then up rows
        dense_mlp = dense.layers[0].mlp
        assert torch.equal(layer.experts.htoh4.weight[2, :24], dense_mlp.gate_proj.weight)
        assert torch.equal(layer.experts.htoh4.weight[2, 24:], dense_mlp.up_proj.weight)
        assert torch.equal(layer.experts.h4toh.weight[3], dense_mlp.down_proj.weight)


def test_the_module_tree_keeps_its_shape_dtype_device_and_modes():
    model = toy_lm(dtype=torch.float32, num_layers=2)
    model.layers[1].mlp.requires_grad_(False)
    model.layers[1].train(False)
    names_before = [n for n, _ in model.named_children()]
    fastmoe.moefy(model, num_expert=2)
    assert [n for n, _ in model.named_children()] == names_before
    first, second = model.layers[0].mlp, model.layers[1].mlp
    assert {p.dtype for p in first.parameters()} == {torch.float32}
    assert first.training and not second.training
    assert all(p.requires_grad for p in first.parameters())
    # a frozen dense FFN gives frozen experts; the new router is trainable
    assert not any(p.requires_grad for p in second.experts.parameters())
    assert all(p.requires_grad for p in second.gate.parameters())
    assert model(ids()).shape == (3, 5, 50)


@pytest.mark.parametrize(
    "layers,every,expected",
    [
        (None, 1, [0, 1, 2, 3, 4, 5]),
        ([0, -1], 1, [0, 5]),
        ([4, 1], 1, [1, 4]),
        (None, 2, [1, 3, 5]),
        (None, 3, [2, 5]),
        (None, 7, []),
    ],
)
def test_layers_and_every_choose_the_blocks(layers, every, expected):
    model = toy_lm(num_layers=6)
    before = [layer.mlp for layer in model.layers]
    dense = copy.deepcopy(model)
    fastmoe.moefy(model, num_expert=2, layers=layers, every=every)
    assert converted(model) == expected
    for i, layer in enumerate(model.layers):
        if i not in expected:
            assert layer.mlp is before[i]
    assert (model(ids()) - dense(ids())).abs().max() <= TOL


def test_blocks_already_moe_are_left_alone_and_cannot_be_named():
    model = toy_lm(num_layers=3)
    fastmoe.moefy(model, num_expert=2, layers=[1])
    first = model.layers[1].mlp
    assert [status for _, _, status in find_ffn_blocks(model)] == ["dense", "moe", "dense"]
    fastmoe.moefy(model, num_expert=2)
    assert converted(model) == [0, 1, 2] and model.layers[1].mlp is first
    with pytest.raises(ValueError, match=mentions("layers", "layers.1.mlp")):
        fastmoe.moefy(model, num_expert=2, layers=[1])


def test_noise_breaks_the_symmetry_reproducibly():
    model = toy_lm()
    dense = copy.deepcopy(model)
    torch.manual_seed(5)
    fastmoe.moefy(model, num_expert=3, noise=0.01)
    x = ids()
    diff = (model(x) - dense(x)).abs().max()
    assert diff > 1e-6
    w = model.layers[0].mlp.experts.htoh4.weight.detach()
    dense_mlp = dense.layers[0].mlp
    dense_w = torch.cat([dense_mlp.gate_proj.weight, dense_mlp.up_proj.weight]).detach()
    for e in range(3):
        relative = (w[e] / dense_w - 1).std()  # eps ~ N(0, 1) times noise, elementwise
        assert 0.005 < relative < 0.02
    assert not torch.equal(w[0], w[1])
    again = toy_lm()
    torch.manual_seed(5)
    fastmoe.moefy(again, num_expert=3, noise=0.01)
    assert torch.equal(again.layers[0].mlp.experts.htoh4.weight, model.layers[0].mlp.experts.htoh4.weight)
    torch.manual_seed(6)
    other = fastmoe.moefy(toy_lm(), num_expert=3, noise=0.01)
    assert not torch.equal(other.layers[0].mlp.experts.htoh4.weight, model.layers[0].mlp.experts.htoh4.weight)


def test_a_gated_block_with_another_activation_gets_copies_of_the_block_as_experts():
    model = toy_lm(act=nn.GELU(approximate="tanh"))
    dense = copy.deepcopy(model)
    fastmoe.moefy(model, num_expert=3, noise=0.0)
    layer = model.layers[0].mlp
    assert isinstance(layer, UpcycledExperts) and len(layer.experts) == 3
    assert all(isinstance(expert, GatedFFN) for expert in layer.experts)
    assert (model(ids()) - dense(ids())).abs().max() <= TOL
    noisy = fastmoe.moefy(toy_lm(act=nn.GELU(approximate="tanh")), num_expert=2, noise=0.01)
    experts = noisy.layers[0].mlp.experts
    assert not torch.equal(experts[0].up_proj.weight, experts[1].up_proj.weight)


# The scores of a token sum to 1 and no slot is dropped -> the layer equals the dense FFN at initialisation
# (docs/integrations.md). Gates whose scores do not sum to 1 change the output.
EQUAL_AT_INIT = [
    pytest.param(NaiveGate, 2, False, id="NaiveGate"),
    pytest.param(NoisyGate, 2, True, id="NoisyGate-train"),
    pytest.param(NoisyGate, 2, False, id="NoisyGate-eval"),
    pytest.param(SigmoidGate, 2, True, id="SigmoidGate"),
    pytest.param(SwipeGate, 2, False, id="SwipeGate-eval"),
    pytest.param(ZeroGate, 2, False, id="ZeroGate"),
    pytest.param(
        functools.partial(GShardGate, capacity=None, random_routing=False), 2, True, id="GShardGate-no-capacity"
    ),
]
NOT_EQUAL_AT_INIT = [
    pytest.param(SwitchGate, 1, False, id="SwitchGate"),
    pytest.param(ExpertChoiceGate, 2, False, id="ExpertChoiceGate"),
]


def gate_case(gate, top_k, training):
    model = toy_lm()
    dense = copy.deepcopy(model)
    torch.manual_seed(7)
    fastmoe.moefy(model, num_expert=4, top_k=top_k, gate=gate)
    model.train(training)
    x = ids(batch=4, seq=8)
    with torch.no_grad():
        return float((model(x) - dense(x)).abs().max())


@pytest.mark.parametrize("gate,top_k,training", EQUAL_AT_INIT)
def test_gates_whose_scores_sum_to_one_keep_the_dense_outputs(gate, top_k, training):
    assert gate_case(gate, top_k, training) <= TOL


@pytest.mark.parametrize("gate,top_k,training", NOT_EQUAL_AT_INIT)
def test_gates_whose_scores_do_not_sum_to_one_change_the_outputs(gate, top_k, training):
    assert gate_case(gate, top_k, training) > 1e-4


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,error,argument,value",
    [
        ({"num_expert": 0}, ValueError, "num_expert", "0"),
        ({"num_expert": True}, ValueError, "num_expert", "True"),
        ({"num_expert": 2, "top_k": 3}, ValueError, "top_k", "3"),
        ({"num_expert": 2, "top_k": 0}, ValueError, "top_k", "0"),
        ({"num_expert": 2, "every": 0}, ValueError, "every", "0"),
        ({"num_expert": 2, "world_size": 0}, ValueError, "world_size", "0"),
        ({"num_expert": 2, "layers": [2]}, ValueError, "layers", "2"),
        ({"num_expert": 2, "layers": [-3]}, ValueError, "layers", "-3"),
        ({"num_expert": 2, "layers": [0, 0]}, ValueError, "layers", "[0, 0]"),
        ({"num_expert": 2, "layers": [True]}, TypeError, "layers", "True"),
        ({"num_expert": 2, "layers": "0"}, TypeError, "layers", "'0'"),
        ({"num_expert": 2, "layers": [0], "every": 2}, ValueError, "every", "2"),
        ({"num_expert": 2, "noise": -0.1}, ValueError, "noise", "-0.1"),
        ({"num_expert": 2, "noise": float("nan")}, ValueError, "noise", "nan"),
        ({"num_expert": 2, "noise": "0.1"}, ValueError, "noise", "'0.1'"),
        ({"num_expert": 2, "gate": "naive"}, TypeError, "gate", "'naive'"),
        ({"num_expert": 2, "d_hidden": 8}, TypeError, "d_hidden", "8"),
        ({"num_expert": 2, "activation": "relu"}, TypeError, "activation", "'relu'"),
    ],
)
def test_bad_arguments_name_the_argument_and_value_and_change_nothing(kwargs, error, argument, value):
    model = toy_lm()
    before = [layer.mlp for layer in model.layers]
    with pytest.raises(error, match=mentions(argument, value)):
        fastmoe.moefy(model, **kwargs)
    assert [layer.mlp for layer in model.layers] == before


def test_a_gate_instance_is_refused():
    gate = NaiveGate(16, 2, 1, 2)
    with pytest.raises(TypeError, match=mentions("gate", "instance")):
        fastmoe.moefy(toy_lm(), num_expert=2, gate=gate)
    with pytest.raises(TypeError, match=mentions("model", "str")):
        fastmoe.moefy("model", num_expert=2)


class OtherFFN(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, 32), nn.Linear(32, d_model)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class ReluInsteadOfAct(GatedFFN):
    """Has the names of a gated FFN but ignores act_fn: not what moefy would copy."""

    def forward(self, x):
        return self.down_proj(torch.relu(self.gate_proj(x)) * self.up_proj(x))


def test_an_ffn_it_cannot_convert_is_named_with_its_path_and_type():
    model = toy_lm(num_layers=3)
    model.layers[1].mlp = OtherFFN(16).double()
    assert find_ffn_blocks(model)[1][:2] == (1, "layers.1.mlp")
    with pytest.raises(ValueError, match=mentions("layers.1.mlp", "OtherFFN")) as info:
        fastmoe.moefy(model, num_expert=2)
    assert "fc1 (Linear)" in str(info.value)
    assert converted(model) == []  # everything is checked before anything is replaced
    fastmoe.moefy(model, num_expert=2, layers=[0, 2])
    assert converted(model) == [0, 2]


def test_a_block_that_computes_something_else_is_refused():
    model = toy_lm(num_layers=2)
    model.layers[0].mlp = ReluInsteadOfAct(16, 24).double()
    with pytest.raises(ValueError, match=mentions("layers.0.mlp", "does not compute")):
        fastmoe.moefy(model, num_expert=2)
    assert converted(model) == []


def test_a_block_shared_between_layers_is_refused():
    model = toy_lm(num_layers=2)
    model.layers[1].mlp = model.layers[0].mlp
    with pytest.raises(ValueError, match=mentions("layers.0.mlp", "layers.1.mlp")):
        fastmoe.moefy(model, num_expert=2)


def test_a_model_without_ffn_blocks_is_refused():
    with pytest.raises(ValueError, match=mentions("no FFN block", "Linear")):
        fastmoe.moefy(nn.Sequential(nn.Linear(4, 4)), num_expert=2)


def test_extra_layer_arguments_reach_the_layer():
    model = toy_lm()
    fastmoe.moefy(model, num_expert=2, gate_bias=False, expert_dp_comm="dp", top_k=1)
    layer = model.layers[0].mlp
    assert layer.gate.gate.bias is None and layer.top_k == 1
    assert {p.dp_comm for p in layer.experts.parameters()} == {"dp"}


def test_a_layer_of_the_model_is_a_plain_residual_layer():
    """The replaced block sits where the dense one was, so code that walks the model finds it there."""
    model = toy_lm()
    fastmoe.moefy(model, num_expert=2)
    assert isinstance(model.layers[0], Layer)
    assert "layers.0.mlp.experts.htoh4.weight" in model.state_dict()
