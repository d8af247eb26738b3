"""A plain-PyTorch expert-parallel MoE FFN layer, the baseline of benchmarks/bench_ep.py.

Same parameters and state-dict keys as ``fastmoe.FMoETransformerMLP(num_expert=E_local, ..., bias=False,
world_size=W)``: ``gate.gate.weight [W * E_local, d]``, ``gate.gate.bias [W * E_local]``,
``experts.htoh4.weight [E_local, h, d]`` and ``experts.h4toh.weight [E_local, d, h]``; global expert ``e``
lives on rank ``e // E_local`` of the group. So ``baseline.load_state_dict(fastmoe_layer.state_dict())`` gives
the same layer.

Forward of ``x [T, d]`` on every rank of the group:
  1. gate: ``F.linear`` + ``torch.topk`` + softmax over the k selected logits (fastmoe's NaiveGate);
  2. stable ``argsort`` of the T*k (token, slot) pairs by global expert, ``index_select`` of the rows;
  3. the per-expert counts go through ``torch.distributed.all_to_all_single`` and are read on the host once
     (the row all-to-all needs its split sizes there);
  4. the rows go through the autograd-aware ``torch.distributed.nn.functional.all_to_all_single``;
  5. the received rows (source-rank-major) are reordered by local expert (a stable argsort);
  6. two ``torch._grouped_mm`` GEMMs (int32 cumulative offsets) with GELU between; on CPU, where
     ``_grouped_mm`` does not run, a per-expert matmul loop;
  7. the inverse reorder, the reverse all-to-all, and the score-weighted ``index_add`` combine.

``forward(x, routing=(topk_idx, topk_score))`` skips step 1 and uses the given routing; the benchmark uses it
for its correctness check, where ties between bf16 logits at the k-th place may be broken differently by
``torch.topk`` and fastmoe's fused top-k (which picks the lower expert id).
"""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn


class _Gate(nn.Module):
    def __init__(self, d_model: int, num_experts_total: int):
        super().__init__()
        self.gate = nn.Linear(d_model, num_experts_total)


class _Experts(nn.Module):
    def __init__(self, num_expert: int, d_model: int, d_hidden: int):
        super().__init__()
        self.htoh4 = nn.Module()
        self.h4toh = nn.Module()
        bound1, bound2 = d_model**-0.5, d_hidden**-0.5
        self.htoh4.weight = nn.Parameter(torch.empty(num_expert, d_hidden, d_model).uniform_(-bound1, bound1))
        self.h4toh.weight = nn.Parameter(torch.empty(num_expert, d_model, d_hidden).uniform_(-bound2, bound2))


def route(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias, top_k: int):
    """NaiveGate routing in plain PyTorch: ``(topk_idx [T, k] int64, topk_score [T, k])``."""
    values, idx = torch.topk(F.linear(x, gate_weight, gate_bias), top_k, dim=-1)
    return idx, torch.softmax(values, dim=-1)


def _expert_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bounds: list) -> torch.Tensor:
    """``x`` rows grouped by local expert (``bounds [E + 1]`` host prefix sum) -> ``gelu(x W1^T) W2^T``."""
    if x.is_cuda:
        offs = torch.tensor(bounds[1:], dtype=torch.int32, device=x.device)
        h = F.gelu(torch._grouped_mm(x, w1.transpose(1, 2), offs=offs))
        return torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)
    outputs = [F.gelu(x[bounds[e] : bounds[e + 1]] @ w1[e].t()) @ w2[e].t() for e in range(w1.shape[0])]
    return torch.cat(outputs, dim=0)


class EPBaselineMLP(nn.Module):
    """Expert-parallel MoE FFN over ``group`` (``None``: the default group) with ``num_expert`` experts per
    rank, GELU 2-layer experts without bias, NaiveGate top-k routing. Needs torch.distributed initialised."""

    def __init__(self, num_expert: int, d_model: int, d_hidden: int, top_k: int = 2, group=None):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("EPBaselineMLP needs torch.distributed: call init_process_group first")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.num_expert = num_expert
        self.top_k = top_k
        self.gate = _Gate(d_model, num_expert * self.world_size)
        self.experts = _Experts(num_expert, d_model, d_hidden)

    def forward(self, x: torch.Tensor, routing=None) -> torch.Tensor:
        world, local, k = self.world_size, self.num_expert, self.top_k
        if routing is None:
            idx, score = route(x, self.gate.gate.weight, self.gate.gate.bias, k)
        else:
            idx, score = routing
        # 2. order the (token, slot) pairs by global expert = by (owner rank, local expert)
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k
        send_counts = torch.bincount(flat, minlength=world * local)
        # 3. recv_counts[s * local + e]: rows rank s sends to this rank's local expert e
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        both = torch.cat([send_counts, recv_counts]).tolist()  # the one host sync
        sent, received = both[: world * local], both[world * local :]
        send = [sum(sent[p * local : (p + 1) * local]) for p in range(world)]
        recv = [sum(received[p * local : (p + 1) * local]) for p in range(world)]
        bounds = [0]
        for e in range(local):
            bounds.append(bounds[-1] + sum(received[p * local + e] for p in range(world)))
        num_recv = bounds[-1]
        # 4. rows to the experts' ranks
        x_sorted = x.index_select(0, token)
        x_recv = dist_nn.all_to_all_single(x.new_empty(num_recv, x.shape[1]), x_sorted, recv, send, group=self.group)
        # 5. source-rank-major -> local-expert-major
        local_id = torch.arange(world * local, device=x.device) % local
        row_expert = torch.repeat_interleave(local_id, recv_counts, output_size=num_recv)
        perm = torch.argsort(row_expert, stable=True)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(num_recv, device=x.device)
        x_local = x_recv.index_select(0, perm)
        # 6. the local experts
        y_local = _expert_mlp(x_local, self.experts.htoh4.weight, self.experts.h4toh.weight, bounds)
        # 7. back to source-rank-major, back to the senders, weighted combine
        y_recv = y_local.index_select(0, inverse)
        y_sorted = dist_nn.all_to_all_single(y_recv.new_empty(x_sorted.shape), y_recv, send, recv, group=self.group)
        weighted = y_sorted * score.reshape(-1)[order].unsqueeze(-1).to(y_sorted.dtype)
        return torch.zeros_like(x).index_add(0, token, weighted)
