import math

import torch
from torch import nn

from fastmoe import _checks, _groups, _rng, ops


class FMoELinear(nn.Module):
    """A linear layer per expert, applied to rows grouped by expert in one grouped GEMM.

    Parameters: ``weight [num_expert, out_feat, in_feat]`` and ``bias [num_expert, out_feat]`` (FastMoE's
    layout). Each expert's weight is initialised like ``nn.Linear`` (uniform in ±1/sqrt(in_feat)); biases start
    at zero, as in FastMoE. ``rank`` is the layer's rank in its expert-parallel group: local expert ``e`` is global
    expert ``rank * num_expert + e``, and its weight is drawn from that global expert's own stream (one base seed
    drawn from the CPU default generator, see ``fastmoe._rng``), so every rank's experts differ and equal the
    matching experts of a one-rank layer built from the same seed.

    ``forward(inp, fwd_expert_count)``: ``inp [N, in_feat]`` holds the rows of expert 0, then expert 1, ...;
    ``fwd_expert_count [num_expert]`` int64 gives how many (on any device; it is moved, not read on the host).
    Rows past the counted ones produce zeros. ``expert_offsets=`` (``[num_expert + 1]``) may be passed instead.

    ``ep_mesh``: a 1-D ``DeviceMesh`` over the expert-parallel ranks. ``weight`` and ``bias`` are then DTensors of
    the whole layer's shape (``[num_expert * W, out_feat, in_feat]``, ``[num_expert * W, out_feat]``) sharded over
    the experts (``(Shard(0),)`` on ``ep_mesh``), each rank holding its ``num_expert``; ``rank`` is the mesh's
    local rank. The forward runs on the local shard (``to_local()``, which carries the gradient back to the
    DTensor).
    """

    def __init__(self, num_expert: int, in_feat: int, out_feat: int, bias: bool = True, rank: int = 0, *, ep_mesh=None):
        super().__init__()
        self.num_expert = _checks.positive_int("num_expert", num_expert)
        self.in_feat = _checks.positive_int("in_feat", in_feat)
        self.out_feat = _checks.positive_int("out_feat", out_feat)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be a non-negative int, got {rank!r}")
        if ep_mesh is not None:
            if not _groups.is_device_mesh(ep_mesh) or ep_mesh.ndim != 1:
                raise ValueError(f"ep_mesh must be a 1-D DeviceMesh, got ep_mesh={ep_mesh!r}")
            if rank not in (0, ep_mesh.get_local_rank()):
                raise ValueError(f"rank={rank} but this rank is rank {ep_mesh.get_local_rank()} of ep_mesh")
            rank = ep_mesh.get_local_rank()
        self.rank = rank
        self.ep_mesh = ep_mesh
        self.weight = _expert_parameter(torch.empty(num_expert, out_feat, in_feat), ep_mesh)
        self.bias = _expert_parameter(torch.zeros(num_expert, out_feat), ep_mesh) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draws a new base seed (one draw of the CPU default generator, whatever ``num_expert`` and ``rank``)
        and fills each expert's weight from its global expert's stream; biases become zero."""
        bound = 1.0 / math.sqrt(self.in_feat)
        with torch.no_grad():  # to_local() of a DTensor is then its local tensor itself, filled in place
            _rng.fill_per_expert_(
                _local(self.weight),
                self.rank * self.num_expert,
                lambda w, gen: w.uniform_(-bound, bound, generator=gen),
            )
            if self.bias is not None:
                _local(self.bias).zero_()

    def forward(self, inp, fwd_expert_count=None, *, expert_offsets=None):
        if (fwd_expert_count is None) == (expert_offsets is None):
            raise ValueError("FMoELinear.forward needs exactly one of fwd_expert_count and expert_offsets")
        if expert_offsets is None:
            # the experts the weight holds: num_expert, or the copies of hot-expert replication (FMoE.ep_replicate)
            experts = _local(self.weight).shape[0]
            if not isinstance(fwd_expert_count, torch.Tensor) or fwd_expert_count.shape != (experts,):
                got = tuple(fwd_expert_count.shape) if isinstance(fwd_expert_count, torch.Tensor) else fwd_expert_count
                raise ValueError(f"fwd_expert_count must be a [num_expert={experts}] tensor, got {got!r}")
            if fwd_expert_count.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"fwd_expert_count must be an int32/int64 tensor, got dtype {fwd_expert_count.dtype}")
            expert_offsets = ops.counts_to_offsets(fwd_expert_count.to(device=inp.device, dtype=torch.int64))
        bias = None if self.bias is None else _local(self.bias)
        return ops.grouped_linear(inp, expert_offsets, _local(self.weight), bias)

    def extra_repr(self) -> str:
        mesh = "" if self.ep_mesh is None else ", sharded over ep_mesh"
        return (
            f"num_expert={self.num_expert}, in_features={self.in_feat}, out_features={self.out_feat}, "
            f"bias={self.bias is not None}, rank={self.rank}{mesh}"
        )


def _expert_parameter(local: torch.Tensor, mesh) -> nn.Parameter:
    """``local [num_expert, ...]`` as a parameter: itself without a mesh, else a DTensor of global shape
    ``[num_expert * mesh.size(), ...]`` whose shard on this rank is ``local`` (``(Shard(0),)`` on ``mesh``). Every
    rank holds the same number of experts (checked at the layer's construction), so the shards are even."""
    if mesh is None:
        return nn.Parameter(local)
    from torch.distributed.tensor import DTensor, Shard

    global_shape = torch.Size([local.shape[0] * mesh.size(), *local.shape[1:]])
    stride = torch.empty(global_shape, device="meta").stride()
    return nn.Parameter(
        DTensor.from_local(local, mesh, (Shard(0),), run_check=False, shape=global_shape, stride=stride)
    )


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's experts of ``param``: the local shard of a DTensor (differentiable: the gradient reaches the
    DTensor as a ``Shard(0)`` DTensor), or the tensor itself."""
    return param.to_local() if hasattr(param, "to_local") else param
