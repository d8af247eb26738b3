"""Bodies of the expert-parallel tests, run on every rank by dist_harness.run_workers (module-level functions,
so the spawned processes can import them). Each returns a small summary or raises with what differed."""

import torch
import torch.distributed as dist
from torch import nn

import fastmoe
from conftest import assert_bitwise_equal, assert_early_cast_matches_late, assert_ways_agree, both_ways
from fastmoe import ops


def device_for(rank: int, backend: str) -> torch.device:
    return torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")


class FixedGate(nn.Module):
    """Routes every token's k slots to fixed global experts (``targets``), with softmax scores from a linear
    layer so the gate still gets gradients."""

    def __init__(self, d_model: int, num_expert: int, world_size: int, top_k: int, targets=(0,)):
        super().__init__()
        self.gate = nn.Linear(d_model, top_k)
        self.targets = list(targets)
        self.top_k = top_k

    def forward(self, x):
        idx = torch.tensor(self.targets, device=x.device, dtype=torch.int64).expand(x.shape[0], self.top_k)
        return idx.contiguous(), torch.softmax(self.gate(x), dim=-1)


def _shared_inputs(tokens_per_rank, d_model, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    total = sum(tokens_per_rank)
    x = torch.randn(total, d_model, generator=gen, dtype=dtype)
    grad = torch.randn(total, d_model, generator=gen, dtype=dtype)
    return x, grad


def _build_pair(world, num_local, d_model, d_hidden, top_k, dtype, device, gate, fused, moe_group=None, ep_chunks=1):
    """A world_size=1 reference holding every expert and this rank's EP layer, with the same weights."""
    torch.manual_seed(1234)
    total = num_local * world
    if world == 1 and moe_group is None:
        moe_group = dist.group.WORLD  # a one-rank expert-parallel group: the exchanges are local copies
    if fused:
        ref = fastmoe.FMoETransformerMLP(total, d_model, d_hidden, top_k=top_k, gate=gate)
        ep = fastmoe.FMoETransformerMLP(
            num_local, d_model, d_hidden, top_k=top_k, gate=gate, world_size=world, moe_group=moe_group,
            ep_chunks=ep_chunks,
        )  # fmt: skip
    else:

        def expert(d):
            return nn.Sequential(nn.Linear(d, d_hidden), nn.GELU(), nn.Linear(d_hidden, d))

        ref = fastmoe.FMoE(total, d_model, top_k=top_k, gate=gate, expert=expert)
        ep = fastmoe.FMoE(
            num_local, d_model, top_k=top_k, gate=gate, expert=expert, world_size=world, moe_group=moe_group,
            ep_chunks=ep_chunks,
        )  # fmt: skip
    ref = ref.to(device=device, dtype=dtype)
    ep = ep.to(device=device, dtype=dtype)
    rank = ep.moe_rank
    with torch.no_grad():
        ep.gate.load_state_dict(ref.gate.state_dict())
        if fused:
            for name, param in ep.experts.named_parameters():
                param.copy_(dict(ref.experts.named_parameters())[name][rank * num_local : (rank + 1) * num_local])
        else:
            for i in range(num_local):
                ep.experts[i].load_state_dict(ref.experts[rank * num_local + i].state_dict())
    return ref, ep


def _expert_slice(ref, ep, name, rank, num_local, fused):
    """The reference's tensor for EP parameter ``name`` of local experts on ``rank``."""
    ref_params = dict(ref.experts.named_parameters())
    if fused:
        return ref_params[name][rank * num_local : (rank + 1) * num_local]
    i, rest = name.split(".", 1)
    return ref_params[f"{rank * num_local + int(i)}.{rest}"]


def equivalence(
    rank, world, backend, tokens_per_rank, gate_name, fused, top_k=2, num_local=2, dtype=torch.float64, ep_chunks=1
):
    """EP layer on this rank's tokens vs the single-process layer on everyone's tokens: outputs, input
    gradients, expert gradients and the (all-reduced) gate gradients. ``ep_chunks`` > 1 runs the EP layer in
    chunks (on CUDA, each on its own stream)."""
    device = device_for(rank, backend)
    d_model, d_hidden = 8, 12
    if gate_name == "naive":
        gate = fastmoe.gates.NaiveGate
    elif gate_name == "gshard":
        gate = fastmoe.gates.GShardGate
    else:  # every slot to one global expert: the last one ("fixed", remote for every rank but the last) or 0
        target = num_local * world - 1 if gate_name == "fixed" else 0

        def gate(d, e, w, k):
            return FixedGate(d, e, w, k, targets=[target] * k)

    ref, ep = _build_pair(world, num_local, d_model, d_hidden, top_k, dtype, device, gate, fused, ep_chunks=ep_chunks)
    x_all, g_all = _shared_inputs(tokens_per_rank, d_model, dtype, seed=99)
    x_all, g_all = x_all.to(device), g_all.to(device)
    start = sum(tokens_per_rank[:rank])
    rows = slice(start, start + tokens_per_rank[rank])

    ref.eval()
    ep.eval()  # the noisy/random parts of gates off, so both see the same routing
    x_ref = x_all.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    (y_ref * g_all).sum().backward()

    x = x_all[rows].clone().requires_grad_(True)
    y = ep(x)
    (y * g_all[rows]).sum().backward()

    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y, y_ref[rows], **tol, msg=lambda m: f"rank {rank} output: {m}")
    torch.testing.assert_close(x.grad, x_ref.grad[rows], **tol, msg=lambda m: f"rank {rank} input grad: {m}")
    for name, param in ep.experts.named_parameters():
        want = _expert_slice(ref, ep, name, rank, num_local, fused)
        got = param.grad if param.grad is not None else torch.zeros_like(param)
        want_grad = want.grad if hasattr(want, "grad") and want.grad is not None else None
        if want_grad is None:  # a sliced tensor has no .grad: slice the reference gradient instead
            ref_params = dict(ref.experts.named_parameters())
            base = name if fused else f"{rank * num_local + int(name.split('.', 1)[0])}.{name.split('.', 1)[1]}"
            full = ref_params[base].grad
            full = torch.zeros_like(ref_params[base]) if full is None else full
            want_grad = full[rank * num_local : (rank + 1) * num_local] if fused else full
        torch.testing.assert_close(got, want_grad, **tol, msg=lambda m, n=name: f"rank {rank} grad of {n}: {m}")
    for name, param in ep.gate.named_parameters():
        summed = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
        dist.all_reduce(summed)
        want = dict(ref.gate.named_parameters())[name].grad
        torch.testing.assert_close(summed, want, **tol, msg=lambda m, n=name: f"rank {rank} gate grad {n}: {m}")
    return int(tokens_per_rank[rank])


def autocast_early_cast(rank, world, backend):
    """Under bf16 autocast the expert-parallel FMoETransformerMLP casts its rows before they are exchanged (half
    the bytes), with the same output as casting inside grouped_linear (conftest.assert_early_cast_matches_late)."""
    device = device_for(rank, backend)
    torch.manual_seed(5)  # the same weights on every rank: each holds its own slice of the experts
    layer = fastmoe.FMoETransformerMLP(2, d_model=16, d_hidden=32, top_k=2, world_size=world).to(device)
    x = torch.randn(9 + 4 * rank, 16, generator=torch.Generator().manual_seed(rank)).to(device)
    assert_early_cast_matches_late(layer, x, f"rank {rank} ")
    return x.shape[0]


def exchange_bitwise(rank, world, backend):
    """ops.exchange moves rows bit for bit, with uneven and zero splits, and its backward brings gradient rows
    back to where they came from, zero rows included."""
    device = device_for(rank, backend)
    gen = torch.Generator().manual_seed(7)
    splits = torch.randint(0, 5, (world, world), generator=gen)  # splits[s][p]: rows s sends to p
    splits[0, :] = 0  # rank 0 sends nothing
    splits[:, world - 1] = 0  # the last rank receives nothing
    splits[1 % world, 0] = 23  # one very uneven pair
    send = splits[rank].tolist()
    recv = splits[:, rank].tolist()
    tail = 3
    # Row j sent from s to p holds the value 1000 s + 100 p + j + a fraction only bf16 can't hold exactly.
    rows = []
    for p in range(world):
        for j in range(send[p]):
            rows.append(torch.full((5,), 1000.0 * rank + 100.0 * p + j + 1 / 3, dtype=torch.float64))
    x = torch.stack(rows) if rows else torch.zeros(0, 5, dtype=torch.float64)
    x = torch.cat([x, torch.full((tail, 5), -1.0, dtype=torch.float64)]).to(device).requires_grad_(True)
    y = ops.exchange(x, send, recv, out_rows=sum(recv) + 2)
    expected = []
    for s in range(world):
        for j in range(recv[s]):
            expected.append(torch.full((5,), 1000.0 * s + 100.0 * rank + j + 1 / 3, dtype=torch.float64))
    expected.append(torch.zeros(2, 5, dtype=torch.float64))
    expected = torch.cat([e.reshape(-1, 5) for e in expected]).to(device)
    assert torch.equal(y.detach(), expected), f"rank {rank}: exchanged rows differ\n{y}\n{expected}"
    y.backward(y.detach() * 2)
    want_grad = torch.cat([x.detach()[: sum(send)] * 2, torch.zeros(tail, 5, dtype=torch.float64, device=device)])
    assert torch.equal(x.grad, want_grad), f"rank {rank}: gradient rows did not come back bit for bit"
    counts = torch.arange(world * 3, dtype=torch.int64, device=device) + 10 * rank
    got = ops.exchange_counts(counts)
    want = torch.cat([torch.arange(rank * 3, rank * 3 + 3) + 10 * s for s in range(world)]).to(device)
    assert torch.equal(got, want), f"rank {rank}: exchange_counts {got.tolist()} != {want.tolist()}"
    # What the header carries is checked before anything is sent (the same on every rank, so no rank is left in a
    # collective alone).
    for kwargs, named in (
        ({"row_width": -2}, "row_width must be >= 0, got -2"),
        ({"chunks": 0}, "chunks must be >= 1, got 0"),
        ({"chunks": 2}, "3 entries per rank, which is not a multiple of chunks=2"),
    ):
        try:
            ops.exchange_counts(counts, row_dtype=torch.float32, **kwargs)
        except RuntimeError as error:
            assert named in str(error), f"rank {rank}: {kwargs}: {error}"
        else:
            raise AssertionError(f"rank {rank}: exchange_counts accepted {kwargs}")
    return sum(recv)


def config_mismatch(rank, world, backend):
    """A layer whose num_expert differs on rank 1 raises on every rank, naming rank 1 and its value."""
    num_expert = 3 if rank == 1 else 2
    try:
        fastmoe.FMoETransformerMLP(num_expert, 8, 12, world_size=world)
    except ValueError as error:
        return str(error)
    raise AssertionError(f"rank {rank}: no error for a num_expert mismatch")


def dp_ep_training(rank, world, backend, ep_size, steps=2):
    """A small model (embedding linear + EP MoE layer + head) trained with DistributedGroupedDataParallel, gradient
    clipping (``clip_grad_norm_``, small enough to clip every step) and SGD for ``steps`` steps equals one process
    training the same model on the union of the ranks' batches with torch's clipping."""
    device = device_for(rank, backend)
    dtype = torch.float64
    d_model, d_hidden, num_local, top_k, tokens = 6, 10, 2, 2, 5
    if ep_size == world:
        moe_group, replica_group = None, None
    else:
        moe_group, replica_group = fastmoe.distributed.expert_parallel_groups(ep_size)
    ep_rank = rank % ep_size

    def model(num_expert, ws, group):
        torch.manual_seed(5)
        return nn.ModuleDict(
            {
                "embed": nn.Linear(d_model, d_model),
                "moe": fastmoe.FMoETransformerMLP(
                    num_expert, d_model, d_hidden, top_k=top_k, world_size=ws, moe_group=group
                ),
            }
        ).to(device=device, dtype=dtype)

    ref = model(num_local * ep_size, 1, None)
    local = model(num_local, ep_size, moe_group)
    with torch.no_grad():
        local["embed"].load_state_dict(ref["embed"].state_dict())
        local["moe"].gate.load_state_dict(ref["moe"].gate.state_dict())
        for name, param in local["moe"].experts.named_parameters():
            full = dict(ref["moe"].experts.named_parameters())[name]
            param.copy_(full[ep_rank * num_local : (ep_rank + 1) * num_local])
    ddp = fastmoe.DistributedGroupedDataParallel(local, expert_dp_group=replica_group)
    opt = torch.optim.SGD(local.parameters(), lr=0.5)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)

    def forward(m, x):
        return m["moe"](torch.tanh(m["embed"](x)))

    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        x_all = torch.randn(world * tokens, d_model, generator=gen, dtype=dtype).to(device)
        target = torch.randn(world * tokens, d_model, generator=gen, dtype=dtype).to(device)
        mine = slice(rank * tokens, (rank + 1) * tokens)
        loss = ((forward(ddp.module, x_all[mine]) - target[mine]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        ddp.allreduce_gradients()
        norm = ddp.clip_grad_norm_(0.05)
        opt.step()
        per_rank = [
            ((forward(ref, x_all[r * tokens : (r + 1) * tokens]) - target[r * tokens : (r + 1) * tokens]) ** 2).mean()
            for r in range(world)
        ]
        opt_ref.zero_grad()
        (sum(per_rank) / world).backward()
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        assert norm_ref > 0.05, f"the clip threshold should clip: the gradient norm is {float(norm_ref)}"
        torch.testing.assert_close(norm.to(norm_ref), norm_ref, rtol=1e-10, atol=0, msg=f"rank {rank} step {step}")
        opt_ref.step()
    tol = {"rtol": 1e-10, "atol": 1e-10}
    for name, param in local.named_parameters():
        want = dict(ref.named_parameters())[name]
        if name.startswith("moe.experts."):
            want = want[ep_rank * num_local : (ep_rank + 1) * num_local]
        torch.testing.assert_close(param, want, **tol, msg=lambda m, n=name: f"rank {rank} param {n} after SGD: {m}")
    return float(loss)


def module_experts_idle_rank(rank, world, backend):
    """Per-expert modules where every slot goes to rank 0's expert: rank 1's experts get no rows, yet its
    backward still joins the collectives (no hang, no size mismatch), and the gradients match the reference."""
    return equivalence(rank, world, backend, [5, 4], "first", False, top_k=1, num_local=1)


def cpp_transformer_mlp(rank, world, backend, lib_path, mismatch=False):
    """fastmoe::nn::TransformerMLP (C++) with world_size=W on the Python-made group gives the Python layer's
    outputs and gradients. With ``mismatch`` rank 1 builds a different num_experts and every rank must raise."""
    torch.ops.load_library(lib_path)
    device = device_for(rank, backend)
    dtype = torch.float64
    d_model, d_hidden, num_local, top_k = 8, 12, 2, 2
    group = dist.group.WORLD.group_name
    if mismatch:
        try:
            torch.ops.fastmoe_testing.transformer_mlp(
                torch.zeros(1, d_model),
                torch.zeros(1, d_model),
                [],
                [],
                3 if rank == 1 else 2,
                d_hidden,
                top_k,
                world,
                group,
            )
        except (RuntimeError, ValueError) as error:
            return str(error)
        raise AssertionError(f"rank {rank}: the C++ layer accepted a num_experts mismatch")
    torch.manual_seed(77)
    layer = fastmoe.FMoETransformerMLP(num_local, d_model, d_hidden, top_k=top_k, world_size=world)
    layer = layer.to(device=device, dtype=dtype)
    with torch.no_grad():  # same gate everywhere, different experts per rank
        for p in layer.experts.parameters():
            p.add_(rank)
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(6 + rank, d_model, generator=gen, dtype=dtype).to(device)
    grad_y = torch.randn(6 + rank, d_model, generator=gen, dtype=dtype).to(device)
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach() for _, p in layer.named_parameters()]
    got = torch.ops.fastmoe_testing.transformer_mlp(x, grad_y, names, params, num_local, d_hidden, top_k, world, group)
    x_py = x.clone().requires_grad_(True)
    y = layer(x_py)
    y.backward(grad_y)
    want = [y.detach(), x_py.grad] + [
        p.grad if p.grad is not None else torch.zeros_like(p) for _, p in layer.named_parameters()
    ]
    labels = ["y", "grad_x"] + names
    # One process, one device, the same kernels on the same values (tests/distributed/cross_language_cases.py)
    for label, a, b in zip(labels, got, want, strict=True):
        assert_bitwise_equal(a, b, f"rank {rank} {label}")
    return len(labels)


def scored_experts(rank, world, backend):
    """Expert parallel, gated experts: scaling each row by TokenDispatch.row_scores inside swiglu and giving the
    output scored gives the weighted combine's output and gradients (x, scores, the local weights; fp64 to 1e-12),
    with hot-expert copies too (replica_scores, give_replicas scored), and with every slot on rank 0's experts.
    Returns the experts copied per rank, per case."""
    device = device_for(rank, backend)
    group = dist.group.WORLD.group_name
    num_local, d, h, k, tokens = 2, 8, 6, 2, 20 + 3 * rank
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, d, generator=gen, dtype=torch.float64).to(device)
    grad = torch.randn(tokens, d, generator=gen, dtype=torch.float64).to(device)
    idx = torch.stack([torch.randperm(num_local * world, generator=gen)[:k] for _ in range(tokens)])
    idx[: tokens // 2, 0] = 0  # expert 0 is hot: the copies' policy has something to copy
    idx[torch.rand(tokens, k, generator=gen) < 0.1] = -1
    score = (torch.rand(tokens, k, generator=gen, dtype=torch.float64) + 0.25).to(device)
    w_gen = torch.Generator().manual_seed(7 + rank)  # this rank's experts
    w_in = torch.randn(num_local, 2 * h, d, generator=w_gen, dtype=torch.float64).to(device)
    w_out = torch.randn(num_local, d, h, generator=w_gen, dtype=torch.float64).to(device)
    # every slot on rank 0's experts: the other ranks receive no rows, and must still run the backward of the
    # scores' exchange (their row_scores are empty)
    on_rank0 = torch.stack([torch.randperm(num_local, generator=gen)[:k] for _ in range(tokens)])
    copied = []
    for routing, replicate in (
        (idx, None),
        (idx, (1, 3 * h * d, 1e9, 1e12)),  # compute-bound rates: a copy pays for itself
        (on_rank0, None),
    ):
        results = both_ways(
            x, routing.to(device), score, w_in, w_out, grad, world=world, group=group, replicate=replicate
        )
        what = f"rank {rank}, replicate={replicate}, {'all on rank 0' if routing is on_rank0 else 'spread'}"
        idle = routing is on_rank0 and rank != 0  # its experts get no rows
        assert_ways_agree(results, 1e-12, 1e-12, what, may_be_zero=("grad w_in", "grad w_out") if idle else ())
        copied.append(results[True][2])
    return copied
