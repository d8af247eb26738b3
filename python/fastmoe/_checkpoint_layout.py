"""How a model's state maps onto a checkpoint: which entries are experts (and of which global expert), and how
state dicts and optimizer state are split per expert and merged back, for :mod:`fastmoe.checkpoint`."""

from dataclasses import dataclass

import torch
from torch import nn

from fastmoe import _checkpoint_io as io
from fastmoe._checkpoint_io import CheckpointError
from fastmoe._groups import expert_shards
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
    for name, module in model.named_modules():
        if not isinstance(module, FMoE) or any(name.startswith(outer.prefix) for outer in layers.values()):
            continue
        if not hasattr(module, "experts"):
            raise CheckpointError(f"FMoE layer {name or '<model>'!r} has no experts module")
        layer = Layer(name, bool(module.experts_fused), int(module.num_expert), int(module.world_size), 0)
        layer.moe_rank = moe_rank(module)
        layer.mesh = getattr(module, "moe_mesh", None)
        if not 0 <= layer.moe_rank < layer.ep_size:
            raise CheckpointError(f"FMoE layer {name!r}: moe_rank={layer.moe_rank} is outside [0, {layer.ep_size})")
        layers[name] = layer
    for name, _, shard in expert_shards(model):
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
        layers[parent] = Layer(parent, True, shard.num_expert, shard.world_size, shard.moe_rank)
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


def cpu(value):
    """A CPU tensor that owns exactly its data (a slice would otherwise save its whole storage)."""
    if not isinstance(value, torch.Tensor):
        return value
    t = value.detach()
    if t.device.type != "cpu":
        return t.cpu()
    whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
    return t if whole else t.clone()


_DCP_HINT = (
    "save it with torch.distributed.checkpoint (DCP), which reads DTensor placements (docs/distributed.md, "
    "'DeviceMesh and DTensor experts')"
)


def is_dtensor(value) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def local_experts(key: str, value, layer: Layer):
    """This rank's experts of an expert entry: a DTensor of a mesh layer (``Shard(0)`` over its ``moe_mesh``) is
    its local shard, ``[num_expert, ...]``, the layout a process-group layer holds; anything else as it is. A
    DTensor placed otherwise (a layer that FSDP2 shards further) raises."""
    if not is_dtensor(value):
        return value
    from torch.distributed.tensor import Shard

    if layer.mesh is None or value.device_mesh != layer.mesh or tuple(value.placements) != (Shard(0),):
        raise CheckpointError(
            f"{key!r} of FMoE layer {layer.name or '<model>'!r} is a DTensor placed {tuple(value.placements)} on "
            f"{value.device_mesh}; fastmoe.checkpoint reads expert DTensors sharded (Shard(0),) over the layer's "
            f"moe_mesh only (FSDP2 shards them further): {_DCP_HINT}"
        )
    return value.to_local()


def check_plain(key: str, value) -> None:
    """Replicated entries must be plain tensors: a DTensor outside the experts (a model under FSDP2) is not one
    value every rank holds."""
    if is_dtensor(value):
        raise CheckpointError(
            f"{key!r} is a DTensor placed {tuple(value.placements)} on {value.device_mesh}, but fastmoe.checkpoint "
            f"saves everything outside the experts once, as a value every rank holds: {_DCP_HINT}"
        )


def like(saved, current):
    """``saved`` (this rank's experts, a plain tensor) as a DTensor placed like ``current`` when that is one."""
    if not is_dtensor(current) or not isinstance(saved, torch.Tensor):
        return saved
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        saved, current.device_mesh, current.placements, run_check=False, shape=current.shape, stride=current.stride()
    )


def describe(value) -> list:
    if isinstance(value, torch.Tensor):
        return [list(value.shape), str(value.dtype).removeprefix("torch.")]
    return [None, type(value).__name__]


# ----------------------------------------------------------------------------------------------- splitting (save)


def split_model(model, layers, want_common: bool, writers: set[str]):
    """``(common {key: value}, experts {layer: {global id: {suffix: value}}})`` of this rank's state dict."""
    common, experts = {}, {name: {} for name in writers}
    for key, value in model.state_dict().items():
        hit = expert_key(layers, key)
        if hit is None:
            check_plain(key, value)
            if want_common:
                common[key] = cpu(value)
            continue
        layer, local, suffix = hit
        value = local_experts(key, value, layer)
        if layer.name not in writers:
            continue
        if local is not None:
            experts[layer.name].setdefault(layer.first_expert + local, {})[suffix] = cpu(value)
            continue
        if not isinstance(value, torch.Tensor) or value.dim() < 1 or value.shape[0] != layer.num_expert:
            raise CheckpointError(
                f"fused expert entry {key!r} must have a leading dim of num_expert={layer.num_expert}, got "
                f"{describe(value)}"
            )
        for local_idx, g in enumerate(layer.global_ids()):
            experts[layer.name].setdefault(g, {})[suffix] = cpu(value[local_idx])
    return common, experts


def optimizer_params(model, optimizer):
    """``[(group index, param, name)]`` in the optimizer's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    entries = []
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if id(p) not in names:
                raise CheckpointError(
                    f"optimizer.param_groups[{gi}]['params'][{pi}] (shape {list(p.shape)}) is not a parameter of the "
                    f"model"
                )
            entries.append((gi, p, names[id(p)]))
    return entries


def split_fused_state(state: dict, param, layer: Layer, name: str) -> list:
    """One ``{"split": ..., "shared": ...}`` per local expert: state tensors with the parameter's leading expert
    dim are sliced, 0-d tensors and plain values (``step``) are copied. DTensors count by their local shards."""
    split, shared = {}, {}
    param = local_experts(name, param, layer)
    for key, value in state.items():
        value = local_experts(f"optimizer state {key!r} of {name}", value, layer)
        if isinstance(value, torch.Tensor) and value.dim() == param.dim() and value.shape[0] == layer.num_expert:
            split[key] = value
        elif not isinstance(value, torch.Tensor) or value.dim() == 0:
            shared[key] = cpu(value)
        else:
            raise CheckpointError(
                f"optimizer state {key!r} of expert parameter {name!r} has shape {list(value.shape)}; only state "
                f"tensors with the parameter's leading expert dim (parameter shape {list(param.shape)}) or 0-d "
                f"values can be resharded"
            )
    return [
        {"split": {k: cpu(v[local]) for k, v in split.items()}, "shared": shared} for local in range(layer.num_expert)
    ]


def split_optimizer(model, optimizer, layers, want_common: bool, writers: set[str]):
    groups = [
        {"hyper": {k: v for k, v in g.items() if k not in ("params", "param_names")}, "params": []}
        for g in optimizer.param_groups
    ]
    common, experts = {}, {name: {} for name in writers}
    for gi, param, name in optimizer_params(model, optimizer):
        canon = canonical(layers, name)
        if canon not in groups[gi]["params"]:
            groups[gi]["params"].append(canon)
        state = optimizer.state.get(param) or {}
        hit = expert_key(layers, name)
        if hit is None:
            for key, value in state.items():
                check_plain(f"optimizer state {key!r} of {name}", value)
            if want_common and state:
                common[name] = {k: cpu(v) for k, v in state.items()}
            continue
        layer, local, suffix = hit
        if layer.name not in writers or not state:
            continue
        if local is not None:
            entry = {"split": {}, "shared": {k: cpu(v) for k, v in state.items()}}
            experts[layer.name].setdefault(layer.first_expert + local, {})[suffix] = entry
            continue
        for g, entry in zip(layer.global_ids(), split_fused_state(state, param, layer, name), strict=True):
            experts[layer.name].setdefault(g, {})[suffix] = entry
    return {"state": common, "groups": groups}, experts


def plan_writers(everyone: list) -> dict[str, dict[int, int]]:
    """For each layer, the global rank that writes the experts of each moe_rank (the lowest rank holding them).
    Every rank computes this from the same gathered data, so every rank raises the same error."""
    names = set(everyone[0]["layers"])
    for r, info in enumerate(everyone):
        if set(info["layers"]) != names:
            raise CheckpointError(f"rank {r} has MoE layers {sorted(info['layers'])}, rank 0 has {sorted(names)}")
        if info["optimizer"] != everyone[0]["optimizer"]:
            raise CheckpointError(f"optimizer passed on some ranks and None on others (rank {r}: {info['optimizer']})")
    plan = {}
    for name in sorted(names):
        _, ep_size, num_expert, fused = everyone[0]["layers"][name]
        holders: dict[int, int] = {}
        for r, info in enumerate(everyone):
            moe_rank, ep_r, num_r, fused_r = info["layers"][name]
            if (ep_r, num_r, fused_r) != (ep_size, num_expert, fused):
                raise CheckpointError(
                    f"layer {name!r}: rank {r} has EP size {ep_r} x {num_r} experts (fused={fused_r}), rank 0 has "
                    f"{ep_size} x {num_expert} (fused={fused})"
                )
            holders.setdefault(moe_rank, r)
        missing = [m for m in range(ep_size) if m not in holders]
        if missing:
            raise CheckpointError(
                f"layer {name!r}: no rank holds the experts of moe_rank {missing} (EP size {ep_size})"
            )
        plan[name] = holders
    return plan


def merge_fused_state(entries: dict, name: str):
    """The optimizer state of a fused expert parameter from its per-expert entries ``{global id: entry}`` (in
    local order): split tensors stacked, shared values taken once (they must agree)."""
    if all(e is None for e in entries.values()):
        return None
    ids = list(entries)
    first = next(e for e in entries.values() if e is not None)
    for g, e in entries.items():
        if e is None or set(e["split"]) != set(first["split"]) or set(e["shared"]) != set(first["shared"]):
            raise CheckpointError(
                f"optimizer state of {name!r}: global expert {g} has keys "
                f"{None if e is None else sorted(e['split']) + sorted(e['shared'])}, expert {ids[0]} has "
                f"{sorted(first['split']) + sorted(first['shared'])}; the experts of one fused parameter need the same"
            )
        for k, v in e["shared"].items():
            same = torch.equal(v, first["shared"][k]) if isinstance(v, torch.Tensor) else v == first["shared"][k]
            if not same:
                raise CheckpointError(
                    f"optimizer state {k!r} of {name!r}: global expert {g} has {v!r}, expert {ids[0]} has "
                    f"{first['shared'][k]!r}; one fused parameter needs one value"
                )
    out = dict(first["shared"])
    for k in first["split"]:
        out[k] = torch.stack([e["split"][k] for e in entries.values()])
    return out
