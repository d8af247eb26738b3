"""Checkpoints of fastmoe models that load at any expert-parallel (EP) size. See docs/checkpoint.md.

    fastmoe.checkpoint.save(model, optimizer, "ckpt", extra={"step": step})     # on every rank
    info = fastmoe.checkpoint.load(model, optimizer, "ckpt")                    # any EP size; info["extra"]
    state_dict = fastmoe.checkpoint.consolidate("ckpt")                         # for the world_size=1 model

Layout: ``ckpt/<tag>/meta.json``, ``common.pt`` (everything replicated: gate, attention, norms, and their optimizer
state; written by rank 0), ``shard-<rank>.pt`` (the experts one rank holds, one entry per global expert id, with
their optimizer state; each global expert written once), ``rank-<rank>.pt`` (optional per-rank payload), and
``ckpt/latest`` naming the newest tag. A checkpoint is written into a staging folder and renamed to its tag only
when complete; ``latest`` is replaced after that, so a crash never leaves a broken ``latest``. The saving job's
rank 0 holds ``ckpt/.lock`` from choosing the tag until ``latest`` is replaced, so concurrent saves into one folder
take turns. meta.json records the sha256 of every file; load and consolidate check it.
"""

import os
import random
import time

import torch

from fastmoe import _checkpoint_io as io
from fastmoe import _checkpoint_layout as layout
from fastmoe._checkpoint_io import (
    FAULT_ENV,
    FAULT_EXIT_CODE,
    FAULT_POINTS,
    CheckpointError,
    list_checkpoints,
)

__all__ = [
    "CheckpointError",
    "FAULT_ENV",
    "FAULT_EXIT_CODE",
    "FAULT_POINTS",
    "consolidate",
    "latest",
    "list_checkpoints",
    "load",
    "read_meta",
    "rng_state",
    "save",
    "set_rng_state",
]


_shard_file = io.shard_file
_rank_file = io.rank_file


# ----------------------------------------------------------------------------------------------- save


def _prepare(directory: str, tag):
    """Rank 0, holding the folder's lock: clean up after crashed saves, choose the tag, create the staging
    folder."""
    io.clean_leftovers(directory)
    existing = list_checkpoints(directory)
    sequence = 1 + (read_meta(directory, existing[-1])["sequence"] if existing else 0)
    if tag is None:
        tag = f"ckpt-{sequence:06d}"
        while os.path.exists(os.path.join(directory, tag)):
            sequence += 1
            tag = f"ckpt-{sequence:06d}"
    if os.path.exists(os.path.join(directory, tag)):
        raise CheckpointError(f"checkpoint {os.path.join(directory, tag)} already exists; save under a new tag")
    staging = io.new_staging(directory, tag)
    io.fsync_dir(directory)
    return tag, sequence, staging


def _write_rank(model, optimizer, layers, plan, staging, rank, extra, rank_extra):
    if not os.path.isdir(staging):
        raise CheckpointError(
            f"the staging folder {staging} that rank 0 made is not visible on rank {rank}: the checkpoint folder "
            f"must be on a filesystem every rank sees"
        )
    writers = {name for name, holders in plan.items() if holders[layers[name].moe_rank] == rank}
    common, experts = layout.split_model(model, layers, rank == 0, writers)
    optim_common, optim_experts = (None, {})
    if optimizer is not None:
        optim_common, optim_experts = layout.split_optimizer(model, optimizer, layers, rank == 0, writers)
    files, expert_params = {}, {}
    if writers:
        payload = {}
        for name in writers:
            payload[name] = {
                g: {"model": experts[name].get(g, {}), "optim": optim_experts.get(name, {}).get(g, {})}
                for g in layers[name].global_ids()
            }
            first = payload[name][layers[name].first_expert]["model"]
            expert_params[name] = {
                "ids": sorted(payload[name]),
                "params": {suffix: layout.describe(v) for suffix, v in first.items()},
            }
        shard = {"format": io.FORMAT, "rank": rank, "experts": payload}
        files[_shard_file(rank)] = io.torch_save_atomic(
            shard, os.path.join(staging, _shard_file(rank)), rank=rank, torn_fault="during_shard"
        )
        io.fault_point("after_shard", rank)
    if rank == 0:
        blob = {"format": io.FORMAT, "model": common, "optim": optim_common, "extra": extra}
        files[io.COMMON] = io.torch_save_atomic(blob, os.path.join(staging, io.COMMON))
        common_keys = {k: layout.describe(v) for k, v in common.items()}
    else:
        common_keys = None
    if rank_extra is not None:
        files[_rank_file(rank)] = io.torch_save_atomic(rank_extra, os.path.join(staging, _rank_file(rank)))
    return {"files": files, "experts": expert_params, "common_keys": common_keys}


def _commit(directory, tag, sequence, staging, layers_info, reports, world_size, has_optimizer, keep):
    layers_meta = {}
    for name, (_, ep_size, num_expert, fused) in layers_info.items():
        total = ep_size * num_expert
        shards, params = [None] * total, None
        for rank, report in enumerate(reports):
            if name not in report["experts"]:
                continue
            for g in report["experts"][name]["ids"]:
                shards[g] = _shard_file(rank)
            if params is not None and report["experts"][name]["params"] != params:
                raise CheckpointError(f"layer {name!r}: expert parameters differ between the ranks that hold them")
            params = report["experts"][name]["params"]
        missing = [g for g, f in enumerate(shards) if f is None]
        if missing:
            raise CheckpointError(f"layer {name!r}: no shard holds global experts {missing}")
        layers_meta[name] = {
            "fused": fused,
            "num_experts_total": total,
            "ep_size": ep_size,
            "expert_params": {s: {"shape": d[0], "dtype": d[1]} for s, d in params.items()},
            "shards": shards,
        }
    for rank, report in enumerate(reports):
        for fname in report["files"]:
            if not os.path.isfile(os.path.join(staging, fname)):
                raise CheckpointError(
                    f"{os.path.join(staging, fname)} written by rank {rank} is not visible on rank 0: the checkpoint "
                    f"folder must be on a filesystem every rank sees"
                )
    meta = {
        "format": io.FORMAT,
        "version": io.VERSION,
        "tag": tag,
        "sequence": sequence,
        "world_size": world_size,
        "created_unix": time.time(),
        "torch_version": torch.__version__,
        "has_optimizer": has_optimizer,
        "layers": layers_meta,
        "common_keys": {k: {"shape": d[0], "dtype": d[1]} for k, d in reports[0]["common_keys"].items()},
        "files": {f: record["size"] for report in reports for f, record in report["files"].items()},
        "sha256": {f: record["sha256"] for report in reports for f, record in report["files"].items()},
        "rank_extra": [r for r, report in enumerate(reports) if _rank_file(r) in report["files"]],
    }
    io.fault_point("before_meta", 0)
    io.json_save_atomic(meta, os.path.join(staging, io.META))
    io.fault_point("before_commit", 0)
    final = os.path.join(directory, tag)
    # The lock makes this impossible for saves that take it; an existing (even empty) folder would otherwise be
    # replaced by the rename, or hold another save's files.
    if os.path.exists(final):
        raise CheckpointError(f"checkpoint {final} appeared while this save was writing; nothing was committed")
    os.rename(staging, final)
    io.fsync_dir(directory)
    io.fault_point("before_latest", 0)
    io.write_latest(directory, tag)
    io.fault_point("before_rotate", 0)
    if keep is not None:
        complete = list_checkpoints(directory)
        for old in [t for t in complete if t != tag][: max(0, len(complete) - keep)]:
            io.remove_checkpoint(directory, old)
    return final


def save(
    model,
    optimizer,
    directory: str,
    *,
    tag: str | None = None,
    extra=None,
    rank_extra=None,
    keep=None,
    lock_timeout: float | None = 300.0,
) -> str:
    """Writes a checkpoint of ``model`` (and ``optimizer``, or None) under ``directory/<tag>``; call it on every
    rank of the default process group (or without one). Returns the checkpoint's path, complete when returned.

    ``tag`` defaults to ``ckpt-<sequence>``; an existing tag is an error. ``extra`` (rank 0's value) and
    ``rank_extra`` (each rank's own value, e.g. :func:`rng_state`) are returned by :func:`load`. ``keep=N``
    deletes the oldest complete checkpoints beyond the newest N, after ``latest`` names the new one.

    Rank 0 holds the lock ``directory/.lock`` for the whole save; a save that finds it held (another job saving
    into the same folder) waits up to ``lock_timeout`` seconds (None: no limit), then raises CheckpointError."""
    model = layout.unwrap(model)
    if tag is not None:
        io.check_tag(tag)
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be None or a positive int, got {keep!r}")
    io.check_lock_timeout(lock_timeout)
    rank, world_size = io.rank_and_world()
    layers = layout.moe_layers(model)
    layers_info = {n: [x.moe_rank, x.ep_size, x.num_expert, x.fused] for n, x in layers.items()}
    everyone = io.all_gather({"layers": layers_info, "optimizer": optimizer is not None})
    plan = layout.plan_writers(everyone)
    lock = None

    def locked_prepare():
        nonlocal lock
        os.makedirs(directory, exist_ok=True)
        lock = io.SaveLock(directory, lock_timeout)
        return _prepare(directory, tag)

    # One lock per job: rank 0 takes it and the other ranks follow its tag and staging folder. It is released
    # on rank 0 after the commit, or after any rank's failure (every rank learns of it in the collectives).
    try:
        tag, sequence, staging = io.on_rank0(locked_prepare, "fastmoe.checkpoint.save")
        io.fault_point("after_staging", rank)
        report, exc = None, None
        try:
            report = _write_rank(model, optimizer, layers, plan, staging, rank, extra, rank_extra)
        except Exception as e:  # noqa: BLE001 - every rank learns of it in gather_checked
            exc = e
        reports = io.gather_checked(report, exc, "fastmoe.checkpoint.save")
        return io.on_rank0(
            lambda: _commit(
                directory, tag, sequence, staging, layers_info, reports, world_size, optimizer is not None, keep
            ),
            "fastmoe.checkpoint.save",
        )
    finally:
        if lock is not None:
            lock.release()


# ----------------------------------------------------------------------------------------------- load


def latest(directory: str) -> str | None:
    """The tag :func:`load` reads by default: the one ``directory/latest`` names, else the newest complete
    checkpoint (a crash can leave a complete checkpoint that ``latest`` does not name yet), else None."""
    tag = io.read_latest(directory)
    if tag is not None:
        return tag
    complete = list_checkpoints(directory)
    return complete[-1] if complete else None


def read_meta(directory: str, tag: str | None = None) -> dict:
    """The metadata of checkpoint ``tag`` (default: :func:`latest`), checked against the meta.json schema: a
    malformed file raises a CheckpointError that names it."""
    return _resolve(directory, tag)[1]


class _Shards:
    """Opens each shard once (memory-mapped, after checking its size and checksum) and hands out per-expert
    entries."""

    def __init__(self, path: str, meta: dict, weights_only: bool):
        self.path, self.meta, self.weights_only, self.open = path, meta, weights_only, {}

    def expert(self, layer: str, g: int) -> dict:
        fname = self.meta["layers"][layer]["shards"][g]
        path = os.path.join(self.path, fname)
        if fname not in self.open:
            data = io.torch_load(self.path, self.meta, fname, self.weights_only)
            if not isinstance(data, dict) or not isinstance(data.get("experts"), dict):
                raise CheckpointError(f"{path} is not a fastmoe expert shard (no 'experts' mapping)")
            self.open[fname] = data["experts"]
        entries = self.open[fname].get(layer)
        entry = entries.get(g) if isinstance(entries, dict) else None
        if entry is None:
            raise CheckpointError(f"{path} holds no entry for layer {layer!r} expert {g}")
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), dict):
            raise CheckpointError(f"{path}: the entry of layer {layer!r} expert {g} has no 'model' mapping")
        return entry

    def param(self, layer: str, g: int, suffix: str):
        value = self.expert(layer, g)["model"].get(suffix)
        if value is None:
            path = os.path.join(self.path, self.meta["layers"][layer]["shards"][g])
            raise CheckpointError(f"{path} holds no {suffix!r} for layer {layer!r} expert {g}")
        return value

    def optim(self, layer: str, g: int) -> dict:
        optim = self.expert(layer, g).get("optim", {})
        if not isinstance(optim, dict):
            path = os.path.join(self.path, self.meta["layers"][layer]["shards"][g])
            raise CheckpointError(f"{path}: the optimizer entry of layer {layer!r} expert {g} is not a mapping")
        return optim


def _load_common(path: str, meta: dict, weights_only: bool) -> dict:
    common = io.torch_load(path, meta, io.COMMON, weights_only)
    optim = common.get("optim") if isinstance(common, dict) else None
    ok = (
        isinstance(common, dict)
        and isinstance(common.get("model"), dict)
        and (
            optim is None
            or isinstance(optim, dict)
            and isinstance(optim.get("state"), dict)
            and isinstance(optim.get("groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optim["groups"])
            and all(isinstance(g.get("hyper"), dict) for g in optim["groups"])
        )
    )
    if not ok:
        raise CheckpointError(f"{os.path.join(path, io.COMMON)} is not fastmoe common state ('model', 'optim')")
    return common


def _check_layers(layers: dict[str, layout.Layer], meta: dict, path: str) -> None:
    saved = meta["layers"]
    if set(saved) != set(layers):
        raise CheckpointError(f"the model's MoE layers {sorted(layers)} differ from those in {path}: {sorted(saved)}")
    for name, layer in layers.items():
        info = saved[name]
        total = info["num_experts_total"]
        if layer.num_experts_total != total:
            hint = (
                f"EP size {layer.ep_size} does not divide {total}"
                if total % layer.ep_size
                else f"build it with num_expert={total // layer.ep_size} for EP size {layer.ep_size}"
            )
            raise CheckpointError(
                f"layer {name!r} has num_expert={layer.num_expert} x EP size {layer.ep_size} = "
                f"{layer.num_experts_total} experts, but {path} holds {total} ({hint})"
            )
        if layer.fused != info["fused"]:
            raise CheckpointError(f"layer {name!r}: experts_fused={layer.fused} but {path} has fused={info['fused']}")


def _check_shape(key: str, saved, current, where: str) -> None:
    if isinstance(current, torch.Tensor) and isinstance(saved, torch.Tensor) and saved.shape != current.shape:
        raise CheckpointError(
            f"{key!r}: the checkpoint ({where}) has shape {list(saved.shape)}, the model {list(current.shape)}"
        )


def _model_target(model, layers, meta, common, shards: _Shards, path: str, strict: bool) -> dict:
    target, missing = {}, []
    current = model.state_dict()
    common_path = os.path.join(path, io.COMMON)
    seen_suffixes = {name: set() for name in layers}
    for key, value in current.items():
        hit = layout.expert_key(layers, key)
        if hit is None:
            layout.check_plain(key, value)
            if key in common["model"]:
                _check_shape(key, common["model"][key], value, common_path)
                target[key] = common["model"][key]
            else:
                missing.append(key)
            continue
        layer, local, suffix = hit
        seen_suffixes[layer.name].add(suffix)
        if suffix not in meta["layers"][layer.name]["expert_params"]:
            missing.append(key)
            continue
        if local is None:
            saved = torch.stack([shards.param(layer.name, g, suffix) for g in layer.global_ids()])
        else:
            saved = shards.param(layer.name, layer.first_expert + local, suffix)
        # a mesh layer's DTensor is checked and filled through its local shard: this rank's experts
        _check_shape(
            key, saved, layout.local_experts(key, value, layer), f"{path}, {layer.num_expert} experts of {layer.name!r}"
        )
        target[key] = layout.like(saved, value)
    unexpected = [k for k in common["model"] if k not in current]
    for name, info in meta["layers"].items():
        unexpected += [f"{layers[name].prefix}{s}" for s in info["expert_params"] if s not in seen_suffixes[name]]
    if strict and (missing or unexpected):
        raise CheckpointError(f"{path} does not match the model: missing keys {missing}, unexpected keys {unexpected}")
    return target


def _expert_optim_state(layer, suffix: str, name: str, shards: _Shards, local):
    if local is not None:
        entry = shards.optim(layer.name, layer.first_expert + local).get(suffix)
        return None if entry is None else {**entry["shared"], **entry["split"]}
    entries = {g: shards.optim(layer.name, g).get(suffix) for g in layer.global_ids()}
    return layout.merge_fused_state(entries, name)


def _like_param(value, param):
    """An expert's optimizer state tensor shaped like its local parameter shard, placed like the DTensor parameter
    (``exp_avg``); anything else (``step``) as it is."""
    if isinstance(value, torch.Tensor) and value.dim() == param.dim() and value.dim() > 0:
        return layout.like(value, param)
    return value


def _optimizer_target(model, optimizer, layers, meta, common, shards: _Shards, path: str) -> dict:
    saved = common.get("optim")
    if saved is None:
        raise CheckpointError(f"{path} holds no optimizer state (it was saved with optimizer=None)")
    if len(saved["groups"]) != len(optimizer.param_groups):
        raise CheckpointError(
            f"the optimizer has {len(optimizer.param_groups)} param groups, {path} has {len(saved['groups'])}"
        )
    state, groups, index = {}, [], 0
    entries = layout.optimizer_params(model, optimizer)
    for gi, group in enumerate(optimizer.param_groups):
        saved_names = set(saved["groups"][gi]["params"])
        ids = []
        for _, param, name in (e for e in entries if e[0] == gi):
            canonical = layout.canonical(layers, name)
            if canonical not in saved_names:
                raise CheckpointError(
                    f"parameter {name!r} is in optimizer param group {gi}, but not in group {gi} of {path}"
                )
            hit = layout.expert_key(layers, name)
            if hit is None:
                value = saved["state"].get(name)
            else:
                value = _expert_optim_state(hit[0], hit[2], name, shards, hit[1])
                if value and layout.is_dtensor(param):  # a mesh layer's state is placed like its parameter
                    value = {k: _like_param(v, param) for k, v in value.items()}
            if value:
                state[index] = value
            ids.append(index)
            index += 1
        new_group = dict(saved["groups"][gi]["hyper"])
        new_group["params"] = ids
        if "param_names" in group:
            new_group["param_names"] = list(group["param_names"])
        groups.append(new_group)
    return {"state": state, "param_groups": groups}


def load(model, optimizer, directory: str, *, tag: str | None = None, strict: bool = True, weights_only=True) -> dict:
    """Loads checkpoint ``tag`` (default: :func:`latest`) into ``model`` (and ``optimizer``, or None) on every rank;
    the EP size of each layer may differ from the saved one (experts and their optimizer state are resharded).

    Returns ``{"tag", "path", "extra", "rank_extra", "meta"}``; ``rank_extra`` is this rank's saved payload when
    the world size is the one saved (else None). ``weights_only`` is passed to ``torch.load``."""
    model = layout.unwrap(model)
    rank, world_size = io.rank_and_world()
    tag, meta = io.on_rank0(lambda: _resolve(directory, tag), "fastmoe.checkpoint.load")
    path = os.path.join(directory, tag)
    result, exc = None, None
    try:
        layers = layout.moe_layers(model)
        _check_layers(layers, meta, path)
        common = _load_common(path, meta, weights_only)
        shards = _Shards(path, meta, weights_only)
        model_target = _model_target(model, layers, meta, common, shards, path, strict)
        optim_target = None
        if optimizer is not None:
            optim_target = _optimizer_target(model, optimizer, layers, meta, common, shards, path)
        rank_extra = None
        if meta["world_size"] == world_size and rank in meta["rank_extra"]:
            rank_extra = io.torch_load(path, meta, _rank_file(rank), weights_only)
        model.load_state_dict(model_target, strict=strict)
        if optim_target is not None:
            optimizer.load_state_dict(optim_target)
        result = {"tag": tag, "path": path, "extra": common.get("extra"), "rank_extra": rank_extra, "meta": meta}
    except Exception as e:  # noqa: BLE001 - every rank learns of it in gather_checked
        exc = e
    io.gather_checked(None, exc, "fastmoe.checkpoint.load")
    return result


def _resolve(directory: str, tag) -> tuple[str, dict]:
    """``(tag, meta)`` of checkpoint ``tag`` (default: :func:`latest`). The tag is the folder's name, which
    locates the files (meta.json's own ``tag`` field is informational)."""
    if tag is None:
        tag = latest(directory)
        if tag is None:
            raise CheckpointError(f"no checkpoint in {directory!r} (no 'latest' file and no complete checkpoint)")
        named_by = f"{os.path.join(directory, io.LATEST)} names {tag!r}, but "
    else:
        io.check_tag(tag)
        named_by = ""
    meta_path = os.path.join(directory, tag, io.META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{named_by}checkpoint {tag!r} is not complete or does not exist: {meta_path} is missing")
    return tag, io.read_json(meta_path)


def consolidate(directory: str, tag: str | None = None, *, weights_only: bool = True) -> dict:
    """The state dict of the single-process model (every FMoE layer built with world_size=1 and num_expert =
    the total expert count) from checkpoint ``tag`` (default: :func:`latest`), whatever EP size saved it."""
    tag, meta = _resolve(directory, tag)
    path = os.path.join(directory, tag)
    common = _load_common(path, meta, weights_only)
    state_dict = dict(common["model"])
    shards = _Shards(path, meta, weights_only)
    for name, info in meta["layers"].items():
        prefix = f"{name}.experts." if name else "experts."
        for suffix in info["expert_params"]:
            pieces = [shards.param(name, g, suffix) for g in range(info["num_experts_total"])]
            if info["fused"]:
                state_dict[prefix + suffix] = torch.stack(pieces)
            else:
                for g, piece in enumerate(pieces):
                    state_dict[f"{prefix}{g}.{suffix}"] = piece
    return state_dict


# ----------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """This process's random states (torch CPU, every CUDA device once CUDA is initialised, Python's ``random``),
    for ``save(..., rank_extra=rng_state())`` and :func:`set_rng_state` after load."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
