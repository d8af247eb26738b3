"""Bodies of the hot-expert replication tests (test_replication.py), run on every rank by dist_harness.run_workers:
the copies of the experts' weights and their gradients, and layers with ep_replicate against the same layers
without it under skewed and balanced routers."""

import torch
import torch.distributed as dist
from torch import nn

import fastmoe
from conftest import assert_bitwise_equal, assert_within_policy

D_MODEL, D_HIDDEN, NUM_LOCAL = 8, 12, 2


def copies_and_their_gradients(rank, world):
    """replicate_experts: each copy equals its owner's row bit for bit, on every rank; the gradient each rank gives
    a copy is summed into the owner's weight (small integers, so exactly, whatever order the broadcast tree adds
    them in on the way back), and experts nobody copied get none. The sets mix owners, so some ranks forward two
    experts in one round (at W = 4, [1, 2]: rank 1 sends both to rank 3 in the second round). Returns the copied
    ids checked."""
    group = dist.group.WORLD.group_name
    total = NUM_LOCAL * world
    checked = []
    for experts in ([0], [total - 1], [1, 2], list(range(total)), []):
        # row e of rank r: global expert r * NUM_LOCAL + e, every entry labelled with it
        labels = torch.arange(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL, dtype=torch.float64)
        weight = (labels.view(-1, 1, 1) * 10 + torch.arange(6, dtype=torch.float64).view(1, 2, 3)).requires_grad_()
        copies = torch.ops.fastmoe.replicate_experts(weight, experts, NUM_LOCAL, group)
        assert copies.shape == (len(experts), 2, 3), f"{experts}: copies of shape {tuple(copies.shape)}"
        for i, g in enumerate(experts):
            expected = g * 10 + torch.arange(6, dtype=torch.float64).view(2, 3)
            assert_bitwise_equal(copies[i].detach(), expected, f"copy {i} of expert {g}")
        # rank r's gradient for copy i is (r + 1) * (i + 1): the owner gets the sum over ranks
        scale = torch.arange(1, len(experts) + 1, dtype=torch.float64).view(-1, 1, 1) * (rank + 1)
        copies.backward(torch.ones_like(copies) * scale)
        expected = torch.zeros_like(weight)
        for i, g in enumerate(experts):
            if g // NUM_LOCAL == rank:
                expected[g % NUM_LOCAL] = (i + 1) * world * (world + 1) / 2
        assert_bitwise_equal(weight.grad, expected, f"gradient of the owner's weight for {experts}")
        checked.append(experts)
    return checked


def _layer(world, dtype, skew, **replication):
    torch.manual_seed(11)
    layer = fastmoe.FMoETransformerMLP(NUM_LOCAL, D_MODEL, D_HIDDEN, top_k=2, world_size=world, **replication)
    if skew:  # expert 0 is every token's first choice: half of all slots, from every rank
        with torch.no_grad():
            layer.gate.gate.bias[0] += 50.0
    return layer.to(dtype)


def _balanced_gate(world):
    """Token i of every rank goes to experts i and i + 1 (mod E) with equal scores: every rank sends every expert
    the same number of slots, so no copy can lower the modelled step."""

    class Balanced(nn.Module):
        tot_expert = NUM_LOCAL * world

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            i = torch.arange(x.shape[0])
            idx = torch.stack([i % self.tot_expert, (i + 1) % self.tot_expert], dim=1)
            return idx, (self.scale * torch.full(idx.shape, 0.5, dtype=x.dtype))

    return Balanced()


def _expected_plan(layer, x, world, rates) -> list:
    """The policy run on loads gathered with torch.distributed (not through the layer), with the costs the layer
    derives from its rates: slot 6 P / gemm, row 4 d b / link, expert 2 P b / link."""
    with torch.no_grad():
        idx, _ = layer.gate(x)
    load = torch.bincount(idx.flatten(), minlength=NUM_LOCAL * world)
    loads = [torch.zeros_like(load) for _ in range(world)]
    dist.all_gather(loads, load)
    params = sum(p.numel() for p in layer.experts.parameters()) // NUM_LOCAL
    gemm, link = rates
    b = x.element_size()
    costs = (6 * params / gemm, 4 * D_MODEL * b / link, 2 * params * b / link)
    return torch.ops.fastmoe.plan_replication(torch.stack(loads), NUM_LOCAL, *costs, layer.ep_replicate)


def _run(layer, x, grad):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad)
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def layers_match_unreplicated(rank, world, tokens):
    """Skewed router (half of all slots to expert 0): the layer with ep_replicate copies what the policy picks on
    the gathered loads (at W = 4 the hot expert 0; at W = 2 copying it would only move the excess to the other
    rank) and gives the unreplicated layer's output and gradients (input, gate, experts), in fp64 to 1e-12 and in
    fp32 within the numerics policy (fastmoe fp32 against fp64 no worse than twice the unreplicated fp32's error),
    with 1 and 2 chunks. The balance record still reports the gate's load. A balanced router copies nothing.
    Returns, per case, the experts copied."""
    gen = torch.Generator().manual_seed(200 + rank)
    x = torch.randn(tokens[rank], D_MODEL, generator=gen, dtype=torch.float64)
    grad = torch.randn(tokens[rank], D_MODEL, generator=gen, dtype=torch.float64)
    # compute-bound rates: a copy pays for itself as soon as it evens out the experts' rows
    rates = {"ep_replicate": 2, "ep_replicate_rates": (1e9, 1e12)}
    copied = {}
    truth = _run(_layer(world, torch.float64, True), x, grad)
    for chunks in (1, 2):
        layer = _layer(world, torch.float64, True, ep_chunks=chunks, **rates)
        got = _run(layer, x, grad)
        copied[f"fp64 chunks={chunks}"] = layer.replicated_experts
        assert layer.replicated_experts == _expected_plan(layer, x, world, rates["ep_replicate_rates"]), (
            f"the layer copied {layer.replicated_experts}, the policy on the loads gathered here says otherwise"
        )
        counts = layer.balance_stats()["expert_counts"]
        plain = _layer(world, torch.float64, True)
        plain(x)
        assert counts == plain.balance_stats()["expert_counts"], f"balance record {counts} is not the gate's load"
        for name, a, b in (("output", got[0], truth[0]), ("grad of the input", got[1], truth[1])):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
        assert got[2].keys() == truth[2].keys(), f"gradients for {sorted(got[2])} vs {sorted(truth[2])}"
        for name, g in got[2].items():
            torch.testing.assert_close(g, truth[2][name], rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    plain32 = _run(_layer(world, torch.float32, True), x.float(), grad.float())
    layer32 = _layer(world, torch.float32, True, **rates)
    rep32 = _run(layer32, x.float(), grad.float())
    copied["fp32"] = layer32.replicated_experts
    assert_within_policy(rep32[0], truth[0], plain32[0], "fp32 output")
    assert_within_policy(rep32[1], truth[1], plain32[1], "fp32 grad of the input")
    for name, g in rep32[2].items():
        assert_within_policy(g, truth[2][name], plain32[2][name], f"fp32 grad of {name}")

    balanced = _layer(
        world, torch.float64, False, gate=_balanced_gate(world), ep_replicate=4, ep_replicate_rates=(1e9, 1e12)
    )
    plain = _layer(world, torch.float64, False, gate=_balanced_gate(world))
    balanced.load_state_dict(plain.state_dict())
    a, b = _run(balanced, x, grad), _run(plain, x, grad)
    copied["balanced"] = balanced.replicated_experts
    assert_bitwise_equal(a[0], b[0], "balanced router: output")  # nothing copied: the same path
    return copied


class _LinearExperts(fastmoe.FMoE):
    """FastMoE's pattern of a subclass with fused experts: one FMoELinear as self.experts, called through the base
    expert_fn as experts(rows, counts)."""

    def __init__(self, world, **kwargs):
        super().__init__(NUM_LOCAL, D_MODEL, world_size=world, top_k=2, **kwargs)
        self.experts = fastmoe.FMoELinear(NUM_LOCAL, D_MODEL, D_MODEL, rank=self.moe_rank)


def subclass_and_refusals(rank, world, tokens):
    """A subclass whose experts are one FMoELinear copies experts too, and equals itself unreplicated (fp64, 1e-12);
    ranks given different rates raise at construction, naming them; experts that a parameter holds only in part (as
    FSDP2 on the experts module leaves them) raise at the forward, before any collective. Returns the copies made."""
    gen = torch.Generator().manual_seed(400 + rank)
    x = torch.randn(tokens[rank], D_MODEL, generator=gen, dtype=torch.float64)
    grad = torch.randn(tokens[rank], D_MODEL, generator=gen, dtype=torch.float64)
    results = []
    for replicate in (0, 2):
        torch.manual_seed(5)
        rates = {"ep_replicate": 2, "ep_replicate_rates": (1e9, 1e12)} if replicate else {}
        layer = _LinearExperts(world, **rates).double()
        with torch.no_grad():
            layer.gate.gate.bias[0] += 50.0
        results.append((_run(layer, x, grad), layer.replicated_experts))
    (want, _), (got, copied) = results
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    for name, g in got[2].items():
        torch.testing.assert_close(g, want[2][name], rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")

    messages = {}
    try:
        fastmoe.FMoETransformerMLP(
            NUM_LOCAL, D_MODEL, D_HIDDEN, world_size=world, ep_replicate=1, ep_replicate_rates=(1e9, 1e9 * (rank + 1))
        )
    except ValueError as error:
        messages["rates"] = str(error)
    layer = _layer(world, torch.float64, True, ep_replicate=2)
    with torch.no_grad():  # this rank holds half of each expert's rows of htoh4, as a data-parallel shard would
        layer.experts.htoh4.weight = torch.nn.Parameter(layer.experts.htoh4.weight[:1].clone())
    try:
        layer(x)
    except NotImplementedError as error:
        messages["sharded"] = str(error)
    return copied, messages


def all_cases(rank, world):
    return {
        "copies": copies_and_their_gradients(rank, world),
        # at W = 4 rank 2 has no tokens at all: it still joins every exchange
        "layers": layers_match_unreplicated(rank, world, [24, 32] if world == 2 else [24, 32, 0, 16]),
        "subclass": subclass_and_refusals(rank, world, [24, 32, 0, 16][:world]),
    }
