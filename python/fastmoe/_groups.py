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


def env_seconds(name: str, default: float) -> float:
    """The environment variable ``name`` as a positive, finite number of seconds (``default`` when unset or empty);
    anything else is a ValueError naming the variable and its value."""
    value = os.environ.get(name, "")
    if value == "":
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


def comm_timeout() -> float:
    """``FASTMOE_COMM_TIMEOUT`` in seconds (default 60): how long a fastmoe collective waits for its peers before
    it raises. The C++ exchanges read the same variable (once per process)."""
    return env_seconds("FASTMOE_COMM_TIMEOUT", 60.0)


def _describe(group) -> str:
    return f"group '{group.group_name}' (rank {dist.get_rank(group)} of {dist.get_world_size(group)})"


def _wait(work, what: str, group, extra_seconds: float = 0.0) -> None:
    """Waits for the async collective ``work`` at most :func:`comm_timeout`. ``Work.wait(timeout)`` raises on gloo
    when the time is up (the blocking form would wait for the process group's own timeout, 30 minutes by
    default); on NCCL it raises as well, and torch's watchdog then aborts the communicator."""
    global _collectives_issued
    _collectives_issued = True
    timeout = comm_timeout() + extra_seconds
    try:
        if work.wait(timeout=datetime.timedelta(seconds=timeout)) is not False:
            return
        cause = "the wait returned without completing"
    except RuntimeError as error:
        cause = str(error)
    raise RuntimeError(
        f"fastmoe: the {what} on {_describe(group)} failed or did not complete within {timeout:g} s "
        f"(FASTMOE_COMM_TIMEOUT{f' + {extra_seconds:g} s' if extra_seconds else ''}): a peer failed, exited, or is "
        f"not calling the same collectives: {cause}"
    )


def _object_device(group) -> torch.device:
    """Where a byte tensor must live for a collective on ``group``: its CPU backend (gloo) if it has one, else
    the current CUDA device (a NCCL-only group)."""
    backend = str(dist.get_backend(group))
    if "gloo" not in backend and "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_object(obj, group, what: str, extra_seconds: float = 0.0) -> list:
    """``dist.all_gather_object`` with each of its two collectives (the sizes, then the pickled bytes) bounded by
    :func:`comm_timeout` (plus ``extra_seconds`` for the first, when a rank may be late by that much)."""
    device = _object_device(group)
    world = dist.get_world_size(group)
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    work = dist.all_gather(sizes, size, group=group, async_op=True)
    _wait(work, f"{what} (all_gather of the sizes)", group, extra_seconds)
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


# ----------------------------------------------------------------------------------------------- hierarchical exchange

EP_EXCHANGES = ("flat", "hierarchical", "auto")


class GroupMeshes:
    """One 1-D DeviceMesh per (process group, device type): the mesh under which the experts a plain process group
    splits are seen as one DTensor (:meth:`experts_dtensor`)."""

    def __init__(self):
        self.meshes = {}

    def get(self, group, device_type: str):
        from torch.distributed.device_mesh import DeviceMesh

        group = group if group is not None else dist.group.WORLD
        key = (id(group), device_type)
        if key not in self.meshes:
            self.meshes[key] = DeviceMesh.from_group(group, device_type)
        return self.meshes[key]

    def experts_dtensor(self, local: torch.Tensor, group, world_size: int):
        """This rank's experts ``[num_expert, ...]`` (moe rank r holds global experts r * num_expert ...) as the
        DTensor ``[num_expert * world_size, ...]`` placed ``(Shard(0),)`` on the group's mesh, the layout of a layer
        built with a DeviceMesh. It shares ``local``'s memory when ``local`` is contiguous."""
        from torch.distributed.tensor import DTensor, Shard

        shape = (local.shape[0] * world_size, *local.shape[1:])
        stride = torch.empty(shape, device="meta").stride()  # contiguous, allocating nothing
        mesh = self.get(group, local.device.type)
        return DTensor.from_local(local.contiguous(), mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def launcher_local_size(group) -> int | None:
    """How many consecutive ranks of ``group`` share a node, from the launcher's ``LOCAL_WORLD_SIZE`` (torchrun sets
    it and numbers the ranks node by node, so global rank ``g`` is on node ``g // LOCAL_WORLD_SIZE``). ``None`` when
    the variable is unset, or when the group's ranks are not laid out node by node in equal blocks."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    if value == "":
        return None
    try:
        per_node = int(value)
    except ValueError:
        per_node = 0
    if per_node < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE must be a positive integer, got {value!r}")
    nodes = [g // per_node for g in dist.get_process_group_ranks(group)]
    local = nodes.count(nodes[0])
    blocks = [nodes[i : i + local] for i in range(0, len(nodes), local)]
    node_by_node = len(nodes) % local == 0 and all(len(set(b)) == 1 for b in blocks)
    return local if node_by_node and len({b[0] for b in blocks}) == len(blocks) else None


def resolve_ep_exchange(group, ep_exchange: str, ep_local_size: int | None) -> int | None:
    """The ranks per node of the hierarchical exchange an FMoE layer on ``group`` (``None``: no expert parallelism)
    uses, or ``None`` for the flat exchange. ``ep_exchange``: ``"flat"``; ``"hierarchical"`` (over nodes of
    ``ep_local_size`` consecutive ranks of the group, default the launcher's ``LOCAL_WORLD_SIZE``); ``"auto"``:
    hierarchical when the group spans more than one node with more than one of its ranks on each."""
    if ep_exchange not in EP_EXCHANGES:
        raise ValueError(f"ep_exchange must be 'flat', 'hierarchical' or 'auto', got ep_exchange={ep_exchange!r}")
    if ep_local_size is not None and (isinstance(ep_local_size, bool) or not isinstance(ep_local_size, int)):
        raise TypeError(f"ep_local_size must be an int or None, got ep_local_size={ep_local_size!r}")
    if ep_local_size is not None and ep_local_size < 1:
        raise ValueError(f"ep_local_size must be >= 1, got ep_local_size={ep_local_size}")
    if group is None:
        if ep_exchange == "hierarchical":
            raise ValueError(
                "ep_exchange='hierarchical' needs expert parallelism (world_size > 1 or a moe_group), got one process"
            )
        return None
    world = dist.get_world_size(group)
    local = ep_local_size if ep_local_size is not None else launcher_local_size(group)
    if ep_local_size is not None and world % ep_local_size != 0:
        raise ValueError(
            f"ep_local_size={ep_local_size} must divide the {world} ranks of the expert-parallel group (nodes of "
            f"ep_local_size ranks each)"
        )
    if ep_exchange == "flat":
        return None
    if ep_exchange == "hierarchical":
        if local is None:
            raise ValueError(
                "ep_exchange='hierarchical' needs ep_local_size (ranks per node), or LOCAL_WORLD_SIZE from a "
                "launcher that numbers the ranks node by node; got neither"
            )
        return local if world > 1 else None
    return local if local is not None and 1 < local < world else None


_subgroups: dict = {}


def _subgroup(ranks: list):
    """The gloo group of these global ranks, created once per process (by its members only). gloo is enough: CPU
    rows and the small counts go through it, and CUDA rows through fastmoe's own NCCL communicator, which the group
    bootstraps."""
    key = tuple(ranks)
    if key not in _subgroups:
        _subgroups[key] = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)
    return _subgroups[key]


def hierarchical_groups(group, local_size: int) -> tuple[str, str]:
    """``(node_group, rail_group)``: the names of the two sub-groups of ``group``'s hierarchical exchange over nodes
    of ``local_size`` consecutive ranks (``torch.ops.fastmoe.exchange_hierarchical``): this rank's node (its
    ``local_size`` ranks) and its rail (the ranks of its local index, one per node). Every rank of ``group`` must
    call it, in the same order as its other group creations (each sub-group is created by its members only)."""
    ranks = dist.get_process_group_ranks(group)
    if local_size < 1 or len(ranks) % local_size != 0:
        raise ValueError(f"local_size={local_size} must divide the {len(ranks)} ranks of group '{group.group_name}'")
    node, local = divmod(dist.get_rank(group), local_size)
    node_group = _subgroup(ranks[node * local_size : (node + 1) * local_size])
    rail_group = _subgroup(ranks[local::local_size])
    return node_group.group_name, rail_group.group_name
