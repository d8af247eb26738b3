import torch
import torch.distributed as dist

from fastmoe import _groups
from fastmoe.gates.gshard_gate import GShardGate


class DCGate(GShardGate):
    """FastMoE's DCGate: :class:`GShardGate` whose capacity counts the whole expert-parallel group's tokens.

    With ``world_size > 1`` every rank's routing is gathered over ``moe_group`` (default: the layer's group, else the
    default group) and ``torch.ops.fastmoe.gate_capacity`` keeps each expert's ``ceil(capacity_factor * T_group * 2
    / E)`` highest-scored assignments of the group (ties to the lower rank, token, slot), so an EP layer routes as
    one process on the ranks' batches in rank order (FastMoE served slots first come first served). Per forward: one
    all-gather of the token counts (read on the host), two of the routing, bounded by ``FASTMOE_COMM_TIMEOUT``."""

    def __init__(self, d_model: int, num_expert: int, world_size: int = 1, top_k: int | None = None,
                 capacity=(1.2, 2.4), random_routing: bool = True, gate_bias: bool = True, aux_loss_coef: float = 1.0,
                 z_loss_coef: float = 0.0, topk: int | None = None, moe_group=None):  # fmt: skip
        args = (capacity, random_routing, gate_bias, aux_loss_coef, z_loss_coef)
        super().__init__(d_model, num_expert, world_size, top_k, *args, topk=topk)
        if moe_group is not None and not isinstance(moe_group, dist.ProcessGroup):
            raise TypeError(f"moe_group must be a torch.distributed ProcessGroup or None, got moe_group={moe_group!r}")
        self.moe_group = moe_group

    def _route(self, logits):
        factor = self.capacity_factor()
        if factor is None or self.world_size == 1:
            return super()._route(logits)
        topk_idx, topk_score, balance, z_loss, _ = self._gshard(logits, None)
        group, _ = _groups.resolve_moe_group(self.world_size, self.moe_group)
        num_tokens, k = topk_idx.shape
        sizes = [int(n) for n in torch.cat(_all_gather(topk_idx.new_tensor([num_tokens]), group, "token counts"))]
        pad = max(sizes) - num_tokens  # all_gather takes equal sizes: pad, then cut each rank's rows out again
        padded = {
            "routing ids": torch.cat([topk_idx, topk_idx.new_full((pad, k), -1)]),
            "routing scores": torch.cat([topk_score.detach(), topk_score.new_zeros(pad, k)]),
        }
        group_idx, group_score = (
            torch.cat([t[:n] for t, n in zip(_all_gather(tensor, group, what), sizes, strict=True)])
            for what, tensor in padded.items()
        )
        offset = sum(sizes[: dist.get_rank(group)])
        kept = torch.ops.fastmoe.gate_capacity(topk_idx, topk_score, factor, self.tot_expert, group_idx, group_score,
                                               offset)  # fmt: skip
        return kept[0], kept[1], balance, z_loss, kept[2]


def _all_gather(tensor: torch.Tensor, group, what: str) -> list:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    work = dist.all_gather(gathered, tensor.contiguous(), group=group, async_op=True)
    _groups._wait(work, f"all_gather of the {what} (DCGate)", group)
    return gathered
