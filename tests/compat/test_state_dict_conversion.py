"""fastmoe.compat's state-dict conversion against state dicts written in FastMoE's layouts.

FastMoE is not installed here: its state dicts are built by hand from its module structure (FMoE keeps per-expert
modules in ``experts``, an ``nn.ModuleList``, and each FMoETransformerMLP expert is ``_Expert(1, ...)``: two
FMoELinear ``htoh4`` and ``h4toh``, whose ``weight [n, out, in]`` is registered before ``bias [n, out]``; NaiveGate
holds ``gate = nn.Linear(d_model, num_expert * world_size)``). Converted state dicts must load with strict=True and
compute what a plain-PyTorch MoE with the same weights computes; the conversion only moves data, so round trips are
bitwise.
"""

import collections
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_bitwise_equal, make_generator, mentions, randn
from fastmoe import FMoETransformerMLP
from fastmoe.compat import (
    from_fastmoe_state_dict,
    merge_ep_state_dicts,
    split_ep_state_dict,
    to_fastmoe_state_dict,
)
from fastmoe.testing import reference_moe_mlp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "distributed"))
from dist_harness import run_workers  # noqa: E402

D_MODEL, D_HIDDEN, NUM_TOKENS = 6, 10, 16


def fastmoe_per_expert_block(
    gen, prefix="", num_expert=3, world_size=1, d_model=D_MODEL, d_hidden=D_HIDDEN, dtype=torch.float64
):
    """The state dict of FastMoE's FMoETransformerMLP (per-expert layout) under ``prefix``, with seeded values
    (biases too, which FastMoE initialises to zero, so a lost bias would show)."""
    sd = collections.OrderedDict()
    for i in range(num_expert):
        sd[f"{prefix}experts.{i}.htoh4.weight"] = randn(1, d_hidden, d_model, gen=gen, dtype=dtype, scale=0.4)
        sd[f"{prefix}experts.{i}.htoh4.bias"] = randn(1, d_hidden, gen=gen, dtype=dtype, scale=0.4)
        sd[f"{prefix}experts.{i}.h4toh.weight"] = randn(1, d_model, d_hidden, gen=gen, dtype=dtype, scale=0.4)
        sd[f"{prefix}experts.{i}.h4toh.bias"] = randn(1, d_model, gen=gen, dtype=dtype, scale=0.4)
    sd[f"{prefix}gate.gate.weight"] = randn(num_expert * world_size, d_model, gen=gen, dtype=dtype)
    sd[f"{prefix}gate.gate.bias"] = randn(num_expert * world_size, gen=gen, dtype=dtype)
    return sd


def reference_weights(sd, prefix="", num_expert=3):
    """(gate_weight, gate_bias, w1, b1, w2, b2) of a FastMoE per-expert block, each expert read from its own key."""

    def stacked(param):
        return torch.stack([sd[f"{prefix}experts.{i}.{param}"][0] for i in range(num_expert)])

    return (
        sd[f"{prefix}gate.gate.weight"],
        sd[f"{prefix}gate.gate.bias"],
        stacked("htoh4.weight"),
        stacked("htoh4.bias"),
        stacked("h4toh.weight"),
        stacked("h4toh.bias"),
    )


def assert_same_state_dict(actual, expected, ordered=True):
    """Same keys (in the same order when ``ordered``; load_state_dict does not care, a diff of two files does)
    and bitwise the same tensors."""
    assert (list(actual) if ordered else sorted(actual)) == (list(expected) if ordered else sorted(expected))
    for key in expected:
        assert_bitwise_equal(actual[key], expected[key], name=key)


# ----------------------------------------------------------------------------------------------- one layer


@pytest.mark.parametrize("num_expert,top_k", [(1, 1), (3, 2), (4, 3)])
def test_per_expert_layout_loads_strict_and_matches_the_reference(num_expert, top_k):
    gen = make_generator(1)
    sd = fastmoe_per_expert_block(gen, num_expert=num_expert)
    converted = from_fastmoe_state_dict(sd)
    assert sorted(converted) == [
        "experts.h4toh.bias",
        "experts.h4toh.weight",
        "experts.htoh4.bias",
        "experts.htoh4.weight",
        "gate.gate.bias",
        "gate.gate.weight",
    ]
    for i in range(num_expert):  # pure data movement: expert i's rows, bit for bit
        for param in ("htoh4.weight", "htoh4.bias", "h4toh.weight", "h4toh.bias"):
            assert_bitwise_equal(converted[f"experts.{param}"][i], sd[f"experts.{i}.{param}"][0], name=param)
    assert converted["gate.gate.weight"] is sd["gate.gate.weight"]

    layer = FMoETransformerMLP(num_expert=num_expert, d_model=D_MODEL, d_hidden=D_HIDDEN, top_k=top_k).double()
    layer.load_state_dict(converted, strict=True)
    x = randn(NUM_TOKENS, D_MODEL, gen=gen)
    expected = reference_moe_mlp(x, *reference_weights(sd, num_expert=num_expert), top_k, F.gelu)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_round_trips_are_bitwise(dtype):
    gen = make_generator(2)
    sd = fastmoe_per_expert_block(gen, prefix="mlp.", dtype=dtype)
    fastmoe_sd = from_fastmoe_state_dict(sd)
    assert_same_state_dict(to_fastmoe_state_dict(fastmoe_sd), sd)
    # and from fastmoe's side: a layer's own state dict survives FastMoE's layout and back
    layer = FMoETransformerMLP(num_expert=3, d_model=D_MODEL, d_hidden=D_HIDDEN).to(dtype)
    own = layer.state_dict()
    for layout in ("per_expert", "fused"):
        assert_same_state_dict(from_fastmoe_state_dict(to_fastmoe_state_dict(own, layout)), own)


def test_per_expert_copies_own_their_storage():
    """Each expert tensor FastMoE gets is its own copy: torch.save of one expert does not drag the block along."""
    layer = FMoETransformerMLP(num_expert=4, d_model=D_MODEL, d_hidden=D_HIDDEN)
    out = to_fastmoe_state_dict(layer.state_dict())
    weight = out["experts.2.htoh4.weight"]
    assert weight.shape == (1, D_HIDDEN, D_MODEL)
    assert weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()
    assert_bitwise_equal(weight[0], layer.experts.htoh4.weight[2].detach(), name="expert 2")


def test_fused_layout_of_older_fastmoe_loads_unchanged():
    """Older FastMoE (one _Expert(num_expert, ...)) already has fastmoe's keys and shapes."""
    gen = make_generator(3)
    per_expert = fastmoe_per_expert_block(gen)
    fused = to_fastmoe_state_dict(from_fastmoe_state_dict(per_expert), layout="fused")
    assert list(fused) == [
        "experts.htoh4.weight",
        "experts.htoh4.bias",
        "experts.h4toh.weight",
        "experts.h4toh.bias",
        "gate.gate.weight",
        "gate.gate.bias",
    ]
    assert fused["experts.htoh4.weight"].shape == (3, D_HIDDEN, D_MODEL)
    again = from_fastmoe_state_dict(fused)
    assert all(again[k] is fused[k] for k in fused)  # nothing to convert: the same tensors
    layer = FMoETransformerMLP(num_expert=3, d_model=D_MODEL, d_hidden=D_HIDDEN).double()
    layer.load_state_dict(again, strict=True)
    x = randn(NUM_TOKENS, D_MODEL, gen=gen)
    torch.testing.assert_close(layer(x), reference_moe_mlp(x, *reference_weights(per_expert), 2, F.gelu))


def test_bias_free_layer_becomes_zero_biases_with_the_same_output():
    gen = make_generator(4)
    layer = FMoETransformerMLP(num_expert=3, d_model=D_MODEL, d_hidden=D_HIDDEN, bias=False).double()
    out = to_fastmoe_state_dict(layer.state_dict())
    assert torch.count_nonzero(out["experts.1.htoh4.bias"]) == 0 and out["experts.1.h4toh.bias"].shape == (1, D_MODEL)
    with_bias = FMoETransformerMLP(num_expert=3, d_model=D_MODEL, d_hidden=D_HIDDEN).double()
    with_bias.load_state_dict(from_fastmoe_state_dict(out), strict=True)
    x = randn(NUM_TOKENS, D_MODEL, gen=gen)
    torch.testing.assert_close(with_bias(x), layer(x))


# ----------------------------------------------------------------------------------------------- a whole model


class Block(nn.Module):
    def __init__(self, num_expert):
        super().__init__()
        self.attn = nn.Linear(D_MODEL, D_MODEL)
        self.mlp = FMoETransformerMLP(num_expert=num_expert, d_model=D_MODEL, d_hidden=D_HIDDEN)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Model(nn.Module):
    def __init__(self, num_experts=(3, 2)):
        super().__init__()
        self.embed = nn.Linear(D_MODEL, D_MODEL)
        self.layers = nn.ModuleList(Block(e) for e in num_experts)
        self.head = nn.Linear(D_MODEL, 4)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def fastmoe_model_state_dict(gen, num_experts=(3, 2)):
    """What FastMoE's version of ``Model`` saves: its dense layers plus a per-expert block per layer."""
    sd = collections.OrderedDict()
    sd["embed.weight"], sd["embed.bias"] = randn(D_MODEL, D_MODEL, gen=gen), randn(D_MODEL, gen=gen)
    for i, num_expert in enumerate(num_experts):
        sd[f"layers.{i}.attn.weight"] = randn(D_MODEL, D_MODEL, gen=gen, scale=0.3)
        sd[f"layers.{i}.attn.bias"] = randn(D_MODEL, gen=gen)
        sd.update(fastmoe_per_expert_block(gen, prefix=f"layers.{i}.mlp.", num_expert=num_expert))
    sd["head.weight"], sd["head.bias"] = randn(4, D_MODEL, gen=gen), randn(4, gen=gen)
    return sd


def reference_model(sd, x, num_experts=(3, 2)):
    x = x @ sd["embed.weight"].t() + sd["embed.bias"]
    for i, num_expert in enumerate(num_experts):
        x = x + x @ sd[f"layers.{i}.attn.weight"].t() + sd[f"layers.{i}.attn.bias"]
        weights = reference_weights(sd, prefix=f"layers.{i}.mlp.", num_expert=num_expert)
        x = x + reference_moe_mlp(x, *weights, 2, F.gelu)
    return x @ sd["head.weight"].t() + sd["head.bias"]


def test_a_whole_model_converts_every_block_and_leaves_the_rest():
    gen = make_generator(5)
    sd = fastmoe_model_state_dict(gen)
    converted = from_fastmoe_state_dict(sd)
    for key in (
        "embed.weight",
        "layers.0.attn.weight",
        "layers.1.attn.bias",
        "head.bias",
        "layers.1.mlp.gate.gate.bias",
    ):
        assert converted[key] is sd[key]
    assert converted["layers.0.mlp.experts.htoh4.weight"].shape == (3, D_HIDDEN, D_MODEL)
    assert converted["layers.1.mlp.experts.h4toh.bias"].shape == (2, D_MODEL)
    model = Model().double()
    model.load_state_dict(converted, strict=True)
    x = randn(NUM_TOKENS, D_MODEL, gen=gen)
    torch.testing.assert_close(model(x), reference_model(sd, x))
    # fastmoe registers the gate before the experts, FastMoE after them: same entries, another order
    assert_same_state_dict(to_fastmoe_state_dict(model.state_dict()), sd, ordered=False)


def test_prefixes_convert_only_the_named_blocks():
    gen = make_generator(6)
    sd = fastmoe_model_state_dict(gen)
    converted = from_fastmoe_state_dict(sd, prefixes=["layers.1.mlp"])
    assert "layers.0.mlp.experts.0.htoh4.weight" in converted and "layers.0.mlp.experts.htoh4.weight" not in converted
    assert "layers.1.mlp.experts.htoh4.weight" in converted and "layers.1.mlp.experts.0.htoh4.weight" not in converted
    back = to_fastmoe_state_dict(from_fastmoe_state_dict(sd), prefixes=["layers.0.mlp."])
    assert "layers.0.mlp.experts.1.h4toh.bias" in back and "layers.1.mlp.experts.h4toh.bias" in back
    with pytest.raises(ValueError, match=mentions("layers.2.mlp.", "layers.0.mlp.")):
        from_fastmoe_state_dict(sd, prefixes=["layers.2.mlp"])
    with pytest.raises(TypeError, match=mentions("prefixes", "'layers.0.mlp'")):
        from_fastmoe_state_dict(sd, prefixes="layers.0.mlp")


def test_module_version_metadata_is_kept():
    model = Model()
    own = model.state_dict()
    out = to_fastmoe_state_dict(own)
    assert out._metadata == own._metadata and out._metadata is not own._metadata
    model.load_state_dict(from_fastmoe_state_dict(out), strict=True)


# ----------------------------------------------------------------------------------------------- expert parallelism


def ep_rank_state_dicts(gen, world_size=2, num_expert=2):
    """FastMoE's per-rank files of an EP layer: the same gate over all experts on every rank, local experts each."""
    gate = fastmoe_per_expert_block(gen, num_expert=num_expert, world_size=world_size)
    ranks = []
    for _ in range(world_size):
        sd = fastmoe_per_expert_block(gen, num_expert=num_expert, world_size=world_size)
        sd["gate.gate.weight"], sd["gate.gate.bias"] = gate["gate.gate.weight"], gate["gate.gate.bias"]
        ranks.append(sd)
    return ranks


def global_reference_weights(ranks, num_expert):
    """The EP layer's global weights: rank r's local expert e is global expert r * num_expert + e."""
    parts = [reference_weights(sd, num_expert=num_expert) for sd in ranks]
    return parts[0][:2] + tuple(torch.cat([p[i] for p in parts]) for i in range(2, 6))


def test_merge_gives_the_one_rank_model_and_split_gives_the_ranks_back():
    gen = make_generator(7)
    ranks = ep_rank_state_dicts(gen)
    converted = [from_fastmoe_state_dict(sd) for sd in ranks]
    merged = merge_ep_state_dicts(converted)
    layer = FMoETransformerMLP(num_expert=4, d_model=D_MODEL, d_hidden=D_HIDDEN).double()
    layer.load_state_dict(merged, strict=True)
    x = randn(NUM_TOKENS, D_MODEL, gen=gen)
    torch.testing.assert_close(layer(x), reference_moe_mlp(x, *global_reference_weights(ranks, 2), 2, F.gelu))
    for rank, shard in enumerate(split_ep_state_dict(layer.state_dict(), 2)):
        assert_same_state_dict(to_fastmoe_state_dict(shard), ranks[rank], ordered=False)


def _ep_body(rank, world_size, rank_state_dicts, x):
    layer = FMoETransformerMLP(num_expert=2, d_model=D_MODEL, d_hidden=D_HIDDEN, world_size=world_size).double()
    layer.load_state_dict(from_fastmoe_state_dict(rank_state_dicts[rank]), strict=True)
    return layer(x).detach()


def test_one_ranks_file_loads_into_that_ranks_expert_parallel_layer():
    """A FastMoE rank's file holds the whole gate and that rank's experts: converted, it loads into the rank's
    world_size=2 layer, and the EP layer computes the MoE of the global weights on every rank."""
    gen = make_generator(8)
    ranks = ep_rank_state_dicts(gen)
    x = randn(NUM_TOKENS, D_MODEL, gen=gen)
    outputs = run_workers(2, _ep_body, ranks, x)
    expected = reference_moe_mlp(x, *global_reference_weights(ranks, 2), 2, F.gelu)
    for out in outputs:
        torch.testing.assert_close(out, expected)


# ----------------------------------------------------------------------------------------------- bad input


def _drop(sd, *keys):
    return collections.OrderedDict((k, v) for k, v in sd.items() if k not in keys)


def _replace(sd, key, value):
    out = collections.OrderedDict(sd)
    out[key] = value
    return out


def bad_fastmoe_cases():
    gen = make_generator(9)
    sd = fastmoe_per_expert_block(gen, prefix="layers.3.mlp.")
    p = "layers.3.mlp.experts."
    gap = _drop(sd, *(f"{p}1.{q}" for q in ("htoh4.weight", "htoh4.bias", "h4toh.weight", "h4toh.bias")))
    return [
        pytest.param(gap, ValueError, ("layers.3.mlp.", "[0, 2]"), id="gap-in-expert-ids"),
        pytest.param(
            _replace(sd, f"{p}2.htoh4.weight", torch.zeros(1, D_HIDDEN + 1, D_MODEL, dtype=torch.float64)),
            ValueError,
            (f"{p}2.htoh4.weight", f"[1, {D_HIDDEN + 1}, {D_MODEL}]"),
            id="expert-counts-or-sizes-differ",
        ),
        pytest.param(_drop(sd, f"{p}1.h4toh.bias"), ValueError, (f"{p}1.h4toh.bias", "missing"), id="missing-bias"),
        pytest.param(
            _replace(sd, f"{p}0.htoh4.weight", torch.zeros(2, D_HIDDEN, D_MODEL, dtype=torch.float64)),
            ValueError,
            (f"{p}0.htoh4.weight", f"[2, {D_HIDDEN}, {D_MODEL}]"),
            id="leading-dim-not-1",
        ),
        pytest.param(
            _replace(sd, f"{p}0.activation.weight", torch.ones(1)),
            ValueError,
            (f"{p}0.activation.weight", "layers.3.mlp."),
            id="unknown-expert-entry",
        ),
        pytest.param(
            _replace(sd, f"{p}1.h4toh.weight", sd[f"{p}1.h4toh.weight"].float()),
            ValueError,
            (f"{p}1.h4toh.weight", "torch.float32"),
            id="mixed-dtypes",
        ),
        pytest.param(
            _replace(sd, f"{p}htoh4.weight", torch.zeros(3, D_HIDDEN, D_MODEL)),
            ValueError,
            (f"{p}htoh4.weight", "mixes"),
            id="per-expert-and-fused",
        ),
        pytest.param([("a", 1)], TypeError, ("state_dict", "list"), id="not-a-mapping"),
    ]


@pytest.mark.parametrize("sd,error,words", bad_fastmoe_cases())
def test_from_fastmoe_errors_name_the_key_and_shapes(sd, error, words):
    with pytest.raises(error, match=mentions(*words)):
        from_fastmoe_state_dict(sd)


def test_to_fastmoe_errors_name_the_key_and_shapes():
    swiglu = FMoETransformerMLP(num_expert=2, d_model=D_MODEL, d_hidden=D_HIDDEN, activation="swiglu")
    with pytest.raises(ValueError, match=mentions("experts.h4toh.weight", "swiglu")):
        to_fastmoe_state_dict(swiglu.state_dict())
    own = FMoETransformerMLP(num_expert=2, d_model=D_MODEL, d_hidden=D_HIDDEN).state_dict()
    with pytest.raises(ValueError, match=mentions("layout", "'grouped'")):
        to_fastmoe_state_dict(own, layout="grouped")
    with pytest.raises(ValueError, match=mentions("experts.htoh4.bias", f"[3, {D_HIDDEN}]")):
        to_fastmoe_state_dict(_replace(own, "experts.htoh4.bias", torch.zeros(3, D_HIDDEN)))
    with pytest.raises(ValueError, match=mentions("experts.h4toh.weight", "no")):
        to_fastmoe_state_dict(_drop(own, "experts.h4toh.weight"))


def test_merge_and_split_errors_name_the_key_ranks_and_sizes():
    gen = make_generator(10)
    ranks = [from_fastmoe_state_dict(sd) for sd in ep_rank_state_dicts(gen)]
    other_gate = _replace(ranks[1], "gate.gate.bias", ranks[1]["gate.gate.bias"] + 1)
    with pytest.raises(ValueError, match=mentions("gate.gate.bias", "rank 1")):
        merge_ep_state_dicts([ranks[0], other_gate])
    three = from_fastmoe_state_dict(fastmoe_per_expert_block(gen, num_expert=3, world_size=2))
    with pytest.raises(ValueError, match=mentions("rank 1", f"[3, {D_HIDDEN}, {D_MODEL}]")):
        merge_ep_state_dicts([ranks[0], three])
    with pytest.raises(ValueError, match=mentions("from_fastmoe_state_dict", "experts.0.htoh4.weight")):
        merge_ep_state_dicts([ranks[0], to_fastmoe_state_dict(ranks[1])])
    with pytest.raises(TypeError, match=mentions("state_dicts", "OrderedDict")):
        merge_ep_state_dicts(ranks[0])
    with pytest.raises(ValueError, match=mentions("experts.htoh4.weight", "world_size=3")):
        split_ep_state_dict(merge_ep_state_dicts(ranks), 3)
    with pytest.raises(ValueError, match=mentions("world_size", "0")):
        split_ep_state_dict(ranks[0], 0)
