"""How a model's state maps onto a checkpoint, for :mod:`fastmoe.checkpoint`: which entries are experts (and of
which global expert), and the view of the model and optimizer state that torch.distributed.checkpoint (DCP) writes
and reads, in which every name and shape is the one-process model's, whatever the EP size."""

from dataclasses import dataclass

import torch
from torch import nn

from fastmoe import _checkpoint_io as io
from fastmoe._checkpoint_io import CheckpointError
from fastmoe._groups import GroupMeshes, expert_shards
from fastmoe.layers import FMoE

# ----------------------------------------------------------------------------------------------- model layout


@dataclass
class Layer:
    name: str  # module name in the model ("" when the model is the layer)
    fused: bool  # experts stacked with a leading [num_expert] dim, else one module per local expert
    num_expert: int  # on this rank
    ep_size: int
    moe_rank: int
    mesh: object = None  # the layer's moe_mesh: its fused experts are DTensors sharded (Shard(0),) over it
    group: object = None  # the process group of a layer without a mesh (None: the default group)

    @property
    def num_experts_total(self) -> int:
        return self.num_expert * self.ep_size

    @property
    def prefix(self) -> str:
        return f"{self.name}.experts." if self.name else "experts."

    @property
    def first_expert(self) -> int:
        return self.moe_rank * self.num_expert

    def global_ids(self) -> range:
        return range(self.first_expert, self.first_expert + self.num_expert)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside data-parallel wrappers, so keys do not depend on the wrapping."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or (
        type(model).__name__ == "DistributedGroupedDataParallel"
        and isinstance(getattr(model, "module", None), nn.Module)
    ):
        model = model.module
    return model


# Module names that torch's state-dict APIs leave out of the keys: torch.compile's wrapper and activation
# checkpointing's. Layer and parameter names are taken without them, so that they match the state dict's keys.
_WRAPPER_SEGMENTS = ("_orig_mod", "_checkpoint_wrapped_module")


def clean_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def moe_rank(layer: FMoE) -> int:
    moe_rank = getattr(layer, "moe_rank", None)
    if moe_rank is not None:
        return int(moe_rank)
    if layer.world_size == 1:
        return 0
    if not io.dist_on():
        raise CheckpointError(f"an FMoE layer has world_size={layer.world_size} but no process group is initialised")
    return torch.distributed.get_rank(getattr(layer, "moe_group", None))


def moe_layers(model: nn.Module) -> dict[str, Layer]:
    """Every FMoE layer of ``model`` by module name (layers nested inside another layer's experts belong to it), and
    the parent of every experts module that records an ExpertShard."""
    layers: dict[str, Layer] = {}
    for raw_name, module in model.named_modules():
        name = clean_name(raw_name)
        if not isinstance(module, FMoE) or any(name.startswith(outer.prefix) for outer in layers.values()):
            continue
        if not hasattr(module, "experts"):
            raise CheckpointError(f"FMoE layer {name or '<model>'!r} has no experts module")
        layer = Layer(name, bool(module.experts_fused), int(module.num_expert), int(module.world_size), 0)
        layer.moe_rank = moe_rank(module)
        layer.mesh = getattr(module, "moe_mesh", None)
        layer.group = getattr(module, "moe_group", None)
        if not 0 <= layer.moe_rank < layer.ep_size:
            raise CheckpointError(f"FMoE layer {name!r}: moe_rank={layer.moe_rank} is outside [0, {layer.ep_size})")
        layers[name] = layer
    for raw_name, _, shard in expert_shards(model):
        name = clean_name(raw_name)
        # An experts module that is not an FMoE layer (the Hugging Face experts that fastmoe.use_fastmoe runs) holds
        # its experts as its own parameters: it counts as the fused experts of its parent, as an FMoE's do.
        parent, _, attribute = name.rpartition(".")
        if attribute != "experts":
            raise CheckpointError(
                f"the experts module {name!r} ({shard}) must be its parent's 'experts' attribute to be saved as the "
                f"experts of layer {parent or '<model>'!r}"
            )
        if any(name.startswith(outer.prefix) for outer in layers.values()):
            raise CheckpointError(f"the experts module {name!r} lies inside the experts of another MoE layer")
        layers[parent] = Layer(parent, True, shard.num_expert, shard.world_size, shard.moe_rank, group=shard.group)
    return layers


def expert_key(layers: dict[str, Layer], key: str):
    """``(layer, local expert index or None when fused, suffix)`` for a state-dict key under a layer's experts;
    None for a replicated key."""
    for layer in layers.values():
        if key.startswith(layer.prefix):
            rest = key[len(layer.prefix) :]
            if layer.fused:
                return layer, None, rest
            index, dot, suffix = rest.partition(".")
            if not dot or not index.isdigit():
                raise CheckpointError(f"expert key {key!r} does not start with {layer.prefix}<local expert index>.")
            return layer, int(index), suffix
    return None


def canonical(layers: dict[str, Layer], name: str) -> str:
    """A parameter name that does not depend on the EP size (the local index of a per-expert module is '*')."""
    hit = expert_key(layers, name)
    if hit is None or hit[1] is None:
        return name
    return f"{hit[0].prefix}*.{hit[2]}"


def is_dtensor(value) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


# ----------------------------------------------------------------------------------------------- the DCP view
#
# DCP writes a DTensor once per distinct shard (every rank its own) and a plain tensor once under its key (a value
# every rank holds), and reads both back resharded to the loading job's layout. The view below gives it the
# one-process model's names and shapes on every rank:
#
# - entries outside the experts, and DTensors (the experts of a mesh layer, anything under FSDP2), as they are;
# - the fused experts of a layer over a process group, ``[num_expert, ...]`` on each rank, as the DTensor
#   ``[num_expert * ep_size, ...]`` sharded (Shard(0),) over that group: the layout of a mesh layer;
# - the per-expert modules of such a layer under their global index (``experts.<moe_rank * num_expert + i>``).
#
# Optimizer state follows its parameter (``optim.state.<parameter key>.<state name>``); values that are not tensors
# (and the param groups) are not given to DCP: fastmoe.checkpoint keeps them in its own state file.

MODEL = "model."
OPTIM_STATE = "optim.state."


@dataclass
class Entry:
    """Where a DCP key comes from: the model's own state-dict key (``kind`` "model"), or the optimizer state
    ``name`` of the model's parameter ``key`` (``kind`` "optim"); ``wrapped``: a plain tensor shown as a DTensor."""

    kind: str
    key: str
    name: str | None
    wrapped: bool


@dataclass
class View:
    tensors: dict  # DCP key -> tensor or DTensor of the one-process model's shape
    objects: dict  # DCP key -> a value that is not a tensor
    entries: dict  # DCP key -> Entry
    groups: list  # per optimizer param group: {"hyper": {...}, "params": [canonical parameter names]}


def global_key(layers: dict[str, Layer], key: str) -> tuple[str, Layer | None]:
    """``(the key in the one-process model, the layer whose fused experts it holds or None)``."""
    hit = expert_key(layers, key)
    if hit is None:
        return key, None
    layer, local, suffix = hit
    if local is not None:
        return f"{layer.prefix}{layer.first_expert + local}.{suffix}", None
    return key, layer


def _as_global(value, layer: Layer, meshes: GroupMeshes):
    """This rank's experts ``[num_expert, ...]`` of a layer over a process group as the layer-wide DTensor."""
    return meshes.experts_dtensor(value, layer.group, layer.ep_size)


def _shard_kind(what: str, value, layer: Layer, is_state: bool) -> str:
    """How a value under a process-group layer's fused experts is shown: "wrap" (a leading expert dim), "plain"
    (an optimizer state 0-d tensor or a non-tensor, the same for every expert, such as Adam's ``step``), or an
    error naming what cannot be resharded."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == layer.num_expert:
        return "wrap"
    if is_state and (not isinstance(value, torch.Tensor) or value.dim() == 0):
        return "plain"
    shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
    raise CheckpointError(
        f"{what} of FMoE layer {layer.name or '<model>'!r} is {shape}; a fused expert entry needs a leading dim of "
        f"num_expert={layer.num_expert}" + (" (or be 0-d, the same for every expert)" if is_state else "")
    )


def optimizer_names(model: nn.Module, optimizer) -> list[list[tuple[str, torch.Tensor]]]:
    """``(the model's name, the parameter)`` of every parameter of every param group of ``optimizer``."""
    names = {id(p): clean_name(n) for n, p in model.named_parameters()}
    out = []
    for gi, group in enumerate(optimizer.param_groups):
        out.append([])
        for pi, p in enumerate(group["params"]):
            if id(p) not in names:
                raise CheckpointError(
                    f"optimizer.param_groups[{gi}]['params'][{pi}] (shape {list(p.shape)}) is not a parameter of the "
                    f"model"
                )
            out[-1].append((names[id(p)], p))
    return out


def _check_experts_found(layers: dict[str, Layer], keys) -> None:
    """Every expert-parallel layer must own entries of the state dict: a layer whose experts the state dict names
    otherwise (a wrapper the names do not account for) would be saved as one value every rank claims."""
    found = {hit[0].name for key in keys if (hit := expert_key(layers, key)) is not None}
    for name, layer in layers.items():
        if layer.ep_size > 1 and name not in found:
            raise CheckpointError(
                f"no state-dict entry lies under {layer.prefix!r}, the experts of MoE layer {name or '<model>'!r}: "
                f"the model's state dict names them otherwise (a module wrapper fastmoe.checkpoint does not know), "
                f"so they cannot be told from values every rank holds"
            )


def present(model: nn.Module, optimizer, layers: dict[str, Layer]) -> View:
    """This rank's model (and optimizer) state in the one-process model's names and shapes (see above)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    view, meshes = View({}, {}, {}, []), GroupMeshes()

    def add(dkey: str, value, entry: Entry, layer: Layer | None):
        if layer is not None and layer.ep_size > 1 and layer.mesh is None and is_dtensor(value):
            # FSDP2 over the ranks that hold the same experts: its DTensor is of this EP rank's experts only, under
            # a name every EP rank uses
            raise CheckpointError(
                f"{entry.key!r} of MoE layer {layer.name or '<model>'!r} (experts over a process group) is a DTensor "
                f"placed {tuple(value.placements)} on {value.device_mesh}: sharding the experts of a process-group "
                f"layer further (FSDP2) is not supported; build the layer with moe_group=<DeviceMesh> (its experts "
                f"are then DTensors of the whole layer that FSDP2 shards further), docs/distributed.md"
            )
        if layer is not None and layer.ep_size > 1 and not is_dtensor(value):
            what = f"{entry.key!r}" if entry.name is None else f"optimizer state {entry.name!r} of {entry.key!r}"
            if _shard_kind(what, value, layer, entry.name is not None) == "wrap":
                value, entry.wrapped = _as_global(value.detach(), layer, meshes), True
        (view.tensors if isinstance(value, torch.Tensor) else view.objects)[dkey] = value
        view.entries[dkey] = entry

    model_state = get_model_state_dict(model)
    _check_experts_found(layers, model_state)
    for key, value in model_state.items():
        gkey, layer = global_key(layers, key)
        add(MODEL + gkey, value, Entry("model", key, None, False), layer)
    if optimizer is None:
        return view
    for gi, names in enumerate(optimizer_names(model, optimizer)):
        hyper = {k: v for k, v in optimizer.param_groups[gi].items() if k not in ("params", "param_names")}
        view.groups.append({"hyper": hyper, "params": sorted({canonical(layers, n) for n, _ in names})})
        for name, param in names:
            gkey, layer = global_key(layers, name)
            for state_name, value in (optimizer.state.get(param) or {}).items():
                add(f"{OPTIM_STATE}{gkey}.{state_name}", value, Entry("optim", name, state_name, False), layer)
    return view


def targets(model: nn.Module, optimizer, layers: dict[str, Layer], saved: dict) -> View:
    """The view of :func:`present` with, for the optimizer, a tensor to load into for every state entry the
    checkpoint holds (``saved``: DCP key -> (global shape, dtype)), placed like the parameter's state would be."""
    view = present(model, None, layers)
    if optimizer is None:
        return view
    from torch.distributed.tensor import DTensor

    saved_state = {}  # parameter key in the one-process model -> [(state name, global shape, dtype)]
    for dkey, (shape, dtype) in saved.items():
        if dkey.startswith(OPTIM_STATE):  # state names hold no '.'
            gkey, _, state_name = dkey.removeprefix(OPTIM_STATE).rpartition(".")
            saved_state.setdefault(gkey, []).append((state_name, shape, dtype))
    meshes = GroupMeshes()
    for names in optimizer_names(model, optimizer):
        for name, param in names:
            gkey, layer = global_key(layers, name)
            for state_name, shape, dtype in saved_state.get(gkey, []):
                dkey = f"{OPTIM_STATE}{gkey}.{state_name}"
                entry = Entry("optim", name, state_name, False)
                if layer is not None and layer.ep_size > 1 and not isinstance(param, DTensor) and shape:
                    local = torch.zeros((layer.num_expert, *shape[1:]), dtype=dtype, device=param.device)
                    value, entry.wrapped = _as_global(local, layer, meshes), True
                elif tuple(shape) == tuple(param.shape) and shape:
                    value = torch.zeros_like(param.detach(), dtype=dtype)  # a DTensor parameter gives a DTensor
                elif not shape:  # step: on the CPU, where torch.optim keeps it (load_state_dict moves it if need be)
                    value = torch.zeros((), dtype=dtype)
                else:
                    value = torch.zeros(shape, dtype=dtype, device=param.device)
                view.tensors[dkey] = value
                view.entries[dkey] = entry
    return view


def restore(view: View, objects: dict, loaded: set[str]) -> tuple[dict, dict]:
    """``(model state dict, {parameter key: optimizer state})`` in the model's own keys from a loaded view: the
    tensors of ``loaded`` (DCP filled them in place) and the values of ``objects``."""
    model_state, optim_state = {}, {}
    for dkey, entry in view.entries.items():
        if dkey in loaded:
            value = view.tensors[dkey]
            value = value.to_local() if entry.wrapped else value
        elif dkey in objects:
            value = objects[dkey]
        else:
            continue
        if entry.kind == "model":
            model_state[entry.key] = value
        else:
            optim_state.setdefault(entry.key, {})[entry.name] = value
    return model_state, optim_state
