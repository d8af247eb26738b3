"""Process-group plumbing shared by the layers and fastmoe.distributed: resolving a layer's expert-parallel group,
the configuration check across its ranks, and collectives bounded by ``FASTMOE_COMM_TIMEOUT``. A module of its own
so that fastmoe.layers needs nothing from fastmoe.distributed (which imports the layers)."""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import math
import os
import pickle
import time

import torch
import torch.distributed as dist


def comm_timeout() -> float:
    """``FASTMOE_COMM_TIMEOUT`` in seconds (default 60): how long a fastmoe collective waits for its peers before
    it raises. The C++ exchanges read the same variable (once per process)."""
    value = os.environ.get("FASTMOE_COMM_TIMEOUT", "")
    if value == "":
        return 60.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"FASTMOE_COMM_TIMEOUT must be a positive number of seconds, got {value!r}")
    return seconds


def _describe(group) -> str:
    return f"group '{group.group_name}' (rank {dist.get_rank(group)} of {dist.get_world_size(group)})"


def _wait(work, what: str, group) -> None:
    """Waits for the async collective ``work`` at most :func:`comm_timeout`. ``Work.wait(timeout)`` raises on gloo
    when the time is up (the blocking form would wait for the process group's own timeout, 30 minutes by
    default); on NCCL it raises as well, and torch's watchdog then aborts the communicator."""
    global _collectives_issued
    _collectives_issued = True
    timeout = comm_timeout()
    try:
        if work.wait(timeout=datetime.timedelta(seconds=timeout)) is not False:
            return
        cause = "the wait returned without completing"
    except RuntimeError as error:
        cause = str(error)
    raise RuntimeError(
        f"fastmoe: the {what} on {_describe(group)} failed or did not complete within {timeout:g} s "
        f"(FASTMOE_COMM_TIMEOUT): a peer failed, exited, or is not calling the same collectives: {cause}"
    )


def _object_device(group) -> torch.device:
    """Where a byte tensor must live for a collective on ``group``: its CPU backend (gloo) if it has one, else
    the current CUDA device (a NCCL-only group)."""
    backend = str(dist.get_backend(group))
    if "gloo" not in backend and "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_object(obj, group, what: str) -> list:
    """``dist.all_gather_object`` with each of its two collectives (the sizes, then the pickled bytes) bounded by
    :func:`comm_timeout`."""
    device = _object_device(group)
    world = dist.get_world_size(group)
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    _wait(dist.all_gather(sizes, size, group=group, async_op=True), f"{what} (all_gather of the sizes)", group)
    lengths = [int(s) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    gathered = [torch.empty_like(padded) for _ in range(world)]
    _wait(dist.all_gather(gathered, padded, group=group, async_op=True), f"{what} (all_gather)", group)
    return [pickle.loads(g[:n].cpu().numpy().tobytes()) for g, n in zip(gathered, lengths, strict=True)]


def _let_collective_threads_finish() -> None:
    """At interpreter exit, before Python finalises: a gloo work releases its tensors on the process group's own
    thread after the waiting rank has moved on, and releasing a tensor that Python wrapped takes the GIL. When the
    process group outlives ``destroy_process_group`` (a model still holds it, as an expert-parallel layer does)
    and that release comes while Python is finalising, the thread is killed mid-release and the process aborts
    ("terminate called without an active exception"). Giving up the GIL for a moment here lets those releases
    finish first."""
    if dist.is_available() and _collectives_issued:
        time.sleep(0.05)


_collectives_issued = False
atexit.register(_let_collective_threads_finish)


def _require_initialized(what: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{what} needs torch.distributed: call torch.distributed.init_process_group first")


def is_device_mesh(value) -> bool:
    """Whether ``value`` is a ``torch.distributed.DeviceMesh`` (False where torch.distributed is not built)."""
    if not dist.is_available():
        return False
    from torch.distributed.device_mesh import DeviceMesh

    return isinstance(value, DeviceMesh)


def resolve_moe_mesh(world_size: int, mesh):
    """``(mesh, group, rank in group)`` for an FMoE layer whose expert-parallel ranks are the 1-D ``mesh`` (a mesh
    of its own or one dimension of a larger one, ``mesh["ep"]``). Its experts become DTensors sharded over the
    expert dimension of ``mesh``; the exchanges run on the mesh's process group."""
    _require_initialized(f"expert parallelism over a DeviceMesh (world_size={world_size}, moe_group={mesh!r})")
    if mesh.ndim != 1:
        names = f" with dimensions {mesh.mesh_dim_names}" if mesh.mesh_dim_names else ""
        raise ValueError(
            f"moe_group must be a 1-D DeviceMesh (the expert-parallel dimension, such as mesh['ep']), got a "
            f"{mesh.ndim}-D mesh of shape {tuple(mesh.shape)}{names}"
        )
    if mesh.get_coordinate() is None:
        raise ValueError(f"this rank ({dist.get_rank()}) is not in moe_group={mesh!r}")
    group, rank = resolve_moe_group(world_size, mesh.get_group())
    return mesh, group, rank


def resolve_moe_group(world_size: int, moe_group):
    """``(group, rank in group)`` for an FMoE layer with ``world_size`` expert-parallel ranks. ``moe_group=None``
    means the default (world) group, whose size must then be ``world_size``."""
    global _collectives_issued
    _collectives_issued = True  # the layer's exchanges are collectives too
    _require_initialized(f"expert parallelism (world_size={world_size}, moe_group={moe_group!r})")
    if moe_group is not None and not isinstance(moe_group, dist.ProcessGroup):
        raise TypeError(
            f"moe_group must be a torch.distributed ProcessGroup, a 1-D DeviceMesh or None, got moe_group={moe_group!r}"
        )
    group = dist.group.WORLD if moe_group is None else moe_group
    size = dist.get_world_size(group)
    if size != world_size:
        name = "the default group" if moe_group is None else "moe_group"
        raise ValueError(f"world_size={world_size} but {name} has {size} ranks; they must be equal")
    return group, dist.get_rank(group)


def check_same_config(group, config: dict, what: str = "FMoE") -> None:
    """Raises ``ValueError`` on every rank of ``group`` when ``config`` (a dict of plain values, compared by their
    ``repr``) differs between ranks, naming each rank, field and value that differs from rank 0's. A collective: a
    rank that does not join (it built ``what`` with another ``world_size`` or group) makes the others raise
    ``RuntimeError`` after :func:`comm_timeout`. The check is the one the C++ modules run
    (``fastmoe::runtime::check_same_config``)."""
    _require_initialized(f"the configuration check of {what}")
    group = dist.group.WORLD if group is None else group
    names = sorted(config)
    torch.ops.fastmoe.check_same_config(group.group_name, names, [repr(config[name]) for name in names], what)


# ----------------------------------------------------------------------------------------------- expert shards

# The attribute of an experts module (not an FMoE layer) that holds its ExpertShard.
EXPERT_SHARD = "_fastmoe_expert_shard"


@dataclasses.dataclass(frozen=True)
class ExpertShard:
    """Recorded on an experts module that is not an FMoE layer but whose own parameters are all experts, each with a
    leading ``[num_expert]`` dim: global experts ``moe_rank * num_expert ...`` of ``num_expert * world_size``, the
    others held by the ranks of ``group``. fastmoe.use_fastmoe records one on each Hugging Face experts module it
    runs; DistributedGroupedDataParallel and fastmoe.checkpoint treat those parameters as the experts of an FMoE
    layer with the same ``world_size`` and ``moe_rank``. Copies of the model share it (a process group cannot be
    copied)."""

    num_expert: int
    world_size: int = 1
    moe_rank: int = 0
    group: object = dataclasses.field(default=None, repr=False, compare=False)

    def __deepcopy__(self, memo):
        return self


def expert_shards(model) -> list:
    """``(path, module, ExpertShard)`` for every module of ``model`` that records one, in module order."""
    return [
        (path, module, shard)
        for path, module in model.named_modules()
        if isinstance(shard := getattr(module, EXPERT_SHARD, None), ExpertShard)
    ]
