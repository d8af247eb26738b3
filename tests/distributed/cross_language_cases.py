"""The Python layers against the C++ fastmoe::nn modules: the comparison both cross-language tests use
(tests/nn/test_cross_language.py on one process, tests/distributed/test_cross_language_ep.py with expert
parallelism) and the body the expert-parallel test runs on every rank (dist_harness.run_workers).

Each Python layer has a C++ counterpart built by ``torch.ops.fastmoe_testing.run_layer`` (tests/cpp/
nn_testing_ops.cpp), with the default NaiveGate (with bias) in both:

    "transformer_mlp"         fastmoe.FMoETransformerMLP             fastmoe::nn::TransformerMLP (kGELU)
    "transformer_mlp_swiglu"  FMoETransformerMLP(activation="swiglu") TransformerMLP (kSwiGLU)
    "transformer_mlp_swiglu_nobias"  the same without expert biases: the experts apply the routing scores in the
                              activation (TokenDispatch.row_scores) and the combine only sums
    "moe"                     fastmoe.FMoE(expert=Linear->GELU->Linear) fastmoe::nn::MoE(options, make_expert)

The comparison is bitwise (conftest.assert_bitwise_equal), not within a tolerance, because both layers run in the
same process, with the same thread count and on the same device, and call the same ATen and fastmoe kernels (the
gate's linear and the naive_gate op, the token path of fastmoe::TokenDispatch with its exchanges, grouped_linear or
each expert's nn.Linear and activation, the weighted combine) on the same values in the same shapes, with buffers
from the same allocator: each sum runs in the same order on both sides, whatever the CPU (docs/numerics.md, "What is
bitwise on any CPU, and what is not")."""

import torch
import torch.distributed as dist
from ep_cases import device_for
from torch import nn

import fastmoe
from conftest import assert_bitwise_equal, make_generator

D_MODEL, D_HIDDEN, TOP_K = 10, 12, 2  # d_model not a multiple of 8: the activations' scalar tails run too
LAYERS = ["transformer_mlp", "transformer_mlp_swiglu", "transformer_mlp_swiglu_nobias", "moe"]


def mlp_expert(d: int) -> nn.Module:
    """The Python expert of the "moe" layer; the C++ one (MlpExpert) registers its linears as "0" and "2" too."""
    return nn.Sequential(nn.Linear(d, D_HIDDEN), nn.GELU(), nn.Linear(D_HIDDEN, d))


def randomize_(module: nn.Module, seed: int) -> None:
    """Every parameter drawn afresh (the experts' biases start at zero), in fp64 and cast."""
    gen = make_generator(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64).mul_(0.4))


def python_layer(
    layer: str, num_local: int, dtype, device, world_size: int = 1, ep_chunks: int = 1, seed: int = 0, **travel
):
    """The Python layer of ``layer`` with random parameters: the gate from ``seed`` (alike on every rank), the
    experts from ``seed`` and the expert-parallel rank (different on every rank). ``travel``: FMoE's ep_exchange,
    ep_local_size, ep_replicate and ep_replicate_rates."""
    kwargs = {"top_k": TOP_K, "world_size": world_size, "ep_chunks": ep_chunks, **travel}
    if layer == "moe":
        module = fastmoe.FMoE(num_local, D_MODEL, expert=mlp_expert, **kwargs)
    else:
        activation = "swiglu" if layer.startswith("transformer_mlp_swiglu") else None
        bias = layer != "transformer_mlp_swiglu_nobias"
        module = fastmoe.FMoETransformerMLP(num_local, D_MODEL, D_HIDDEN, activation=activation, bias=bias, **kwargs)
    randomize_(module.gate, seed)
    randomize_(module.experts, seed + 1 + module.moe_rank)
    return module.to(device=device, dtype=dtype)


def cpp_name(layer: str, name: str) -> str:
    """The C++ name of a Python parameter. They agree but for the experts of "moe": Python's ModuleList holds
    ``experts.{e}.{0,2}.{weight,bias}``, the C++ MoE registers ``expert{e}.{0,2}.{weight,bias}``."""
    if layer == "moe" and name.startswith("experts."):
        _, expert, rest = name.split(".", 2)
        return f"expert{expert}.{rest}"
    return name


def compare(layer: str, module: nn.Module, x, grad_y, group_name: str = "", label: str = "") -> int:
    """Runs the C++ layer (same parameters) and ``module`` forward on ``x`` and backward with ``grad_y``, both under
    the caller's autocast state, and asserts that the outputs and the gradients of the input and of every parameter
    are bitwise equal. Returns the number of tensors compared."""
    names = [name for name, _ in module.named_parameters()]
    params = [param.detach() for param in module.parameters()]
    got = torch.ops.fastmoe_testing.run_layer(
        layer,
        x,
        grad_y,
        [cpp_name(layer, name) for name in names],
        params,
        module.num_expert,
        D_HIDDEN,
        module.top_k,
        module.world_size,
        group_name,
        module.ep_chunks,
        *module._ep_subgroups,  # the hierarchical exchange's sub-groups, or ("", "")
        module.ep_replicate,
        *(module.ep_replicate_rates or (0.0, 0.0)),
    )
    module.zero_grad(set_to_none=True)
    x_py = x.detach().clone().requires_grad_(True)
    y = module(x_py)
    y.backward(grad_y)
    want = [y.detach(), x_py.grad] + [
        p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()
    ]
    labels = ["y", "grad_x"] + [f"grad {name}" for name in names]
    assert len(got) == len(want), f"{label}run_layer returned {len(got)} tensors, expected {len(want)}"
    for what, a, b in zip(labels, got, want, strict=True):
        assert_bitwise_equal(a, b, f"{label}{what}")
    return len(labels)


def expert_parallel(rank, world, backend, lib_path, layer, cases):
    """On every rank, with the op library at ``lib_path`` loaded: the expert-parallel Python layer (2 local experts,
    world_size=W on the default group) against the C++ layer on the same group, for each (dtype, ep_chunks, tokens
    per rank) in ``cases``. The ranks' inputs differ, and so do their experts. Returns the number of tensors
    compared."""
    torch.ops.load_library(lib_path)
    device = device_for(rank, backend)
    group = dist.group.WORLD.group_name
    compared = 0
    for dtype, ep_chunks, tokens in cases:
        module = python_layer(layer, 2, dtype, device, world_size=world, ep_chunks=ep_chunks, seed=10)
        gen = make_generator(100 + rank)
        x = torch.randn(tokens[rank], D_MODEL, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        grad_y = torch.randn(tokens[rank], D_MODEL, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        label = f"rank {rank} {layer} {dtype} ep_chunks={ep_chunks} tokens={tokens}: "
        compared += compare(layer, module, x, grad_y, group, label)
    return compared


def hierarchical_and_replicated(rank, world, backend, lib_path):
    """On every rank of W = 4: the layers with the hierarchical exchange (nodes of 2 ranks; TransformerMLP and MoE)
    and TransformerMLP with hot-expert replication under a skewed router (expert 0 first for every token) against
    their C++ counterparts given the same sub-groups and replication settings, bitwise. Returns the number of
    tensors compared and the experts the replicated layer copied."""
    torch.ops.load_library(lib_path)
    device = device_for(rank, backend)
    group = dist.group.WORLD.group_name
    gen = make_generator(300 + rank)
    tokens = [12, 5, 0, 9][rank]  # rank 2 has no tokens
    x = torch.randn(tokens, D_MODEL, generator=gen, dtype=torch.float64).to(device)
    grad_y = torch.randn(tokens, D_MODEL, generator=gen, dtype=torch.float64).to(device)
    compared = 0
    for layer in ("transformer_mlp", "moe"):
        module = python_layer(
            layer, 2, torch.float64, device, world, seed=10, ep_exchange="hierarchical", ep_local_size=2
        )
        compared += compare(layer, module, x, grad_y, group, f"rank {rank} {layer} hierarchical: ")
    for layer in ("transformer_mlp", "transformer_mlp_swiglu_nobias"):  # weighted and scored copies
        module = python_layer(
            layer, 2, torch.float64, device, world, seed=10, ep_replicate=2, ep_replicate_rates=(1e9, 1e12)
        )
        with torch.no_grad():
            module.gate.gate.bias[0] += 50.0
        compared += compare(layer, module, x, grad_y, group, f"rank {rank} {layer} replicated: ")
    return compared, module.replicated_experts
