"""Expert parallelism and data parallelism across ranks.

- Expert parallelism (EP): ``FMoE(..., world_size=W, moe_group=g)`` places ``num_expert`` experts on each of the
  W ranks of ``g``; global expert ``e`` lives on rank ``e // num_expert``. Tokens travel to their experts and
  back through the ``exchange`` ops (NCCL for CUDA tensors, the group's gloo backend for CPU tensors).
- Data parallelism (DP): :class:`DistributedGroupedDataParallel` averages gradients. Parameters every rank holds
  (gate, attention, embeddings, norms, and experts of layers with ``world_size=1``) are reduced over the
  data-parallel group; sharded experts are reduced over their replica group (the ranks that hold the same
  experts), which is empty when EP spans the whole world.
- :func:`expert_parallel_groups` builds the groups of the usual "EP inside DP" layout.
- :func:`clip_grad_norm_` clips by the global gradient norm of a model whose experts are DTensors (layers built
  with ``moe_group=<DeviceMesh>``) and whose other parameters are plain tensors.

Every collective issued here waits at most ``FASTMOE_COMM_TIMEOUT`` seconds (:func:`comm_timeout`) for its peers
and then raises ``RuntimeError`` naming the collective, the group and the timeout, as the exchanges do in C++: a
rank that never joins (it built its layer with another ``world_size``, it skipped ``allreduce_gradients``) makes
the others raise instead of wait.

docs/distributed.md has the launch recipes (torchrun, several nodes) and the layouts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fastmoe._groups import (  # noqa: F401  (check_same_config, resolve_moe_group: public names here)
    GroupMeshes,
    _all_gather_object,
    _require_initialized,
    _wait,
    check_same_config,
    comm_timeout,
    expert_shards,
    resolve_moe_group,
)
from fastmoe.layers import FMoE

__all__ = [
    "DistributedGroupedDataParallel",
    "clip_grad_norm_",
    "expert_parallel_groups",
    "resolve_moe_group",
    "check_same_config",
    "comm_timeout",
]


def expert_parallel_groups(ep_size: int):
    """Builds the groups of the "EP inside DP" layout on all ranks (a collective: every rank calls it).

    The world's ranks form blocks of ``ep_size`` consecutive ranks, each one expert-parallel group; rank ``r``
    holds the experts of EP rank ``r % ep_size``. Returns ``(moe_group, expert_dp_group)`` for this rank:
    ``moe_group`` is its block, ``expert_dp_group`` the ranks holding the same experts (its replicas). With
    ``ep_size == world_size`` the replica group has one rank. For example 4 ranks with ``ep_size=2``: EP groups
    {0, 1} and {2, 3}, replica groups {0, 2} and {1, 3}.
    """
    _require_initialized("expert_parallel_groups")
    world = dist.get_world_size()
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1 or world % ep_size != 0:
        raise ValueError(f"ep_size must be a positive divisor of the world size {world}, got {ep_size!r}")
    rank = dist.get_rank()
    moe_group = expert_dp_group = None
    for start in range(0, world, ep_size):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(start, start + ep_size)))
        if start <= rank < start + ep_size:
            moe_group = group
    for ep_rank in range(ep_size):
        group = dist.new_group(list(range(ep_rank, world, ep_size)))
        if rank % ep_size == ep_rank:
            expert_dp_group = group
    return moe_group, expert_dp_group


def _moe_layers(module: nn.Module):
    """The FMoE layers of ``module``, then its experts modules that record an ExpertShard (the Hugging Face experts
    that fastmoe.use_fastmoe runs), each seen as such a layer."""
    layers = [m for m in module.modules() if isinstance(m, FMoE)]
    return layers + [_ShardedExperts(m, shard) for _, m, shard in expert_shards(module)]


class _ShardedExperts:
    """An experts module with an ExpertShard as the layer view used here: ``experts`` is the module itself, all of
    whose parameters are experts."""

    def __init__(self, module: nn.Module, shard):
        self.experts, self.world_size, self.moe_rank = module, shard.world_size, shard.moe_rank
        self.moe_group = shard.group


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def _refuse_dtensors(module: nn.Module) -> None:
    """DistributedGroupedDataParallel flattens plain per-rank tensors; a DTensor (the experts of a layer built with
    ``moe_group=<DeviceMesh>``, or a model under FSDP2) is refused before anything is broadcast or reduced."""
    hint = (
        "use FSDP2 (fully_shard over the data-parallel mesh dimension) for DTensor experts, or build the layer with "
        "moe_group=<ProcessGroup> to keep plain per-rank experts (docs/distributed.md, 'DeviceMesh and DTensor "
        "experts')"
    )
    for name, layer in module.named_modules():
        if isinstance(layer, FMoE) and getattr(layer, "moe_mesh", None) is not None:
            raise TypeError(
                f"DistributedGroupedDataParallel cannot reduce the DTensor experts of FMoE layer {name or '<model>'!r} "
                f"(built with moe_group=<DeviceMesh>): {hint}"
            )
    dtensor = _dtensor_type()
    for name, param in module.named_parameters():
        if isinstance(param, dtensor):
            raise TypeError(
                f"DistributedGroupedDataParallel cannot reduce parameter {name!r}, a DTensor placed "
                f"{tuple(param.placements)}: {hint}"
            )


class DistributedGroupedDataParallel(nn.Module):
    """Data parallelism for models with MoE layers (FastMoE's ``DistributedGroupedDataParallel``).

    Wraps ``module``; after ``loss.backward()`` call :meth:`allreduce_gradients` (or pass
    ``auto_allreduce=True`` to run it at the end of every backward). Every gradient ends up as the mean over the
    ``dp_group`` ranks of their local gradients, which is what a single process training on the union of their
    batches computes:

    - parameters every rank holds are all-reduced over ``dp_group`` (default: the world) and divided by its size;
    - experts of a layer with ``world_size > 1`` already hold the sum of every EP rank's contribution (the
      exchange brings the gradients home), so they are all-reduced over their replica group only
      (``expert_dp_group``, or built from the layers' groups when ``None``) and divided by the ``dp_group`` size.

    Which parameters are experts follows from the layers (the parameters under an ``FMoE``'s ``experts``, or of a
    Hugging Face experts module that :func:`fastmoe.use_fastmoe` runs), not from ``dp_comm`` tags, so replicated
    experts (``world_size=1``) are always reduced. With ``need_sync=True`` the parameters are broadcast at
    construction from the first rank of the group that reduces them, so every replica starts equal.

    A model with DTensor parameters (a layer built with ``moe_group=<DeviceMesh>``) is refused at construction with
    a ``TypeError`` naming the layer: FSDP2 is the data-parallel wrapper for those (docs/distributed.md).
    """

    def __init__(
        self,
        module: nn.Module,
        auto_allreduce: bool = False,
        need_sync: bool = True,
        dp_group=None,
        expert_dp_group=None,
        **unused_groups,
    ):
        super().__init__()
        _require_initialized("DistributedGroupedDataParallel")
        _refuse_dtensors(module)
        for name in unused_groups:
            if not name.endswith("_group"):
                raise TypeError(f"DistributedGroupedDataParallel got an unexpected argument {name!r}")
        self.module = module
        self.dp_group = dp_group if dp_group is not None else dist.group.WORLD
        self.dp_size = dist.get_world_size(self.dp_group)
        self._buckets = self._build_buckets(expert_dp_group)
        if need_sync:
            self._sync_params()
        self._hooks = []
        self._queued = False
        if auto_allreduce:
            for param in self.module.parameters():
                if param.requires_grad:
                    self._hooks.append(param.register_post_accumulate_grad_hook(self._queue_allreduce))

    # ------------------------------------------------------------------ grouping

    def _build_buckets(self, expert_dp_group):
        """{group key: (group, [params])}: one entry per reduction group, parameters in module order."""
        expert_params = {}  # id(param) -> "sharded" | "replicated"
        for layer in _moe_layers(self.module):
            if not hasattr(layer, "experts"):
                continue
            kind = "sharded" if layer.world_size > 1 else "replicated"
            for param in layer.experts.parameters():
                expert_params[id(param)] = kind
        sharded_group = None
        self._sharded = [p for p in self.module.parameters() if expert_params.get(id(p)) == "sharded"]
        if self._sharded:
            sharded_group = expert_dp_group if expert_dp_group is not None else self._replica_group()
        buckets = {"dp": (self.dp_group, []), "expert_dp": (sharded_group, [])}
        for param in self.module.parameters():
            if not param.requires_grad:
                continue
            key = "expert_dp" if expert_params.get(id(param)) == "sharded" else "dp"
            buckets[key][1].append(param)
        return {key: value for key, value in buckets.items() if value[1] and value[0] is not None}

    def _replica_group(self):
        """The ranks holding the same experts as this one: ranks whose every EP layer has the same moe_rank.
        Built collectively (all ranks create the same groups in the same order)."""
        layers = [layer for layer in _moe_layers(self.module) if layer.world_size > 1]
        signature = tuple((layer.world_size, layer.moe_rank) for layer in layers)
        world = dist.get_world_size()
        signatures = _all_gather_object(
            signature, dist.group.WORLD, "replica-group discovery of DistributedGroupedDataParallel"
        )
        mine = None
        for sig in sorted(set(signatures)):
            ranks = [r for r in range(world) if signatures[r] == sig]
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if sig == signature:
                mine = group
        return mine

    # ------------------------------------------------------------------ sync and reduce

    @torch.no_grad()
    def _sync_params(self):
        for group, params in self._buckets.values():
            src = dist.get_global_rank(group, 0)
            works = [dist.broadcast(param.data, src=src, group=group, async_op=True) for param in params]
            for work in works:
                _wait(work, "broadcast of the parameters of DistributedGroupedDataParallel", group)

    @torch.no_grad()
    def allreduce_gradients(self, no_scale: bool = False, reduce_after: bool = False, fp32_allreduce: bool = False):
        """Averages the gradients as described in the class docstring. Parameters without a gradient on this
        rank count as zeros, so every rank joins every reduction with the same buffer sizes.

        FastMoE's options: ``no_scale=True`` leaves the sums (no division by the ``dp_group`` size);
        ``reduce_after=True`` divides after the all-reduce instead of before it (before, the default, keeps fp16
        sums from overflowing; after rounds once); ``fp32_allreduce=True`` reduces fp16 and bf16 gradients in
        fp32 and rounds the result back once (fp32 and fp64 are reduced as they are)."""
        for name, value in (("no_scale", no_scale), ("reduce_after", reduce_after), ("fp32_allreduce", fp32_allreduce)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {name}={value!r}")
        for group, params in self._buckets.values():
            by_dtype = {}
            for param in params:
                by_dtype.setdefault(param.dtype, []).append(param)
            for dtype, same_dtype in by_dtype.items():
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in same_dtype]
                flat = torch._utils._flatten_dense_tensors(grads)
                if fp32_allreduce and dtype in (torch.float16, torch.bfloat16):
                    flat = flat.float()
                if not no_scale and not reduce_after:
                    flat.div_(self.dp_size)
                _wait(
                    dist.all_reduce(flat, group=group, async_op=True),
                    "all_reduce of the gradients (DistributedGroupedDataParallel.allreduce_gradients)",
                    group,
                )
                if not no_scale and reduce_after:
                    flat.div_(self.dp_size)
                for param, reduced in zip(same_dtype, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
                    if param.grad is None:
                        param.grad = reduced.to(dtype, copy=True)
                    else:
                        param.grad.copy_(reduced)
        # Parameters reduced over no group (sharded experts with no replicas) still need the 1/dp_size scale.
        if no_scale:
            return
        reduced_ids = {id(p) for _, params in self._buckets.values() for p in params}
        for layer in _moe_layers(self.module):
            if layer.world_size > 1 and hasattr(layer, "experts"):
                for param in layer.experts.parameters():
                    if id(param) not in reduced_ids and param.grad is not None:
                        param.grad.div_(self.dp_size)

    allreduce_params = allreduce_gradients  # FastMoE's alias, same arguments

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the model as one process holding all of it would compute it: the
        parameters every rank holds count once, and every expert shard of the expert-parallel group counts once.
        Call it after :meth:`allreduce_gradients`. Each rank's fp64 norm of each sharded expert parameter is seen as
        one row of a DTensor over its layer's group, so the total is taken by :func:`clip_grad_norm_`'s norm code,
        the same on every rank; clipping each rank's gradients by its own local norm would scale the replicated
        parameters differently on each rank. A collective over the layers' groups. Returns the total norm (fp64)."""
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        norm_type = float(norm_type)

        def norm(grad):  # in fp64, so fp16 and bf16 gradients do not overflow or round the sum
            return torch.linalg.vector_norm(grad.detach(), norm_type, dtype=torch.float64).reshape(1, 1)

        # Each rank's norm of each expert shard, as the [world_size, 1] DTensor of its layer's group: the norm of
        # the per-rank norms is the norm over every rank's shard (for any order: the sums of p-th powers add up).
        norms, meshes = {}, GroupMeshes()
        for layer in _moe_layers(self.module):
            if layer.world_size > 1 and hasattr(layer, "experts"):
                for param in layer.experts.parameters():  # every rank joins each layer's collective
                    local = norm(param.grad) if param.grad is not None else torch.zeros(1, 1, dtype=torch.float64)
                    norms[id(param)] = meshes.experts_dtensor(local.to(param.device), layer.moe_group, layer.world_size)
        parts = [
            norms[id(p)] if id(p) in norms else norm(p.grad)
            for p in self.module.parameters()
            if id(p) in norms or p.grad is not None
        ]
        if not parts:
            return torch.tensor(0.0, dtype=torch.float64)
        total = _total_norm(parts, norm_type, None)
        torch.nn.utils.clip_grads_with_norm_(self.module.parameters(), max_norm, total)
        return total

    def _queue_allreduce(self, _param):
        if self._queued:
            return
        self._queued = True

        def run():
            self._queued = False
            self.allreduce_gradients()

        torch.autograd.Variable._execution_engine.queue_callback(run)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@torch.no_grad()
def clip_grad_norm_(
    parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach=None
):
    """``torch.nn.utils.clip_grad_norm_`` for models that mix DTensor parameters (the experts of a layer built with
    ``moe_group=<DeviceMesh>``, or parameters under FSDP2) and plain ones, which torch's own function refuses
    ("got mixed torch.Tensor and DTensor").

    The norm of the DTensor gradients is taken over all their shards (one collective per mesh and placement, so
    every rank gets the same value), the norm of the plain gradients as they are, and the total ``norm_type``-norm
    of the parts clips every gradient once, as one process holding the whole model would. The plain gradients
    must already be equal on every rank (reduced over the data-parallel ranks: the gate's gradient summed or
    averaged over the ranks' tokens), or the ranks clip by different norms. Every rank must call it with the same
    parameters (it is a collective over the DTensors' meshes). Returns the total norm, a plain tensor.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    max_norm, norm_type = float(max_norm), float(norm_type)
    if max_norm != max_norm or max_norm < 0:
        raise ValueError(f"max_norm must be a number >= 0, got {max_norm}")
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    total = _total_norm([p.grad for p in params], norm_type, foreach)
    groups = {}  # one call per mesh and placement, plain ones apart: torch's foreach ops do not mix them
    for param in params:
        groups.setdefault(_placement(param.grad), []).append(param)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is non-finite ({float(total)}), so they cannot be "
            f"clipped; set error_if_nonfinite=False to clip anyway"
        )
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach)
    return total


def _placement(grad):
    """``(mesh, placements)`` of a DTensor, None for a plain tensor."""
    return (grad.device_mesh, tuple(grad.placements)) if isinstance(grad, _dtensor_type()) else None


def _total_norm(grads: list, norm_type: float, foreach) -> torch.Tensor:
    """The ``norm_type``-norm of ``grads`` taken whole: a DTensor gradient over all its shards (one collective per
    mesh and placement, so every rank gets the same value), a plain one as it is. A plain tensor."""
    groups = {}  # (mesh, placements) of DTensor gradients, or None for plain ones -> gradients
    for grad in grads:
        groups.setdefault(_placement(grad), []).append(grad)
    device = grads[0].device
    norms = []
    for key, group in groups.items():
        norm = torch.nn.utils.get_total_norm(group, norm_type, False, foreach)
        norms.append((norm.full_tensor() if key is not None else norm).to(device))
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)
