"""Checkpoints of the training program: the one place that writes and reads them.

Every ``--parallel`` (one process, ``ddp`` and ``fsdp2`` under torchrun) keeps a model's checkpoints in
``<run>/checkpoint/``, a :mod:`fastmoe.checkpoint` folder: torch.distributed.checkpoint (DCP) writes every rank's
part (the experts of a process group or of a DeviceMesh, anything FSDP2 shards) in the one-process model's names
and shapes, so a run saved by W processes resumes with any other number that divides the expert count, with either
``--parallel`` (the experts and their AdamW state are resharded). Every file is written to a staging folder that
becomes the checkpoint by one rename and its sha256 is checked before it is read, so a crash mid-write leaves the
previous checkpoint intact and a damaged file is named. Beside the weights:

- ``extra`` (one copy): the step, the training time and tokens so far, the validation history, the
  configuration and the number of processes that saved it;
- ``rank_extra`` (one per rank): torch's RNG states (CPU and every CUDA device) and the data sampler's
  generator. With the same number of processes these make the resumed run bitwise the uninterrupted one; with
  another number there are other ranks, so the samplers and the RNG restart from seeds derived from ``--seed``,
  the rank and the step (:func:`derived_seed`).

``<run>/config.json`` repeats the configuration, so that a resume with other flags is refused by naming the
flags before any weight is read. ``<run>/checkpoint.pt`` (one process) and ``checkpoint.rank<r>.pt`` (one per
rank) are the single-file format of earlier versions: they are still read, at the number of processes that
wrote them, and replaced by the folder at the next save. ``<run>/dcp/`` is where ``--parallel fsdp2`` of earlier
versions kept its checkpoints (DCP folders with a ``train.json``): a resume names it and says it is not read, and
a new run removes it.
"""

import hashlib
import json
import shutil
from pathlib import Path

import torch

from fastmoe import _checkpoint_io
from fastmoe import checkpoint as fmoe_checkpoint

CHECKPOINT_DIR = "checkpoint"
OLD_DCP_DIR = "dcp"  # --parallel fsdp2 of earlier versions: refused by load, removed by a new run
CONFIG_FILE = "config.json"
FORMAT = "fastmoe-train"
FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1
EXTRA_KEYS = ("step", "train_time", "tokens", "history", "config", "world_size")
LEGACY_KEYS = ("model", "optimizer", "sampler", "rng", "step", "train_time", "history", "config")

# configuration field -> its value in checkpoints written before the field existed
ADDED_CONFIG_FIELDS = {"balance_coef": 0.0, "ffn_bias": True}


class ResumeError(RuntimeError):
    """A run cannot be resumed from what its folder holds; the message names the file or folder and why."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def derived_seed(*parts) -> int:
    """A 63-bit seed that depends on every part (e.g. ``(seed, "sampler", rank, step)``), for the streams that
    restart when a run resumes with another number of processes."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def legacy_paths(run_dir: Path) -> list[Path]:
    """The single-file checkpoints of earlier versions in ``run_dir``."""
    return sorted([*run_dir.glob("checkpoint.pt"), *run_dir.glob("checkpoint.rank*.pt")])


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint of any format: a complete one in the folder (or a folder whose
    ``latest`` cannot be read: :func:`load` then says what is wrong with it), a single file, or the ``dcp/``
    folder of an earlier version (which :func:`load` refuses, naming it)."""
    return _has_folder_checkpoint(run_dir) or (run_dir / OLD_DCP_DIR).is_dir() or bool(legacy_paths(run_dir))


def _has_folder_checkpoint(run_dir: Path) -> bool:
    ckpt_dir = run_dir / CHECKPOINT_DIR
    if not ckpt_dir.is_dir():
        return False
    try:
        return fmoe_checkpoint.latest(str(ckpt_dir)) is not None
    except fmoe_checkpoint.CheckpointError:
        return True


def config_diffs(saved: dict, current: dict) -> str:
    """The fields of ``current`` that differ from ``saved`` (fields older checkpoints lack count as
    :data:`ADDED_CONFIG_FIELDS`), as ``"name: checkpoint a vs now b, ..."``; empty when they agree."""
    saved = {**ADDED_CONFIG_FIELDS, **saved}
    diffs = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    return ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diffs.items()))


def _check_config(where, saved: dict, current: dict) -> None:
    listed = config_diffs(saved, current)
    if listed:
        raise ResumeError(f"{where} was written by a different configuration ({listed}); resume with the same flags")


def save(run_dir: Path, *, model, optimizer, sampler, extra: dict, is_main: bool) -> str:
    """Writes a checkpoint of the run into ``run_dir/checkpoint`` (every rank calls it) and keeps only the newest.
    ``extra`` holds :data:`EXTRA_KEYS`; the configuration also goes to ``run_dir/config.json`` (rank 0). Every
    ``--parallel`` writes the same format (``model`` may be plain, expert-parallel or under FSDP2)."""
    if is_main:
        _checkpoint_io.json_save_atomic({"format": FORMAT, "config": extra["config"]}, str(run_dir / CONFIG_FILE))
    path = fmoe_checkpoint.save(
        model,
        optimizer,
        str(run_dir / CHECKPOINT_DIR),
        extra={"format": FORMAT, "format_version": FORMAT_VERSION, **extra},
        rank_extra={"rng": rng_state(), "sampler": sampler.state_dict()},
        keep=1,
    )
    if is_main:  # the folder now holds a newer state than any single-file checkpoint of an earlier version
        for legacy in legacy_paths(run_dir):
            legacy.unlink()
    return path


def load(
    run_dir: Path, *, model, optimizer, sampler, config: dict, rank: int, world_size: int, parallel: str = "ddp"
) -> dict:
    """Restores model, optimizer, sampler and RNG states from the newest checkpoint in ``run_dir`` and returns
    ``{"step", "train_time", "tokens", "history", "rng", "saved_world_size", "where"}``, where ``rng`` is the RNG
    state to continue with. The checkpoint may have been saved with another ``--parallel`` and another number of
    processes (a single file of an earlier version: only by as many, and not under torchrun with ``parallel``
    "fsdp2"). Raises :class:`ResumeError`, naming the file or folder, when there is no checkpoint, when it was
    made with another configuration (``config``, compared without ``world_size``) or by an earlier version's
    ``--parallel fsdp2`` (``run_dir/dcp``), or when it cannot be read."""
    ckpt_dir = run_dir / CHECKPOINT_DIR
    if ckpt_dir.is_dir():
        try:
            tag = fmoe_checkpoint.latest(str(ckpt_dir))
        except Exception as exc:  # noqa: BLE001 - e.g. a damaged 'latest' file: the message names it
            raise ResumeError(f"cannot resume from {ckpt_dir}: {exc}") from exc
        if tag is not None:
            return _load_folder(run_dir, ckpt_dir, model, optimizer, sampler, config, rank, world_size)
    old_dcp = run_dir / OLD_DCP_DIR
    if old_dcp.is_dir():
        raise ResumeError(
            f"{old_dcp} holds checkpoints written by an earlier version of fastmoe-train (its --parallel fsdp2 "
            f"format: torch.distributed.checkpoint folders with a train.json), which this version does not read; "
            f"every --parallel now saves into {ckpt_dir}. Resume it with the version that wrote it, or start a new "
            f"run without --resume (which removes {old_dcp})"
        )
    legacy = legacy_paths(run_dir)
    if legacy:
        return _load_legacy(run_dir, legacy, model, optimizer, sampler, config, rank, world_size, parallel)
    raise ResumeError(f"{run_dir} holds no checkpoint (no complete one in {ckpt_dir})")


def _load_folder(run_dir, ckpt_dir, model, optimizer, sampler, config, rank, world_size) -> dict:
    config_file = run_dir / CONFIG_FILE
    if config_file.exists():
        try:
            saved_config = json.loads(config_file.read_text())["config"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ResumeError(f"{config_file} cannot be read ({exc}); it is corrupted") from exc
        _check_config(config_file, saved_config, _comparable(config))
    try:
        info = fmoe_checkpoint.load(model, optimizer, str(ckpt_dir))
    except Exception as exc:  # noqa: BLE001 - whatever failed, the message must name the checkpoint
        raise ResumeError(f"cannot resume from {ckpt_dir}: {exc}") from exc
    where = info["path"]
    extra = info["extra"]
    if not isinstance(extra, dict) or extra.get("format") != FORMAT or any(k not in extra for k in EXTRA_KEYS):
        raise ResumeError(f"{where} is not a checkpoint of fastmoe-train (its 'extra' lacks {list(EXTRA_KEYS)})")
    if extra.get("format_version") != FORMAT_VERSION:
        raise ResumeError(f"{where}: checkpoint format {extra.get('format_version')!r}, expected {FORMAT_VERSION}")
    _check_config(where, extra["config"], _comparable(config))
    # rank_extra is None when saved by another number of processes
    label = str(Path(where) / _checkpoint_io.rank_file(rank))
    return _restore_streams(where, extra, info["rank_extra"], sampler, config, rank, world_size, label)


def _comparable(config: dict) -> dict:
    # The number of processes may change between a checkpoint and its resume: the experts are resharded.
    return {k: v for k, v in config.items() if k != "world_size"}


def _load_legacy(run_dir, legacy, model, optimizer, sampler, config, rank, world_size, parallel) -> dict:
    if parallel == "fsdp2" and world_size > 1:  # that format holds each rank's plain tensors, not FSDP2's shards
        raise ResumeError(
            f"{run_dir} holds a checkpoint of an earlier version ({', '.join(p.name for p in legacy)}), which "
            f"--parallel fsdp2 under torchrun cannot read; resume it with --parallel ddp and the number of processes "
            f"that wrote it (its next checkpoint can then resume with --parallel fsdp2)"
        )
    path = run_dir / ("checkpoint.pt" if world_size == 1 else f"checkpoint.rank{rank}.pt")
    if not path.exists():
        ranks = [p for p in legacy if p.name != "checkpoint.pt"]
        saved_by = f"{len(ranks)} processes" if ranks else "1 process"
        raise ResumeError(
            f"{run_dir} holds a checkpoint of an earlier version written by {saved_by} "
            f"({', '.join(p.name for p in legacy)}), and this run has {world_size}: that format cannot be "
            f"resharded; resume it with the number of processes that wrote it"
        )
    size = path.stat().st_size
    if size == 0:
        raise ResumeError(f"{path} is empty (0 bytes): it was cut off while being written or copied")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises EOFError, zip or pickle errors for a damaged file
        raise ResumeError(
            f"{path} ({size:,} bytes) cannot be read: it is truncated or corrupted ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(payload, dict) or any(k not in payload for k in LEGACY_KEYS):
        raise ResumeError(f"{path} is not a checkpoint of fastmoe-train (it lacks {list(LEGACY_KEYS)})")
    if payload.get("format_version") != LEGACY_FORMAT_VERSION:
        raise ResumeError(f"{path}: checkpoint format {payload.get('format_version')!r}, expected 1")
    _check_config(path, payload["config"], config)
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        sampler.load_state_dict(payload["sampler"])
        set_rng_state(payload["rng"])
    except Exception as exc:  # noqa: BLE001 - e.g. "Invalid mt19937 state" from a damaged RNG state
        raise ResumeError(f"{path} cannot be restored: it is corrupted ({type(exc).__name__}: {exc})") from exc
    return {
        "step": payload["step"],
        "train_time": payload["train_time"],
        "tokens": payload["step"] * payload["config"]["batch_size"] * payload["config"]["seq_len"] * world_size,
        "history": payload["history"],
        "rng": payload["rng"],
        "saved_world_size": world_size,
        "where": str(path),
    }


def remove(run_dir: Path) -> list[Path]:
    """Deletes the checkpoints, configuration and log of a previous run in ``run_dir`` (rank 0, for a new run
    in the same folder) and returns what was there."""
    names = (CHECKPOINT_DIR, OLD_DCP_DIR, CONFIG_FILE, "log.jsonl")
    found = [run_dir / name for name in names if (run_dir / name).exists()]
    found += legacy_paths(run_dir)
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found


def _restore_streams(where, extra: dict, rank_state, sampler, config: dict, rank: int, world_size: int, label: str):
    """The resume state of a checkpoint's ``extra`` with this rank's sampler and RNG restored from ``rank_state``;
    with ``rank_state`` None (saved by another number of processes) the rank's streams restart from seeds derived
    from the step. A state that cannot be applied raises ResumeError naming ``label`` (the file it came from)."""
    state = {
        "step": extra["step"],
        "train_time": extra["train_time"],
        "tokens": extra["tokens"],
        "history": extra["history"],
        "saved_world_size": extra["world_size"],
        "where": where,
    }
    if rank_state is None:
        seed = config["seed"]
        sampler.reseed(derived_seed(seed, "sampler", rank, world_size, extra["step"]))
        torch.manual_seed(derived_seed(seed, "torch", world_size, extra["step"]))
        state["rng"] = rng_state()
        return state
    try:
        sampler.load_state_dict(rank_state["sampler"])
        set_rng_state(rank_state["rng"])
    except Exception as exc:  # noqa: BLE001 - a torn RNG state raises from torch's internals
        raise ResumeError(
            f"{label}: the random state of rank {rank} cannot be restored ({exc}); it is corrupted"
        ) from exc
    state["rng"] = rank_state["rng"]
    return state
