"""FastMoE-style scripts run on every rank by dist_harness.run_workers (module-level functions, so the spawned
processes can import them). Each builds an expert-parallel layer the way a FastMoE user writes it, compares it
with the single-process layer holding every expert with the same weights, and returns a small summary."""

import torch
import torch.distributed as dist
from torch import nn

import fastmoe as fmoe
from fastmoe.gates import NaiveGate

D_MODEL = 6
TOL = {"rtol": 1e-10, "atol": 1e-10}  # fp64 throughout: EP only moves rows, so it matches to rounding


class CountingExpert(nn.Module):
    """A FastMoE custom expert: ``forward(inp, fwd_expert_count)``; it records the counts it was given."""

    def __init__(self, d_model):
        super().__init__()
        self.fc = nn.Linear(d_model, d_model)
        self.seen = []

    def forward(self, inp, fwd_expert_count):
        self.seen.append((int(inp.shape[0]), fwd_expert_count))
        return torch.tanh(self.fc(inp))


class PairExpert(nn.Module):
    """A FastMoE multi-input expert: a dict of tensors in, a dict out (FastMoE's MIMO interface)."""

    def __init__(self, d_model):
        super().__init__()
        self.fc = nn.Linear(d_model, d_model)
        self.side = nn.Linear(3, 2)

    def forward(self, inp, fwd_expert_count):
        return {"x": self.fc(inp["x"]), "side": torch.relu(self.side(inp["side"]))}


class DictGate(NaiveGate):
    """FastMoE's MIMO gate: FMoE hands it the whole structure, and it routes on ``inp["x"]``."""

    def forward(self, inp, return_all_scores=False):
        return super().forward(inp["x"], return_all_scores)


class LoopMoE(fmoe.FMoE):
    """FastMoE's way to customise the expert computation: override ``expert_fn(inp, fwd_expert_count)``."""

    def expert_fn(self, inp, fwd_expert_count):
        counts = fwd_expert_count.cpu().numpy()
        assert inp.shape[0] == counts.sum(), f"expert_fn got {inp.shape[0]} rows for counts {counts.tolist()}"
        outputs, base = [], 0
        for i in range(self.num_expert):
            outputs.append(self.experts[i](inp[base : base + counts[i]]) * 2.0)
            base += counts[i]
        return torch.cat(outputs, dim=0)


def _pair(world, num_local, make_layer, copy_experts=True):
    """The single-process layer with every expert and this rank's expert-parallel layer, with equal weights."""
    torch.manual_seed(1234)
    ref = make_layer(num_local * world, 1).double()
    ep = make_layer(num_local, world).double()
    rank = dist.get_rank()
    with torch.no_grad():
        ep.gate.load_state_dict(ref.gate.state_dict())
        if copy_experts:
            for i in range(num_local):
                ep.experts[i].load_state_dict(ref.experts[rank * num_local + i].state_dict())
    return ref.eval(), ep.eval()


def _shared(tokens_per_rank, *widths, seed=99):
    gen = torch.Generator().manual_seed(seed)
    total = sum(tokens_per_rank)
    return [torch.randn(total, w, generator=gen, dtype=torch.float64) for w in widths]


def _mine(tokens_per_rank, rank):
    start = sum(tokens_per_rank[:rank])
    return slice(start, start + tokens_per_rank[rank])


def _compare_with_one_process(ref, ep, tokens, num_local, rank, seed):
    """Forward and backward of this rank's tokens through the EP layer equal the one-process layer's on every
    rank's tokens: outputs, input gradients and this rank's expert gradients."""
    (x_all, g_all) = _shared(tokens, D_MODEL, D_MODEL, seed=seed)
    x_ref = x_all.clone().requires_grad_(True)
    (ref(x_ref) * g_all).sum().backward()
    rows = _mine(tokens, rank)
    x = x_all[rows].clone().requires_grad_(True)
    y = ep(x)
    (y * g_all[rows]).sum().backward()
    torch.testing.assert_close(y, ref(x_all)[rows], **TOL, msg=lambda m: f"rank {rank} output: {m}")
    torch.testing.assert_close(x.grad, x_ref.grad[rows], **TOL, msg=lambda m: f"rank {rank} input grad: {m}")
    _check_expert_grads(ref, ep, num_local, rank, "expert")


def _check_expert_grads(ref, ep, num_local, rank, what):
    for i in range(num_local):
        got = dict(ep.experts[i].named_parameters())
        for name, param in ref.experts[rank * num_local + i].named_parameters():
            torch.testing.assert_close(
                got[name].grad, param.grad, **TOL, msg=lambda m, n=f"{i}.{name}": f"rank {rank} {what} grad {n}: {m}"
            )


def custom_expert_signature(rank, world):
    """Experts with FastMoE's ``forward(inp, fwd_expert_count)`` under expert parallelism: the output, input
    gradient and expert gradients equal the single-process layer's, and every call got a 1-element int64 count
    equal to its rows."""
    tokens, num_local = [9, 5], 2

    def make(num_expert, world_size):
        return fmoe.FMoE(num_expert=num_expert, d_model=D_MODEL, world_size=world_size, top_k=2, expert=CountingExpert)

    ref, ep = _pair(world, num_local, make)
    _compare_with_one_process(ref, ep, tokens, num_local, rank, seed=99)
    calls = [seen for expert in ep.experts for seen in expert.seen]
    assert calls, f"rank {rank}: no expert was called"
    for num_rows, count in calls:
        assert isinstance(count, torch.Tensor) and count.dtype == torch.int64 and count.shape == (1,), count
        assert int(count) == num_rows, f"rank {rank}: count {int(count)} for {num_rows} rows"
    return sum(num_rows for num_rows, _ in calls)


def expert_fn_override(rank, world):
    """A subclass overriding FastMoE's two-argument ``expert_fn`` under expert parallelism: it gets the routed
    rows only with per-local-expert counts, and the layer equals the single-process one."""
    tokens, num_local = [4, 11], 2

    def make(num_expert, world_size):
        return LoopMoE(
            num_expert=num_expert, d_model=D_MODEL, world_size=world_size, top_k=2, expert=lambda d: nn.Linear(d, d)
        )

    ref, ep = _pair(world, num_local, make)
    _compare_with_one_process(ref, ep, tokens, num_local, rank, seed=5)
    return tokens[rank]


def pytree_inputs(rank, world):
    """A dict input (FastMoE's MIMO) under expert parallelism, with per-expert modules and with FastMoE-style
    fused experts: every tensor of the dict is routed like the single-process layer routes it."""
    tokens, num_local = [7, 3], 2

    def make_modules(num_expert, world_size):
        return fmoe.FMoE(
            num_expert=num_expert, d_model=D_MODEL, world_size=world_size, top_k=2, gate=DictGate, expert=PairExpert
        )

    x_all, side_all, gx_all, gs_all = _shared(tokens, D_MODEL, 3, D_MODEL, 2, seed=11)
    rows = _mine(tokens, rank)
    ref, ep = _pair(world, num_local, make_modules)
    x_ref, side_ref = x_all.clone().requires_grad_(True), side_all.clone().requires_grad_(True)
    out_ref = ref({"x": x_ref, "side": side_ref})
    ((out_ref["x"] * gx_all).sum() + (out_ref["side"] * gs_all).sum()).backward()
    x, side = x_all[rows].clone().requires_grad_(True), side_all[rows].clone().requires_grad_(True)
    out = ep({"x": x, "side": side})
    assert set(out) == {"x", "side"} and out["side"].shape == (tokens[rank], 2), {k: v.shape for k, v in out.items()}
    ((out["x"] * gx_all[rows]).sum() + (out["side"] * gs_all[rows]).sum()).backward()
    for key in ("x", "side"):
        torch.testing.assert_close(out[key], out_ref[key][rows].detach(), **TOL, msg=lambda m, k=key: f"{k}: {m}")
    torch.testing.assert_close(x.grad, x_ref.grad[rows], **TOL)
    torch.testing.assert_close(side.grad, side_ref.grad[rows], **TOL)
    _check_expert_grads(ref, ep, num_local, rank, "module expert")

    # Fused experts (a subclass sets self.experts), which get the whole dict of rows and the counts.
    class FusedPair(nn.Module):
        def __init__(self, num_expert, expert_rank):
            super().__init__()
            self.lin = fmoe.FMoELinear(num_expert, D_MODEL, D_MODEL, rank=expert_rank)

        def forward(self, inp, fwd_expert_count):
            return [self.lin(inp[0], fwd_expert_count), self.lin(inp[1], fwd_expert_count)]

    class ListGate(NaiveGate):
        def forward(self, inp, return_all_scores=False):
            return super().forward(inp[0], return_all_scores)

    class FusedMoE(fmoe.FMoE):
        def __init__(self, num_expert, world_size):
            super().__init__(num_expert=num_expert, d_model=D_MODEL, world_size=world_size, top_k=2, gate=ListGate)
            self.experts = FusedPair(num_expert, self.moe_rank)

    torch.manual_seed(3)
    ref_f = FusedMoE(num_local * world, 1).double()
    ep_f = FusedMoE(num_local, world).double()
    with torch.no_grad():
        ep_f.gate.load_state_dict(ref_f.gate.state_dict())
        for name, param in ep_f.experts.named_parameters():
            param.copy_(dict(ref_f.experts.named_parameters())[name][rank * num_local : (rank + 1) * num_local])
    y_ref = ref_f([x_all, 2 * x_all])
    y = ep_f([x_all[rows], 2 * x_all[rows]])
    assert isinstance(y, list) and len(y) == 2, type(y)
    torch.testing.assert_close(y[0], y_ref[0][rows], **TOL)
    torch.testing.assert_close(y[1], y_ref[1][rows], **TOL)
    torch.testing.assert_close(y[1], 2 * y[0], **TOL)  # FMoELinear's bias starts at zero: linear in the input
    return tokens[rank]


def dc_gate(rank, world):
    """DCGate under expert parallelism: its capacity covers the whole group, so the EP layer routes and drops
    exactly as the single-process layer does on the ranks' batches concatenated; GShardGate limits each rank
    by its own batch and drops a different set. Returns (DCGate drops, GShardGate drops) on this rank."""
    tokens, num_local = [12, 2], 2

    def make(gate):
        def build(num_expert, world_size):
            return fmoe.FMoE(
                num_expert=num_expert,
                d_model=D_MODEL,
                world_size=world_size,
                top_k=2,
                gate=gate,
                expert=lambda d: nn.Linear(d, d),
            )

        return build

    def dc(d_model, num_expert, world_size, top_k, gate_bias=True):
        return fmoe.gates.DCGate(d_model, num_expert, world_size, topk=top_k, capacity=(0.6, 0.6), gate_bias=gate_bias)

    (x_all,) = _shared(tokens, D_MODEL, seed=21)
    # Rank 1's two tokens are near-copies, so they pick the same two experts: locally over capacity.
    x_all[-2:] = x_all[-1] + 1e-3 * torch.arange(2, dtype=torch.float64)[:, None]
    rows = _mine(tokens, rank)
    ref, ep = _pair(world, num_local, make(dc))
    assert ep.gate.moe_group is not None, "FMoE did not hand its group to the DCGate"
    x_ref = x_all.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    y_ref.sum().backward()
    idx_ref, _ = ref.gate(x_all)
    x = x_all[rows].clone().requires_grad_(True)
    y = ep(x)
    y.sum().backward()
    idx, _ = ep.gate(x_all[rows])
    assert torch.equal(idx, idx_ref[rows]), f"rank {rank}: DCGate routing {idx.tolist()} != {idx_ref[rows].tolist()}"
    assert int((idx_ref < 0).sum()) > 0, "the case should drop some assignments"
    torch.testing.assert_close(y, y_ref[rows], **TOL, msg=lambda m: f"rank {rank} output: {m}")
    torch.testing.assert_close(x.grad, x_ref.grad[rows], **TOL, msg=lambda m: f"rank {rank} input grad: {m}")
    dropped = [torch.zeros((), dtype=torch.int64) for _ in range(world)]
    dist.all_gather(dropped, ep.gate.num_dropped)
    assert sum(int(d) for d in dropped) == int(ref.gate.num_dropped), (dropped, ref.gate.num_dropped)

    gshard = fmoe.gates.GShardGate(D_MODEL, num_local, world, 2, capacity=(0.6, 0.6), random_routing=False).double()
    dc_alone = fmoe.gates.DCGate(D_MODEL, num_local, world, 2, capacity=(0.6, 0.6), random_routing=False).double()
    gshard.load_state_dict(ref.gate.state_dict())
    dc_alone.load_state_dict(ref.gate.state_dict())
    local_idx, _ = gshard(x_all[rows])
    global_idx, _ = dc_alone(x_all[rows])  # moe_group None: the default group
    assert torch.equal(global_idx, idx), f"rank {rank}: a DCGate built alone routes differently"
    return int((global_idx < 0).sum()), int((local_idx < 0).sum())


def allreduce_options(rank, world):
    """DistributedGroupedDataParallel.allreduce_gradients with FastMoE's options: the mean (default), the sum
    (``no_scale``), division after the sum (``reduce_after``, which overflows fp16 where dividing first does
    not) and the sum in fp32 (``fp32_allreduce``, which then does not); ``allreduce_params`` is the same."""
    model = nn.Linear(2, 1, bias=False)
    half = nn.Linear(2, 1, bias=False).half()
    ddp = fmoe.DistributedGroupedDataParallel(nn.ModuleDict({"f": model, "h": half}))

    def run(value, half_value, method="allreduce_gradients", **kwargs):
        model.weight.grad = torch.full_like(model.weight, value)
        half.weight.grad = torch.full_like(half.weight, half_value)
        getattr(ddp, method)(**kwargs)
        return model.weight.grad[0, 0].item(), half.weight.grad[0, 0].item()

    results = {
        "mean": run(rank + 1.0, 60000.0),
        "sum": run(rank + 1.0, 1000.0 * (rank + 1), no_scale=True),
        "after": run(rank + 1.0, 60000.0, reduce_after=True),
        "after_fp32": run(rank + 1.0, 60000.0, reduce_after=True, fp32_allreduce=True),
        "params_alias": run(rank + 1.0, 2.0, method="allreduce_params", no_scale=True),
    }
    try:
        ddp.allreduce_gradients(no_scale="yes")
    except TypeError as error:
        results["bad"] = str(error)
    return results
