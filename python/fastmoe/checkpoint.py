"""Checkpoints of fastmoe models that load at any expert-parallel (EP) size. See docs/checkpoint.md.

    fastmoe.checkpoint.save(model, optimizer, "ckpt", extra={"step": step})     # on every rank
    info = fastmoe.checkpoint.load(model, optimizer, "ckpt")                    # any EP size; info["extra"]
    state_dict = fastmoe.checkpoint.consolidate("ckpt")                         # for the world_size=1 model

The tensors are written and read by torch.distributed.checkpoint (DCP): every rank writes the shards it holds and
reads those of its layout, resharded. The experts are shown to DCP in the one-process model's names and shapes
(:mod:`fastmoe._checkpoint_layout`), so a checkpoint loads at any EP size, with a process group or a DeviceMesh,
under FSDP2 or not, and ``dcp.load`` alone reads it into the one-process model. What DCP lacks is added here:
``ckpt/<tag>/`` is written into a staging folder and renamed to its tag only when complete; ``ckpt/latest`` names
the newest and is replaced after that, so a crash never leaves a broken ``latest``; meta.json records the size and
sha256 of every file, checked before anything is read; the saving job's rank 0 holds ``ckpt/.lock`` from choosing
the tag until ``latest`` is replaced, so concurrent saves into one folder take turns. Beside DCP's files: state.pt
(rank 0: ``extra``, the optimizer's param groups and every value that is not a tensor) and ``rank-<rank>.pt``
(optional per-rank payload).
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


def _layers_meta(layers: dict) -> dict:
    return {
        name: {"fused": x.fused, "num_experts_total": x.num_experts_total, "ep_size": x.ep_size}
        for name, x in layers.items()
    }


def _merge_reports(reports: list) -> tuple[dict, list]:
    """``(objects, param groups)`` of every rank's report: the same layers and optimizer presence on every rank,
    each value that is not a tensor once, and each param group's parameters as the union of the ranks'."""
    first = reports[0]
    for r, report in enumerate(reports):
        if report["layers"] != first["layers"]:
            raise CheckpointError(f"rank {r} has MoE layers {report['layers']}, rank 0 has {first['layers']}")
        if report["optimizer"] != first["optimizer"]:
            raise CheckpointError(
                f"optimizer passed on some ranks and None on others (rank {r}: {report['optimizer']})"
            )
        if len(report["groups"]) != len(first["groups"]):
            raise CheckpointError(
                f"rank {r}'s optimizer has {len(report['groups'])} param groups, rank 0's {len(first['groups'])}"
            )
    objects, groups = {}, [{"hyper": g["hyper"], "params": set()} for g in first["groups"]]
    for report in reports:
        for key, value in report["objects"].items():
            objects.setdefault(key, value)
        for merged, group in zip(groups, report["groups"], strict=True):
            merged["params"].update(group["params"])
    return objects, [{"hyper": g["hyper"], "params": sorted(g["params"])} for g in groups]


_UNBOUNDED_SECONDS = 10 * 365 * 86400.0  # lock_timeout=None: no limit of fastmoe's own


def _dcp_error(doing: str, where: str, exc: Exception) -> CheckpointError:
    """A failure inside DCP's save or load (on this rank, or another rank's, which DCP reports here), naming the
    checkpoint folder and what bounds the wait."""
    return CheckpointError(
        f"torch.distributed.checkpoint could not {doing} {where}: {type(exc).__name__}: {exc} (a rank failed, exited, "
        f"or took longer than {io.DCP_TIMEOUT_ENV}={io.dcp_timeout():g} s)"
    )


def _dcp_writer(staging: str, rank: int):
    """DCP's file writer, with the ``during_dcp`` fault point once this rank's tensor file is written."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        def write_data(self, plan, planner):
            done = super().write_data(plan, planner)
            done.wait()
            io.fault_point("during_dcp", rank)
            return done

    return Writer(staging, single_file_per_rank=True, sync_files=True)


def _rank_files(staging: str, rank: int) -> dict:
    """Size and sha256 of the files DCP wrote for ``rank`` (``__<rank>_<n>.distcp``)."""
    prefix = f"__{rank}_"
    return {
        f: io.file_record(os.path.join(staging, f))
        for f in sorted(os.listdir(staging))
        if f.startswith(prefix) and f.endswith(".distcp")
    }


def _commit(directory, tag, sequence, staging, layers_meta, files, world_size, has_optimizer, rank_extra, keep):
    files = dict(files)
    files[io.DCP_METADATA] = io.file_record(os.path.join(staging, io.DCP_METADATA))
    for fname in files:
        if not os.path.isfile(os.path.join(staging, fname)):
            raise CheckpointError(
                f"{os.path.join(staging, fname)} is not visible on rank 0: the checkpoint folder must be on a "
                f"filesystem every rank sees"
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
        "files": {f: record["size"] for f, record in files.items()},
        "sha256": {f: record["sha256"] for f, record in files.items()},
        "rank_extra": rank_extra,
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

    The model may hold its experts over a process group or a DeviceMesh, be wrapped by
    DistributedGroupedDataParallel or DDP, compiled, and (with mesh layers) sharded by FSDP2 (``fully_shard``):
    what each rank holds is written once. FSDP2 over the experts of a process-group layer is refused.

    ``tag`` defaults to ``ckpt-<sequence>``; an existing tag is an error. ``extra`` (rank 0's value) and
    ``rank_extra`` (each rank's own value, e.g. :func:`rng_state`) are returned by :func:`load`. ``keep=N``
    deletes the oldest complete checkpoints beyond the newest N, after ``latest`` names the new one.

    Rank 0 holds the lock ``directory/.lock`` for the whole save; a save that finds it held (another job saving
    into the same folder) waits up to ``lock_timeout`` seconds (None: no limit), then raises CheckpointError."""
    import torch.distributed.checkpoint as dcp

    model = layout.unwrap(model)
    if tag is not None:
        io.check_tag(tag)
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be None or a positive int, got {keep!r}")
    io.check_lock_timeout(lock_timeout)
    rank, world_size = io.rank_and_world()
    lock = None

    def locked_prepare():
        nonlocal lock
        os.makedirs(directory, exist_ok=True)
        lock = io.SaveLock(directory, lock_timeout)
        return _prepare(directory, tag)

    # One lock per job: rank 0 takes it and the other ranks follow its tag and staging folder. It is released
    # on rank 0 after the commit, or after any rank's failure (every rank learns of it in the collectives).
    try:
        # the other ranks wait while rank 0 waits for the lock (bounded by the process group's own timeout)
        lock_wait = lock_timeout if lock_timeout is not None else _UNBOUNDED_SECONDS
        tag, sequence, staging = io.on_rank0(locked_prepare, "fastmoe.checkpoint.save", lock_wait)
        io.fault_point("after_staging", rank)
        view, report, exc = None, None, None
        try:
            if not os.path.isdir(staging):
                raise CheckpointError(
                    f"the staging folder {staging} that rank 0 made is not visible on rank {rank}: the checkpoint "
                    f"folder must be on a filesystem every rank sees"
                )
            layers = layout.moe_layers(model)
            view = layout.present(model, optimizer, layers)
            report = {
                "layers": _layers_meta(layers),
                "optimizer": optimizer is not None,
                "groups": view.groups,
                "objects": view.objects,
                "files": {},
            }
            if rank_extra is not None:
                path = os.path.join(staging, io.rank_file(rank))
                report["files"][io.rank_file(rank)] = io.torch_save_atomic(rank_extra, path)
        except Exception as e:  # noqa: BLE001 - every rank learns of it in gather_checked
            exc = e
        reports = io.gather_checked(report, exc, "fastmoe.checkpoint.save")
        objects, groups = _merge_reports(reports)
        try:
            with io.dcp_quiet():
                dcp.save(view.tensors, storage_writer=_dcp_writer(staging, rank), process_group=io.dcp_group())
        except Exception as exc:
            raise _dcp_error("save into", staging, exc) from exc
        io.fault_point("after_dcp", rank)
        files, exc = None, None
        try:
            files = _rank_files(staging, rank)
            if rank == 0:
                blob = {"format": io.FORMAT, "extra": extra, "groups": groups, "objects": objects}
                files[io.STATE] = io.torch_save_atomic(blob, os.path.join(staging, io.STATE))
        except Exception as e:  # noqa: BLE001 - every rank learns of it in gather_checked
            exc = e
        everyone = io.gather_checked(files, exc, "fastmoe.checkpoint.save")
        merged = {
            f: record
            for report, rank_files in zip(reports, everyone, strict=True)
            for f, record in {**rank_files, **report["files"]}.items()
        }
        rank_extras = [r for r, report in enumerate(reports) if report["files"]]
        return io.on_rank0(
            lambda: _commit(
                directory,
                tag,
                sequence,
                staging,
                reports[0]["layers"],
                merged,
                world_size,
                optimizer is not None,
                rank_extras,
                keep,
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


def _read_state(path: str, meta: dict, weights_only: bool) -> dict:
    state = io.torch_load(path, meta, io.STATE, weights_only)
    ok = (
        isinstance(state, dict)
        and isinstance(state.get("objects"), dict)
        and isinstance(state.get("groups"), list)
        and all(isinstance(g, dict) and isinstance(g.get("hyper"), dict) for g in state["groups"])
        and all(isinstance(g.get("params"), list) for g in state["groups"])
    )
    if not ok:
        raise CheckpointError(f"{os.path.join(path, io.STATE)} is not fastmoe checkpoint state ('objects', 'groups')")
    return state


def _saved_tensors(path: str, meta: dict) -> dict:
    """DCP key -> (global shape, dtype) of every tensor the checkpoint holds, from DCP's .metadata (checked with
    the other files first); every file it points into must be one that meta.json lists, so checked too."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as exc:
        raise CheckpointError(f"cannot read {os.path.join(path, io.DCP_METADATA)}: {exc}") from exc
    for item in (metadata.storage_data or {}).values():
        fname = getattr(item, "relative_path", None)
        if fname not in meta["files"]:
            raise CheckpointError(
                f"{os.path.join(path, io.DCP_METADATA)} points into {os.path.join(path, str(fname))}, which is not "
                f"listed in meta.json: its checksum cannot be checked"
            )
    return {
        key: (tuple(md.size), md.properties.dtype)
        for key, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }


def _other_ranks_expert(dkey: str, layers: dict, known: set[str]) -> bool:
    """Whether ``dkey`` is an entry of a per-expert module that another rank holds: global expert ``g`` of a
    layer of this model whose own experts have the same entry."""
    hit = layout.expert_key(layers, dkey.removeprefix(layout.MODEL))
    if hit is None or hit[1] is None or hit[1] >= hit[0].num_experts_total:
        return False
    layer, g, suffix = hit
    return f"{layout.MODEL}{layer.prefix}{layer.first_expert + g % layer.num_expert}.{suffix}" in known


def _match(view: layout.View, layers: dict, saved: dict, state: dict, path: str, strict: bool) -> set[str]:
    """The DCP keys of ``view`` to load; raises CheckpointError for a shape that differs, and with ``strict`` for
    model entries missing on either side."""
    load, missing = set(), []
    for dkey, entry in view.entries.items():
        if dkey in view.tensors and dkey in saved:
            have, want = tuple(view.tensors[dkey].shape), saved[dkey][0]
            if have != want:
                raise CheckpointError(
                    f"{entry.key!r}: the checkpoint ({path}) has shape {list(want)}, the model {list(have)} (shapes of "
                    f"the whole layer, every rank's experts together)"
                )
            load.add(dkey)
        elif entry.kind == "model" and dkey not in state["objects"]:
            missing.append(entry.key)
    known = {dkey for dkey, entry in view.entries.items() if entry.kind == "model"}
    unexpected = [
        k.removeprefix(layout.MODEL)
        for k in [*saved, *state["objects"]]
        if k.startswith(layout.MODEL) and k not in known and not _other_ranks_expert(k, layers, known)
    ]
    if strict and (missing or unexpected):
        raise CheckpointError(f"{path} does not match the model: missing keys {missing}, unexpected keys {unexpected}")
    return load


def _optimizer_state(model, optimizer, layers, state: dict, optim_state: dict, path: str, strict: bool) -> dict:
    """The optimizer state dict in the model's parameter names (for torch's ``set_optimizer_state_dict``): the
    loaded state, and the saved param groups' hyperparameters for the optimizer's own parameters (with
    ``strict``, each parameter must be in the same group of the checkpoint)."""
    saved = state["groups"]
    names = layout.optimizer_names(model, optimizer)
    if len(saved) != len(names):
        raise CheckpointError(f"the optimizer has {len(names)} param groups, {path} has {len(saved)}")
    groups = []
    for gi, group_names in enumerate(names):
        saved_names = set(saved[gi]["params"])
        for name, _ in group_names:
            if strict and layout.canonical(layers, name) not in saved_names:
                raise CheckpointError(
                    f"parameter {name!r} is in optimizer param group {gi}, but not in group {gi} of {path}"
                )
        groups.append({**saved[gi]["hyper"], "params": [name for name, _ in group_names]})
    return {"state": optim_state, "param_groups": groups}


def load(model, optimizer, directory: str, *, tag: str | None = None, strict: bool = True, weights_only=True) -> dict:
    """Loads checkpoint ``tag`` (default: :func:`latest`) into ``model`` (and ``optimizer``, or None) on every rank;
    the EP size of each layer may differ from the saved one, the layers may hold their experts over a process
    group or a DeviceMesh, and the model may be under FSDP2: DCP reads each rank's part.

    Returns ``{"tag", "path", "extra", "rank_extra", "meta"}``; ``rank_extra`` is this rank's saved payload when
    the world size is the one saved (else None). ``weights_only`` is passed to ``torch.load`` for state.pt and
    the rank files."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = layout.unwrap(model)
    rank, world_size = io.rank_and_world()
    tag, meta = io.on_rank0(lambda: _resolve(directory, tag), "fastmoe.checkpoint.load")
    path = os.path.join(directory, tag)
    view, plan, exc = None, None, None
    try:
        io.verify_files(path, meta, rank, world_size)
        io.verify_file(path, meta, io.DCP_METADATA)  # every rank reads it next
        layers = layout.moe_layers(model)
        _check_layers(layers, meta, path)
        if optimizer is not None and not meta["has_optimizer"]:
            raise CheckpointError(f"{path} holds no optimizer state (it was saved with optimizer=None)")
        state = _read_state(path, meta, weights_only)
        saved = _saved_tensors(path, meta)
        view = layout.targets(model, optimizer, layers, saved)
        plan = _match(view, layers, saved, state, path, strict)
    except Exception as e:  # noqa: BLE001 - every rank learns of it in gather_checked
        exc = e
    io.gather_checked(None, exc, "fastmoe.checkpoint.load")
    try:
        with io.dcp_quiet():
            dcp.load(
                {k: v for k, v in view.tensors.items() if k in plan},
                storage_reader=FileSystemReader(path),
                process_group=io.dcp_group(),
            )
    except Exception as exc:
        raise _dcp_error("load from", path, exc) from exc
    result, exc = None, None
    try:
        model_state, optim_state = layout.restore(view, state["objects"], plan)
        set_model_state_dict(model, model_state, options=StateDictOptions(strict=strict))
        if optimizer is not None:
            # a parameter without saved state (it had no gradient before the save) keeps none: not strict here
            optim = _optimizer_state(model, optimizer, layers, state, optim_state, path, strict)
            set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(strict=False))
        rank_extra = None
        if meta["world_size"] == world_size and rank in meta["rank_extra"]:
            rank_extra = io.torch_load(path, meta, io.rank_file(rank), weights_only)
        result = {"tag": tag, "path": path, "extra": state["extra"], "rank_extra": rank_extra, "meta": meta}
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
    the total expert count) from checkpoint ``tag`` (default: :func:`latest`), whatever EP size saved it. Runs in
    this process alone (no collective), so call it on one rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    tag, meta = _resolve(directory, tag)
    path = os.path.join(directory, tag)
    io.verify_files(path, meta)
    state = _read_state(path, meta, weights_only)
    tensors = {
        key: torch.empty(shape, dtype=dtype)
        for key, (shape, dtype) in _saved_tensors(path, meta).items()
        if key.startswith(layout.MODEL)
    }
    with io.dcp_quiet():
        dcp.load(tensors, storage_reader=FileSystemReader(path), no_dist=True)
    state_dict = {k.removeprefix(layout.MODEL): v for k, v in state["objects"].items() if k.startswith(layout.MODEL)}
    state_dict.update({k.removeprefix(layout.MODEL): v for k, v in tensors.items()})
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
