import torch
import torch.distributed as dist

from fastmoe import distributed, ops
from fastmoe.gates.base_gate import expert_capacity
from fastmoe.gates.gshard_gate import GShardGate, drop_by_capacity


class DCGate(GShardGate):
    """FastMoE's DCGate ("distributed capacity"): :class:`GShardGate` whose expert capacity is counted over the
    whole expert-parallel group, not per rank.

    Routing, scores, random routing and the balance loss are GShardGate's (computed on this rank's tokens). The
    capacity step differs when ``world_size > 1``: every rank's ``(topk_idx, topk_score)`` is gathered over the
    expert-parallel group, each global expert keeps at most ``C = ceil(capacity_factor * T_group * 2 / E)``
    assignments of the whole group (``T_group`` the tokens of all ranks, E the global experts), the
    highest-scored ones (ties to the lower rank, then token, then slot), and each rank keeps its own share. An
    expert-parallel layer with DCGate therefore routes exactly as a one-process layer with every expert routes
    the ranks' batches concatenated in rank order; a rank with a skewed batch is not limited by its own batch
    size as with GShardGate. ``num_dropped`` counts this rank's dropped assignments. With ``world_size=1`` it is
    GShardGate.

    Cost: per forward, one all-gather of the token counts (read on the host: one sync) and two of the routing
    (``T * 2`` ids and scores per rank), bounded by ``FASTMOE_COMM_TIMEOUT``. ``moe_group`` (default: the
    layer's group when built by ``FMoE``, else the default group) must have ``world_size`` ranks.

    FastMoE's DCGate gave each expert ``ceil(capacity_factor * B)`` slots over the group (B this rank's tokens),
    granted first come first served in a nondeterministic order; this gate uses GShard's capacity, as
    GShardGate does, and a deterministic choice by score.
    """

    def __init__(
        self,
        d_model: int,
        num_expert: int,
        world_size: int = 1,
        top_k: int | None = None,
        capacity=(1.2, 2.4),
        random_routing: bool = True,
        gate_bias: bool = True,
        aux_loss_coef: float = 1.0,
        z_loss_coef: float = 0.0,
        topk: int | None = None,
        moe_group=None,
    ):
        super().__init__(
            d_model, num_expert, world_size, top_k, capacity, random_routing, gate_bias, aux_loss_coef, z_loss_coef,
            topk=topk,
        )  # fmt: skip
        if moe_group is not None and not isinstance(moe_group, dist.ProcessGroup):
            raise TypeError(f"moe_group must be a torch.distributed ProcessGroup or None, got moe_group={moe_group!r}")
        self.moe_group = moe_group

    def _limit_capacity(self, topk_idx, topk_score):
        factor = self.capacity_factor()
        if factor is None or self.world_size == 1:
            return drop_by_capacity(self, topk_idx, topk_score, factor)
        group, _ = distributed.resolve_moe_group(self.world_size, self.moe_group)
        num_tokens, k = topk_idx.shape
        sizes = [int(n) for n in torch.cat(_all_gather(topk_idx.new_tensor([num_tokens]), group, "token counts"))]
        total = sum(sizes)
        if total == 0:  # every rank sees this: none of them gathers anything
            return drop_by_capacity(self, topk_idx, topk_score, None)
        pad = max(sizes) - num_tokens
        # Padded to the largest batch (all_gather takes equal sizes); -1 rows are not counted by capacity_limit.
        idx = torch.cat([topk_idx, topk_idx.new_full((pad, k), -1)])
        score = torch.cat([topk_score.detach(), topk_score.new_zeros(pad, k)])
        all_idx = torch.cat([t[:n] for t, n in zip(_all_gather(idx, group, "routing ids"), sizes, strict=True)])
        all_score = torch.cat([t[:n] for t, n in zip(_all_gather(score, group, "routing scores"), sizes, strict=True)])
        kept, _ = ops.capacity_limit(all_idx, all_score, expert_capacity(factor, total, k, self.tot_expert, idx.device))
        start = sum(sizes[: dist.get_rank(group)])
        kept = kept[start : start + num_tokens]
        self.num_dropped = ((kept < 0) & (topk_idx >= 0)).sum()
        return kept, torch.where(kept >= 0, topk_score, torch.zeros_like(topk_score))


def _all_gather(tensor: torch.Tensor, group, what: str) -> list:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    work = dist.all_gather(gathered, tensor.contiguous(), group=group, async_op=True)
    distributed._wait(work, f"all_gather of the {what} (DCGate)", group)
    return gathered
