"""Bad input to the nn front ends (FMoE, FMoETransformerMLP, FMoELinear, NaiveGate): constructors and
forwards reject wrong values, shapes, dtypes and devices with an error naming the argument and the value."""

import pytest
import torch
from torch import nn

from conftest import mentions
from fastmoe import FMoE, FMoELinear, FMoETransformerMLP
from fastmoe.gates import NaiveGate

D = 6


def linear_expert(d):
    return nn.Linear(d, d)


def fmoe(**kwargs):
    return FMoE(**{"num_expert": 4, "d_model": D, "top_k": 2, "expert": linear_expert, **kwargs})


def mlp(**kwargs):
    return FMoETransformerMLP(**{"num_expert": 4, "d_model": D, "d_hidden": 8, "top_k": 2, **kwargs})


CONSTRUCTOR_CASES = [
    # FMoE
    ("FMoE-num_expert-0", lambda: fmoe(num_expert=0), ValueError, ("num_expert", "0")),
    ("FMoE-num_expert-float", lambda: fmoe(num_expert=2.5), ValueError, ("num_expert", "2.5")),
    ("FMoE-num_expert-bool", lambda: fmoe(num_expert=True), ValueError, ("num_expert", "True")),
    ("FMoE-d_model-negative", lambda: fmoe(d_model=-4), ValueError, ("d_model", "-4")),
    ("FMoE-world_size-0", lambda: fmoe(world_size=0), ValueError, ("world_size", "0")),
    ("FMoE-world_size-2", lambda: fmoe(world_size=2), RuntimeError, ("world_size=2", "init_process_group")),
    ("FMoE-moe_group", lambda: fmoe(moe_group="group"), RuntimeError, ("moe_group='group'", "init_process_group")),
    ("FMoE-mask", lambda: fmoe(mask="m"), NotImplementedError, ("mask", "'m'")),
    ("FMoE-mp_group", lambda: fmoe(mp_group="g"), NotImplementedError, ("mp_group", "'g'")),
    ("FMoE-top_k-0", lambda: fmoe(top_k=0), ValueError, ("top_k", "0")),
    ("FMoE-top_k-gt-E", lambda: fmoe(top_k=5), ValueError, ("top_k", "5")),
    ("FMoE-top_k-str", lambda: fmoe(top_k="2"), ValueError, ("top_k", "'2'")),
    ("FMoE-gate-int", lambda: fmoe(gate=5), TypeError, ("gate", "5")),
    ("FMoE-expert-int", lambda: fmoe(expert=5), TypeError, ("expert", "5")),
    ("FMoE-expert-list-length", lambda: fmoe(expert=[linear_expert] * 3), ValueError, ("expert", "3")),
    # FMoETransformerMLP
    ("MLP-num_expert-0", lambda: mlp(num_expert=0), ValueError, ("num_expert", "0")),
    ("MLP-d_hidden-0", lambda: mlp(d_hidden=0), ValueError, ("d_hidden", "0")),
    ("MLP-d_model-str", lambda: mlp(d_model="6"), ValueError, ("d_model", "'6'")),
    ("MLP-top_k-gt-E", lambda: mlp(top_k=9), ValueError, ("top_k", "9")),
    ("MLP-activation-name", lambda: mlp(activation="gleu"), ValueError, ("activation", "'gleu'")),
    ("MLP-activation-type", lambda: mlp(activation=3), TypeError, ("activation", "3")),
    ("MLP-world_size-4", lambda: mlp(world_size=4), RuntimeError, ("world_size=4", "init_process_group")),
    # A gate built for another layer: expert 3 of 4 would never be used, or ids would run past the experts.
    ("MLP-gate-fewer-experts", lambda: mlp(gate=NaiveGate(D, 3)), ValueError, ("3 experts", "has 4")),
    ("FMoE-gate-more-experts", lambda: fmoe(gate=NaiveGate(D, 8)), ValueError, ("8 experts", "has 4")),
    ("FMoE-gate-other-width", lambda: fmoe(gate=NaiveGate(D + 1, 4)), ValueError, ("d_model=7", "d_model=6")),
    # FMoELinear
    ("FMoELinear-num_expert-0", lambda: FMoELinear(0, 4, 4), ValueError, ("num_expert", "0")),
    ("FMoELinear-in_feat-0", lambda: FMoELinear(2, 0, 4), ValueError, ("in_feat", "0")),
    ("FMoELinear-out_feat-negative", lambda: FMoELinear(2, 4, -1), ValueError, ("out_feat", "-1")),
    # NaiveGate
    ("NaiveGate-d_model-0", lambda: NaiveGate(0, 4, 1, 2), ValueError, ("d_model", "0")),
    ("NaiveGate-num_expert-0", lambda: NaiveGate(D, 0, 1, 1), ValueError, ("num_expert", "0")),
    ("NaiveGate-world_size-0", lambda: NaiveGate(D, 4, 0, 1), ValueError, ("world_size", "0")),
    ("NaiveGate-top_k-0", lambda: NaiveGate(D, 4, 1, 0), ValueError, ("top_k", "0")),
    ("NaiveGate-top_k-gt-E", lambda: NaiveGate(D, 4, 1, 5), ValueError, ("top_k", "5")),
]


@pytest.mark.parametrize("case", CONSTRUCTOR_CASES, ids=[case[0] for case in CONSTRUCTOR_CASES])
def test_constructor_rejects(case):
    _, build, exc_type, (arg, value) = case
    with pytest.raises(exc_type, match=mentions(arg, value)):
        build()


def _forward_cases():
    """(id, call, exception type, (argument, value)); the layers are float32 on the CPU."""
    torch.manual_seed(0)
    layers = {"FMoE": fmoe(), "MLP": mlp(), "NaiveGate": NaiveGate(D, 4, 1, 2)}
    x = torch.randn(5, D)
    cases = []
    for name, layer in layers.items():
        cases += [
            (f"{name}-width", lambda m=layer: m(torch.randn(5, D + 1)), ValueError, ("inp", "(5, 7)")),
            (f"{name}-scalar", lambda m=layer: m(torch.tensor(1.0)), ValueError, ("inp", "()")),
            (f"{name}-int", lambda m=layer: m(x.long()), TypeError, ("inp", "torch.int64")),
            (f"{name}-not-a-tensor", lambda m=layer: m(x.tolist()), TypeError, ("inp", "list")),
            # The input's dtype and device must match the layer's parameters; the error must say so about inp.
            (
                f"{name}-dtype-mismatch",
                lambda m=layer: m(x.double()),
                (TypeError, RuntimeError, ValueError),
                ("inp", "float64"),
            ),
            (
                f"{name}-meta-device",
                lambda m=layer: m(x.to("meta")),
                (RuntimeError, ValueError),
                ("inp", "meta"),
            ),
        ]
    lin = FMoELinear(3, D, 4)
    counts = torch.tensor([2, 2, 1])
    cases += [
        ("FMoELinear-width", lambda: lin(torch.randn(5, D + 1), counts), RuntimeError, ("x", "7")),
        ("FMoELinear-int", lambda: lin(x.long(), counts), RuntimeError, ("x", "Long")),
        ("FMoELinear-dtype-mismatch", lambda: lin(x.double(), counts), RuntimeError, ("x", "Double")),
        ("FMoELinear-meta-device", lambda: lin(x.to("meta"), counts), RuntimeError, ("x", "meta")),
        ("FMoELinear-counts-shape", lambda: lin(x, counts[:2]), ValueError, ("fwd_expert_count", "(2,)")),
        ("FMoELinear-counts-list", lambda: lin(x, [2, 2, 1]), ValueError, ("fwd_expert_count", "[2, 2, 1]")),
        (
            "FMoELinear-counts-too-many-rows",
            lambda: lin(x, torch.tensor([2, 2, 3])),
            RuntimeError,
            ("expert_offsets[3]", "7"),
        ),
        (
            "FMoELinear-counts-negative",
            lambda: lin(x, torch.tensor([2, -1, 3])),
            RuntimeError,
            ("expert_offsets", "offsets[1] = 2"),
        ),
        # Fractional counts must not be truncated silently into a different partition of the rows.
        (
            "FMoELinear-counts-float",
            lambda: lin(x, torch.tensor([2.5, 1.5, 1.0])),
            (TypeError, ValueError),
            ("fwd_expert_count", "float32"),
        ),
        (
            "FMoELinear-counts-and-offsets",
            lambda: lin(x, counts, expert_offsets=torch.tensor([0, 2, 4, 5])),
            ValueError,
            ("fwd_expert_count", "expert_offsets"),
        ),
        ("FMoELinear-neither", lambda: lin(x), ValueError, ("fwd_expert_count", "expert_offsets")),
    ]
    return cases


FORWARD_IDS = [case[0] for case in _forward_cases()]


@pytest.mark.parametrize("case_id", FORWARD_IDS)
def test_forward_rejects(case_id):
    ((_, call, exc_type, (arg, value)),) = [case for case in _forward_cases() if case[0] == case_id]
    with pytest.raises(exc_type, match=mentions(arg, value)):
        call()


def test_a_gate_built_for_the_layer_is_accepted():
    gate = NaiveGate(D, 2, 1, 2)
    layer = mlp(num_expert=2, gate=gate)
    assert layer.gate is gate


def test_forward_on_the_meta_device_derives_the_shape():
    """A layer built on the meta device runs its forward there (shape inference, deferred initialisation): every
    op has a Meta kernel, and the autocast query must not ask torch about a device type autocast does not know."""
    with torch.device("meta"):
        layer = mlp()
        y = layer(torch.empty(3, 5, D))
    assert y.device.type == "meta" and y.shape == (3, 5, D)
