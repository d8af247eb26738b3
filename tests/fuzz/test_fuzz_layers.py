"""Fuzzing of the public layers: constructors with one argument broken at random must raise an error naming the
argument and the value; valid layers of random sizes, gates and activations take inputs of random shapes
(0 tokens included) and memory layouts and match a per-token plain-PyTorch reference, forward and backward
without a crash; inputs of the wrong width, dtype, device or type are rejected by name.

The budget is the same ``--fuzz-cases`` as tests/fuzz/test_fuzz_ops.py (a fifth of it for the forward cases,
which each build a layer).
"""

import random
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DEVICE_PARAMS, mentions
from fastmoe import FMoE, FMoELinear, FMoETransformerMLP, gates
from fastmoe.transformer import swiglu
from fuzz_data import layout

BAD_INTS = [0, -1, -(2**40), 2.5, True, "2", None, float("nan")]
BAD_FLOATS = [-1.0, float("nan"), float("inf"), "0.1", None]
GATES = {
    "NaiveGate": (gates.NaiveGate, None),
    "NoisyGate": (gates.NoisyGate, None),
    "GShardGate": (gates.GShardGate, 2),
    "SwitchGate": (gates.SwitchGate, 1),
    "SwipeGate": (gates.SwipeGate, None),
    "ExpertChoiceGate": (gates.ExpertChoiceGate, None),
    "SigmoidGate": (gates.SigmoidGate, None),
}
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swiglu": swiglu}


# ----------------------------------------------------------------------------------------------- constructors


def _valid_args(rng: random.Random, target: str) -> dict:
    E = rng.randint(1, 6)
    args = {"num_expert": E, "d_model": rng.randint(1, 9)}
    if target in GATES:
        fixed_k = GATES[target][1]
        args.update(world_size=1, top_k=fixed_k or rng.randint(1, E))
        if target in ("NaiveGate", "SwipeGate", "GShardGate", "SwitchGate"):
            args["z_loss_coef"] = rng.choice([0.0, 0.01])
        if target == "GShardGate":
            args["num_expert"] = max(E, 2)
        return args
    if target == "FMoELinear":
        return {"num_expert": E, "in_feat": rng.randint(1, 9), "out_feat": rng.randint(1, 9)}
    args["top_k"] = rng.randint(1, E)
    if target == "FMoETransformerMLP":
        args.update(d_hidden=rng.randint(1, 9), activation=rng.choice(list(ACTIVATIONS)))
    else:
        args["expert"] = lambda d: nn.Linear(d, d)
    return args


def _build(target: str, args: dict):
    if target in GATES:
        cls = GATES[target][0]
        return cls(args.pop("d_model"), args.pop("num_expert"), **args)
    if target == "FMoELinear":
        return FMoELinear(**args)
    return (FMoETransformerMLP if target == "FMoETransformerMLP" else FMoE)(**args)


def _break_one(rng: random.Random, target: str, args: dict):
    """Breaks one argument; returns (argument, bad value, the exception types it may raise)."""
    ints = [name for name in ("num_expert", "d_model", "d_hidden", "in_feat", "out_feat", "top_k") if name in args]
    floats = [name for name in ("z_loss_coef",) if name in args]
    extra = []
    if target == "FMoETransformerMLP":
        extra.append("activation")
    if target in ("FMoE", "FMoETransformerMLP"):
        extra.append("world_size")
    name = rng.choice(ints + floats + extra)
    if name in ints:
        bad = BAD_INTS + ([args["num_expert"] + rng.randint(1, 4)] if name == "top_k" else [])
        if name == "top_k" and target in GATES and GATES[target][1] is not None:
            bad = [v for v in bad if v is not None]  # a gate of fixed k takes top_k=None as its default
        value = rng.choice(bad)
    elif name in floats:
        value = rng.choice(BAD_FLOATS)
    elif name == "activation":
        value = rng.choice(["gleu", "", 3, None])
        if value is None:
            name, value = "world_size", 0  # activation=None means the default GELU
    else:
        value = rng.choice([0, -2, 2, 8])
    expected = (ValueError, TypeError, NotImplementedError)
    if name == "world_size" and value > 1:
        expected = (RuntimeError,)  # expert parallelism without torch.distributed initialised
    return name, value, expected


@pytest.mark.parametrize("target", ["FMoE", "FMoETransformerMLP", "FMoELinear", *GATES])
def test_fuzz_constructor(target, fuzz_budget):
    num_cases, first_seed = fuzz_budget
    failures = []
    for i in range(max(1, num_cases // 3)):
        rng = random.Random(f"ctor-{target}-{first_seed + i}")
        args = _valid_args(rng, target)
        if rng.random() < 0.3:
            try:
                _build(target, dict(args))
            except Exception as error:  # noqa: BLE001
                failures.append(f"seed {first_seed + i}: valid {args} raised {type(error).__name__}: {error}")
            continue
        name, value, expected = _break_one(rng, target, args)
        args[name] = value
        try:
            _build(target, dict(args))
        except expected as error:
            if not re.search(mentions(name, repr(value)), str(error)):
                failures.append(f"seed {first_seed + i}: {name}={value!r}: message lacks the name/value: {error}")
        except Exception as error:  # noqa: BLE001
            failures.append(f"seed {first_seed + i}: {name}={value!r} raised {type(error).__name__}: {error}")
        else:
            failures.append(f"seed {first_seed + i}: {name}={value!r} was accepted")
    assert not failures, "\n".join(failures[:20])


# ----------------------------------------------------------------------------------------------- forward


def _random_layer(rng: random.Random, device: str, dtype):
    E = rng.randint(2, 5)
    d, h = rng.choice([1, 2, 3, 8]), rng.choice([1, 3, 4])
    gate_name = rng.choice(list(GATES))
    gate_cls, fixed_k = GATES[gate_name]
    k = fixed_k or rng.randint(1, E)
    torch.manual_seed(rng.getrandbits(31))
    if rng.random() < 0.7:
        activation = rng.choice(list(ACTIVATIONS))
        layer = FMoETransformerMLP(E, d, h, activation=activation, top_k=k, gate=gate_cls, bias=rng.random() < 0.7)
        with torch.no_grad():
            for p in layer.parameters():
                p.uniform_(-1, 1)  # biases start at zero; make them count
    else:
        layer = FMoE(E, d, top_k=k, gate=gate_cls, expert=lambda width: nn.Linear(width, width))
    return layer.to(device=device, dtype=dtype).eval(), gate_name


def _expert_outputs(layer, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e`` applied to every token, from its parameters, in fp64."""
    x = x.double()
    if isinstance(layer, FMoETransformerMLP):
        up, down = layer.experts.htoh4, layer.experts.h4toh
        h = x @ up.weight[e].double().t() + (up.bias[e].double() if up.bias is not None else 0)
        h = layer.experts.activation(h)
        return h @ down.weight[e].double().t() + (down.bias[e].double() if down.bias is not None else 0)
    lin = layer.experts[e]
    return x @ lin.weight.double().t() + lin.bias.double()


def _reference(layer, x2d: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum_j score[t, j] * expert_{idx[t, j]}(x[t])`` over routed slots, from the layer's own gate."""
    with torch.no_grad():
        topk_idx, topk_score = layer.gate(x2d)
        y = torch.zeros(x2d.shape[0], layer.d_model, dtype=torch.float64, device=x2d.device)
        for e in range(layer.num_expert):
            weight = (topk_score.double() * (topk_idx == e)).sum(dim=-1, keepdim=True)
            if bool((topk_idx == e).any()):
                y = y + weight * _expert_outputs(layer, x2d, e)
    return y


def _random_input(rng: random.Random, layer, device, dtype) -> torch.Tensor:
    lead = rng.choice([(0,), (1,), (5,), (2, 3), (3, 0), (1, 1, 4)])
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    x = torch.randn(*lead, layer.d_model, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    if rng.random() < 0.15 and x.numel() > 0:
        return x.reshape(-1, layer.d_model)[:1].expand(x.reshape(-1, layer.d_model).shape[0], layer.d_model)
    return layout(rng, x)


def _bad_input(rng: random.Random, layer, x, device):
    """(what, call input, exception types, argument, value)."""
    kind = rng.choice(["width", "dtype", "int", "device", "list", "none", "scalar"])
    d = layer.d_model
    if kind == "width":
        bad = torch.randn(3, d + 1, dtype=x.dtype, device=device)
        return kind, bad, ValueError, "inp", f"(3, {d + 1})"
    if kind == "dtype":
        other = torch.float64 if x.dtype == torch.float32 else torch.float32
        return kind, x.to(other), TypeError, "inp", str(other)
    if kind == "int":
        return kind, torch.ones(2, d, dtype=torch.int64, device=device), TypeError, "inp", "torch.int64"
    if kind == "device":
        other = "meta" if device == "cpu" else "cpu"
        return kind, x.to(other), ValueError, "inp", other
    if kind == "list":
        return kind, [[0.0] * d], TypeError, "inp", "list"
    if kind == "none":
        return kind, None, TypeError, "inp", "NoneType"
    return kind, torch.tensor(1.0, dtype=x.dtype, device=device), ValueError, "inp", "()"


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_fuzz_layer_forward(device, fuzz_budget):
    num_cases, first_seed = fuzz_budget
    failures = []
    for i in range(max(1, num_cases // 5)):
        seed = first_seed + i
        rng = random.Random(f"forward-{seed}")
        dtype = rng.choice([torch.float32, torch.float64])
        layer, gate_name = _random_layer(rng, device, dtype)
        x = _random_input(rng, layer, device, dtype)
        tag = f"seed {seed} ({type(layer).__name__}, {gate_name}, {dtype}, input {tuple(x.shape)})"
        if rng.random() < 0.35:
            kind, bad, exc, arg, value = _bad_input(rng, layer, x, device)
            try:
                layer(bad)
            except exc as error:
                if not re.search(mentions(arg, value), str(error)):
                    failures.append(f"{tag} {kind}: message lacks {arg!r}/{value!r}: {error}")
            except Exception as error:  # noqa: BLE001
                failures.append(f"{tag} {kind}: raised {type(error).__name__}: {error}")
            else:
                failures.append(f"{tag} {kind}: was accepted")
            continue
        try:
            leaf = x.detach().clone().requires_grad_(True)
            y = layer(leaf)
            assert y.shape == x.shape, f"output shape {tuple(y.shape)}"
            expected = _reference(layer, x.reshape(-1, layer.d_model)).reshape(x.shape)
            tol = 1e-9 if dtype == torch.float64 else 2e-4
            err = (y.double() - expected).abs().max().item() if y.numel() else 0.0
            assert err <= tol * max(1.0, expected.abs().max().item() if y.numel() else 1.0), f"max error {err:.2e}"
            (y.square().sum() + layer.get_loss()).backward()
            assert leaf.grad is not None and bool(torch.isfinite(leaf.grad).all()), "input gradient not finite"
        except Exception as error:  # noqa: BLE001
            failures.append(f"{tag}: {type(error).__name__}: {error}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])
