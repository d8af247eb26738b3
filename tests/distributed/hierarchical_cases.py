"""Bodies of the hierarchical-exchange tests (test_hierarchical_exchange.py), run on every rank by
dist_harness.run_workers. W ranks are treated as W / L nodes of L ranks; each body compares the hierarchical
exchange with the flat one and returns a small summary or raises with what differed."""

import os

import torch
import torch.distributed as dist
from torch import nn

import fastmoe
from conftest import assert_bitwise_equal
from fastmoe import _groups


def _split_matrix(world: int, seed: int) -> torch.Tensor:
    """rows[s, d]: the rows rank s sends rank d; random in [0, 5), with zeros throughout, a rank that sends nothing
    (seed % world) and a rank that receives nothing ((seed + 1) % world)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 5, (world, world), generator=gen)
    rows[torch.rand(world, world, generator=gen) < 0.3] = 0
    rows[seed % world, :] = 0
    rows[:, (seed + 1) % world] = 0
    return rows


def _labelled_rows(rank: int, count: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Row i of rank r holds r * 1000 + i in every column, so where each row lands can be read off the result."""
    label = (rank * 1000 + torch.arange(count, dtype=torch.float64)).unsqueeze(1)
    return (label + torch.arange(width, dtype=torch.float64) / 8).to(dtype)


def _peer_counts(rows: torch.Tensor, rank: int, local_size: int) -> torch.Tensor:
    """exchange_hierarchical's peer_counts for the split matrix ``rows[s, d]``: [0][j, m] the rows node peer j
    sends through this rank to node m, [1] the same in the reverse exchange (rank d sends rows[s, d] back to s)."""
    world = rows.shape[0]
    node, local = divmod(rank, local_size)
    nodes = world // local_size
    peers = [node * local_size + j for j in range(local_size)]
    out = torch.tensor([[[int(rows[p, m * local_size + local]) for m in range(nodes)] for p in peers]])
    back = torch.tensor([[[int(rows[m * local_size + local, p]) for m in range(nodes)] for p in peers]])
    return torch.cat([out, back])


def exchange_matches_flat(rank, world, local_sizes, seeds):
    """For each nodes-of-L layout and each random split matrix: the hierarchical exchange's rows equal the flat
    exchange's bit for bit and sit where the flat exchange's contract puts them (by source rank, each source's rows
    in send order, then zero rows up to out_rows); the gradients of x equal too. Returns the rows compared."""
    group = dist.group.WORLD.group_name
    compared = 0
    for local_size in local_sizes:
        node, rail = _groups.hierarchical_groups(dist.group.WORLD, local_size)
        for seed in seeds:
            rows = _split_matrix(world, seed)
            send, recv = rows[rank].tolist(), rows[:, rank].tolist()
            for dtype in (torch.float32, torch.bfloat16, torch.int64):
                extra = seed % 3  # rows past the sent ones stay behind, with zero gradient
                x = _labelled_rows(rank, sum(send) + extra, 5, dtype)
                out_rows = sum(recv) + seed % 2
                grads = dtype.is_floating_point
                x_flat = x.clone().requires_grad_(grads)
                x_hier = x.clone().requires_grad_(grads)
                x_told = x.clone().requires_grad_(grads)
                y_flat = torch.ops.fastmoe.exchange(x_flat, send, recv, group, out_rows)
                y_hier = torch.ops.fastmoe.exchange_hierarchical(x_hier, send, recv, group, node, rail, out_rows)
                # the same with the node peers' counts given (as TokenDispatch gives them): no counts exchange
                peers = _peer_counts(rows, rank, local_size)
                y_told = torch.ops.fastmoe.exchange_hierarchical(x_told, send, recv, group, node, rail, out_rows, peers)
                where = f"L={local_size} seed={seed} {dtype}"
                assert_bitwise_equal(y_hier, y_flat, f"rows ({where})")
                assert_bitwise_equal(y_told, y_flat, f"rows, peer counts given ({where})")
                expected = []
                for s in range(world):  # rows [begin, end) of rank s's x come here
                    begin, end = int(rows[s, :rank].sum()), int(rows[s, : rank + 1].sum())
                    expected.append(_labelled_rows(s, end, 5, dtype)[begin:end])
                expected.append(x.new_zeros(out_rows - sum(recv), 5))
                assert_bitwise_equal(y_hier.detach(), torch.cat(expected), f"rows by source rank ({where})")
                compared += y_hier.shape[0]
                if grads:
                    gen = torch.Generator().manual_seed(seed * 31 + rank)
                    grad = torch.randn(out_rows, 5, generator=gen, dtype=torch.float64).to(dtype)
                    y_flat.backward(grad)
                    y_hier.backward(grad)
                    y_told.backward(grad)
                    assert_bitwise_equal(x_hier.grad, x_flat.grad, f"grad of x ({where})")
                    assert_bitwise_equal(x_told.grad, x_flat.grad, f"grad of x, peer counts given ({where})")
                    assert_bitwise_equal(
                        x_hier.grad[sum(send) :], x.new_zeros(extra, 5), f"unsent rows' grad ({where})"
                    )
    return compared


def _layer(world, fused, ep_chunks, **exchange):
    torch.manual_seed(7)
    if fused:
        return fastmoe.FMoETransformerMLP(
            2, 8, 12, top_k=2, world_size=world, ep_chunks=ep_chunks, **exchange
        ).double()  # fmt: skip

    def expert(d):
        return nn.Sequential(nn.Linear(d, 12), nn.GELU(), nn.Linear(12, d))

    return fastmoe.FMoE(
        2, 8, top_k=2, expert=expert, world_size=world, ep_chunks=ep_chunks, **exchange
    ).double()  # fmt: skip


def layer_matches_flat(rank, world, fused, ep_chunks, tokens):
    """An FMoE layer whose exchanges are hierarchical (nodes of 2 ranks, given and from LOCAL_WORLD_SIZE with
    ep_exchange='auto') equals the same layer with the flat exchange: output, input gradient and every parameter
    gradient, bit for bit. Returns the layers' exchange settings."""
    flat = _layer(world, fused, ep_chunks, ep_exchange="flat")
    given = _layer(world, fused, ep_chunks, ep_exchange="hierarchical", ep_local_size=2)
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    try:
        auto = _layer(world, fused, ep_chunks, ep_exchange="auto")
    finally:
        del os.environ["LOCAL_WORLD_SIZE"]
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens[rank], 8, generator=gen, dtype=torch.float64)
    grad = torch.randn(tokens[rank], 8, generator=gen, dtype=torch.float64)
    results = []
    for layer in (flat, given, auto):
        layer.load_state_dict(flat.state_dict())
        x_in = x.clone().requires_grad_(True)
        y = layer(x_in)
        y.backward(grad)
        results.append((y.detach(), x_in.grad, {name: p.grad for name, p in layer.named_parameters()}))
    for name, (y, dx, grads) in zip(("given", "auto"), results[1:], strict=True):
        assert_bitwise_equal(y, results[0][0], f"{name}: output")
        assert_bitwise_equal(dx, results[0][1], f"{name}: grad of the input")
        for param, g in grads.items():
            ref = results[0][2][param]
            assert (g is None) == (ref is None), f"{name}: grad of {param} is {g} but the flat layer's {ref}"
            if g is not None:  # an expert without rows on any rank gets none in both
                assert_bitwise_equal(g, ref, f"{name}: grad of {param}")
    return [(layer.ep_exchange, layer.ep_local_size) for layer in (flat, given, auto)]


def bad_arguments(rank, world):
    """Each bad argument raises on every rank (before any exchange), naming it and its value."""
    group = dist.group.WORLD.group_name
    node, rail = _groups.hierarchical_groups(dist.group.WORLD, 2)
    x = torch.zeros(world, 3)
    ones = [1] * world
    calls = {
        "local size": lambda: fastmoe.FMoE(2, 8, world_size=world, ep_exchange="hierarchical", ep_local_size=3),
        "local size auto": lambda: fastmoe.FMoE(2, 8, world_size=world, ep_local_size=3),
        "groups": lambda: _groups.hierarchical_groups(dist.group.WORLD, 3),
        "group sizes": lambda: torch.ops.fastmoe.exchange_hierarchical(x, ones, ones, group, group, rail),
        "empty group": lambda: torch.ops.fastmoe.exchange_hierarchical(x, ones, ones, group, "", rail),
        "splits": lambda: torch.ops.fastmoe.exchange_hierarchical(x, [1, 1], [1, 1], group, node, rail),
        "peer counts": lambda: torch.ops.fastmoe.exchange_hierarchical(
            x, ones, ones, group, node, rail, None, torch.zeros(2, 3, dtype=torch.long)
        ),
    }
    messages = {}
    for name, call in calls.items():
        try:
            call()
        except (ValueError, RuntimeError) as error:
            messages[name] = str(error).split("\n")[0]
        else:
            raise AssertionError(f"{name}: no error")
    return messages


def all_cases(rank, world):
    """Every body above in one set of processes (each spawn costs seconds): the exchange at L = 2, 1 and 4 over two
    split matrices, the layers (fused experts; module experts with ep_chunks=2), then the bad arguments."""
    return {
        "exchange": exchange_matches_flat(rank, world, [2, 1, 4], [0, 1]),
        "layers": [
            layer_matches_flat(rank, world, fused, chunks, [6, 0, 9, 3]) for fused, chunks in ((True, 1), (False, 2))
        ],
        "bad arguments": bad_arguments(rank, world),
    }
