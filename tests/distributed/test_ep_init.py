"""Expert-parallel initialisation, with W = 2 gloo ranks on the CPU: seeded alike, the ranks of an EP layer hold
the matching experts of the one-rank layer (``num_expert * W`` experts) built from the same seed, bit for bit,
not copies of each other, and leave the default generator where the one-rank layer leaves it, so the modules
built after the layer match too. The C++ layers (through the test-only op library) follow the same rule and
start with the Python layer's values.

One spawn builds every layer on both ranks (module-scoped fixture); the parent builds the one-rank references."""

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_workers
from test_expert_parallel import NN_LIB, needs_nn_lib
from torch import nn

from conftest import assert_bitwise_equal
from fastmoe import FMoE, FMoETransformerMLP
from fastmoe.train.model import GPT, ModelConfig

WORLD, NUM_LOCAL, D_MODEL, D_HIDDEN, SEED = 2, 2, 6, 10, 2024
PY_KINDS = ["mlp", "mlp_swiglu", "modules", "module_list", "gpt"]
# C++ layer (initial_parameters in tests/cpp/nn_testing_ops.cpp) -> the Python layer it must equal
CPP_KINDS = {"transformer_mlp": "mlp", "transformer_mlp_swiglu": "mlp_swiglu", "moe": "modules"}


def mlp_expert(d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, D_HIDDEN), nn.GELU(), nn.Linear(D_HIDDEN, d))


def linear_expert(d: int) -> nn.Module:
    return nn.Linear(d, d)


# expert=[callables]: global expert g is made by LIST_MAKERS[g]; each rank passes its own slice (both ranks get
# the same kinds of module, so their parameters can be compared by name)
LIST_MAKERS = [mlp_expert, linear_expert, mlp_expert, linear_expert]


def build(kind: str, num_expert: int, world_size: int, first_expert: int) -> nn.Module:
    if kind == "gpt":  # the training job's model, whose own init redraws the experts' output weights
        config = ModelConfig(d_model=D_MODEL, n_layers=2, n_heads=2, d_ff=8, num_experts=num_expert * world_size)
        return GPT(config, world_size=world_size)
    if kind in ("mlp", "mlp_swiglu"):
        activation = "swiglu" if kind == "mlp_swiglu" else None
        return FMoETransformerMLP(num_expert, D_MODEL, D_HIDDEN, activation=activation, world_size=world_size)
    makers = mlp_expert if kind == "modules" else LIST_MAKERS[first_expert : first_expert + num_expert]
    return FMoE(num_expert, D_MODEL, world_size=world_size, expert=makers)


def after_seeding(make) -> tuple:
    """``make()`` right after ``torch.manual_seed(SEED)``: its parameters (in order), the CPU generator's state
    after it, and the parameters of an nn.Linear built after it (a replicated module later in the model)."""
    torch.manual_seed(SEED)
    params = make()
    state = torch.get_rng_state()
    later = nn.Linear(D_MODEL, D_MODEL)
    return params, state, [later.weight.detach(), later.bias.detach()]


def named(layer: nn.Module) -> dict:
    return {name: p.detach() for name, p in layer.named_parameters()}


def to_numpy(value):
    """Tensors (in tuples, lists and dicts) as numpy arrays, which travel back to the parent by value (a tensor
    would travel as shared memory that dies with the worker)."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: to_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_numpy(v) for v in value)
    return value


def from_numpy(value):
    if isinstance(value, dict):
        return {k: from_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(from_numpy(v) for v in value)
    return torch.from_numpy(value)


def body(rank, world_size, lib_path):
    results = {}
    for kind in PY_KINDS:
        results[kind] = after_seeding(lambda k=kind: named(build(k, NUM_LOCAL, world_size, rank * NUM_LOCAL)))
    if lib_path is not None:
        torch.ops.load_library(lib_path)
        group = dist.group.WORLD.group_name
        for kind in CPP_KINDS:
            results[kind] = after_seeding(
                lambda k=kind: list(
                    torch.ops.fastmoe_testing.initial_parameters(k, NUM_LOCAL, D_MODEL, D_HIDDEN, world_size, group)
                )
            )
    return to_numpy(results)


@pytest.fixture(scope="module")
def ranks():
    return [from_numpy(result) for result in run_workers(WORLD, body, NN_LIB, timeout=120.0)]


def one_rank(kind: str) -> tuple:
    return after_seeding(lambda: named(build(kind, NUM_LOCAL * WORLD, 1, 0)))


def expected_local(reference: dict, rank: int) -> dict:
    """The parameters rank ``rank`` of the EP layer must hold, by name, in its order, from the one-rank layer's."""
    lo, fused = rank * NUM_LOCAL, any(name.endswith("experts.htoh4.weight") for name in reference)
    out = {}
    for name, value in reference.items():
        prefix, found, within = name.partition("experts.")
        if not found or (prefix and not prefix.endswith(".")):
            out[name] = value
        elif fused:
            out[name] = value[lo : lo + NUM_LOCAL]
        else:
            index, rest = within.split(".", 1)
            if lo <= int(index) < lo + NUM_LOCAL:
                out[f"{prefix}experts.{int(index) - lo}.{rest}"] = value
    return out


@pytest.mark.parametrize("kind", PY_KINDS)
def test_ep_ranks_hold_the_experts_of_the_one_rank_layer(ranks, kind):
    reference = one_rank(kind)[0]
    for rank, result in enumerate(ranks):
        params, want = result[kind][0], expected_local(reference, rank)
        assert list(params) == list(want), f"rank {rank}: parameter names"
        for name, value in params.items():
            assert_bitwise_equal(value, want[name], f"{kind} rank {rank} {name}")


@pytest.mark.parametrize("kind", PY_KINDS)
def test_ep_ranks_hold_different_experts(ranks, kind):
    per_rank = [result[kind][0] for result in ranks]
    # the fused biases start at zero on every expert
    names = [n for n in per_rank[0] if "experts." in n and not n.endswith(("experts.htoh4.bias", "experts.h4toh.bias"))]
    assert names and list(per_rank[0]) == list(per_rank[1])
    for name in names:
        assert not torch.equal(per_rank[0][name], per_rank[1][name]), f"{kind} {name}: rank 1 repeats rank 0"


@pytest.mark.parametrize("kind", PY_KINDS)
def test_default_generator_after_the_layer_does_not_depend_on_the_world_size(ranks, kind):
    _, want_state, want_later = one_rank(kind)
    for rank, result in enumerate(ranks):
        _, state, later = result[kind]
        assert torch.equal(state, want_state), f"{kind} rank {rank}: the CPU generator's state differs"
        for got, want in zip(later, want_later, strict=True):
            assert_bitwise_equal(got, want, f"{kind} rank {rank}: the module built after the layer")


@needs_nn_lib
@pytest.mark.parametrize("kind", list(CPP_KINDS))
def test_cpp_ep_ranks_start_as_the_python_one_rank_layer(ranks, kind):
    reference, want_state, want_later = one_rank(CPP_KINDS[kind])
    for rank, result in enumerate(ranks):
        params, state, later = result[kind]
        want = expected_local(reference, rank)
        assert len(params) == len(want), f"{kind} rank {rank}: {len(params)} parameters, expected {list(want)}"
        for value, (name, expected) in zip(params, want.items(), strict=True):
            assert_bitwise_equal(value, expected, f"C++ {kind} rank {rank} {name}")
        assert torch.equal(state, want_state), f"C++ {kind} rank {rank}: the CPU generator's state differs"
        for got, expected in zip(later, want_later, strict=True):
            assert_bitwise_equal(got, expected, f"C++ {kind} rank {rank}: the module built after the layer")
