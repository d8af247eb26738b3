"""Checkpoints of the training program: the one place that writes and reads them.

A model's checkpoints live in ``<run>/checkpoint/``, a :mod:`fastmoe.checkpoint` folder: the experts are stored
per global expert, so a run saved by W processes resumes with any other number that divides the expert count
(the experts and their AdamW state are resharded), and every file is written to a staging folder that becomes
the checkpoint by one rename, so a crash mid-write leaves the previous checkpoint intact. Beside the weights:

- ``extra`` (one copy): the step, the training time and tokens so far, the validation history, the
  configuration and the number of processes that saved it;
- ``rank_extra`` (one per rank): torch's RNG states (CPU and every CUDA device) and the data sampler's
  generator. With the same number of processes these make the resumed run bitwise the uninterrupted one; with
  another number there are other ranks, so the samplers and the RNG restart from seeds derived from ``--seed``,
  the rank and the step (:func:`derived_seed`).

``<run>/config.json`` repeats the configuration, so that a resume with other flags is refused by naming the
flags before any weight is read. ``<run>/checkpoint.pt`` (one process) and ``checkpoint.rank<r>.pt`` (one per
rank) are the single-file format of earlier versions: they are still read, at the number of processes that
wrote them, and replaced by the folder at the next save.

With ``--parallel fsdp2`` the checkpoints live in ``<run>/dcp/<tag>/`` instead: the model and AdamW state as
torch.distributed.checkpoint (DCP) writes them (every rank its shards; DCP reshards them for any other number of
processes), ``rank-<r>.pt`` per rank as above, and ``train.json`` (rank 0: the same ``extra``, and the size and
sha256 of every file of the checkpoint). What DCP lacks is added as for the folder above: the files are written
into a staging folder renamed to its tag when complete, ``<run>/dcp/latest`` names the newest, and a file whose
size or checksum changed since is named when the run resumes.
"""

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from fastmoe import _checkpoint_io
from fastmoe import checkpoint as fmoe_checkpoint

CHECKPOINT_DIR = "checkpoint"
DCP_DIR = "dcp"  # --parallel fsdp2
DCP_STATE = "train.json"
DCP_FORMAT_VERSION = 1
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
    ``latest`` cannot be read: :func:`load` then says what is wrong with it), a single file, or a DCP checkpoint
    of ``--parallel fsdp2``."""
    return _has_ddp_checkpoint(run_dir) or _has_dcp_checkpoint(run_dir)


def _has_ddp_checkpoint(run_dir: Path) -> bool:
    ckpt_dir = run_dir / CHECKPOINT_DIR
    if ckpt_dir.is_dir():
        try:
            if fmoe_checkpoint.latest(str(ckpt_dir)) is not None:
                return True
        except fmoe_checkpoint.CheckpointError:
            return True
    return bool(legacy_paths(run_dir))


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


def save(
    run_dir: Path, *, model, optimizer, sampler, extra: dict, is_main: bool, rank: int = 0, parallel: str = "ddp"
) -> str:
    """Writes a checkpoint of the run into ``run_dir/checkpoint`` (``run_dir/dcp`` with ``parallel="fsdp2"``;
    every rank calls it) and keeps only the newest. ``extra`` holds :data:`EXTRA_KEYS`; the configuration also
    goes to ``run_dir/config.json`` (rank 0)."""
    if parallel == "fsdp2":
        return _save_dcp(run_dir, model, optimizer, sampler, extra, rank)
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
    state to continue with. Raises :class:`ResumeError`, naming the file or folder, when there is no checkpoint,
    when it was made with another configuration (``config``, compared without ``world_size``) or another
    ``--parallel``, or when it cannot be read."""
    if parallel == "fsdp2":
        if _has_dcp_checkpoint(run_dir):
            return _load_dcp(run_dir, model, optimizer, sampler, config, rank, world_size)
        if _has_ddp_checkpoint(run_dir):
            raise ResumeError(
                f"{run_dir} holds a checkpoint of --parallel ddp (fastmoe.checkpoint, in {run_dir / CHECKPOINT_DIR}), "
                "not of --parallel fsdp2: resume it with --parallel ddp"
            )
    elif not _has_ddp_checkpoint(run_dir) and _has_dcp_checkpoint(run_dir):
        raise ResumeError(
            f"{run_dir} holds a checkpoint of --parallel fsdp2 (torch.distributed.checkpoint, in {run_dir / DCP_DIR}), "
            "not of --parallel ddp: resume it with --parallel fsdp2"
        )
    ckpt_dir = run_dir / CHECKPOINT_DIR
    if ckpt_dir.is_dir():
        try:
            tag = fmoe_checkpoint.latest(str(ckpt_dir))
        except Exception as exc:  # noqa: BLE001 - e.g. a damaged 'latest' file: the message names it
            raise ResumeError(f"cannot resume from {ckpt_dir}: {exc}") from exc
        if tag is not None:
            return _load_folder(run_dir, ckpt_dir, model, optimizer, sampler, config, rank, world_size)
    legacy = legacy_paths(run_dir)
    if legacy:
        return _load_legacy(run_dir, legacy, model, optimizer, sampler, config, rank, world_size)
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
    # None when saved by another number of processes
    return _restore_streams(where, extra, info["rank_extra"], sampler, config, rank, world_size)


def _comparable(config: dict) -> dict:
    # The number of processes may change between a checkpoint and its resume: the experts are resharded.
    return {k: v for k, v in config.items() if k != "world_size"}


def _load_legacy(run_dir, legacy, model, optimizer, sampler, config, rank, world_size) -> dict:
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
    names = (CHECKPOINT_DIR, DCP_DIR, CONFIG_FILE, "log.jsonl")
    found = [run_dir / name for name in names if (run_dir / name).exists()]
    found += legacy_paths(run_dir)
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found


# ----------------------------------------------------------------------------------------------- --parallel fsdp2


def _dcp_tags(directory: Path) -> list[str]:
    """The complete checkpoints in ``directory`` (tag folders holding ``train.json``), oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("step-") and (p / DCP_STATE).is_file())


def _dcp_latest(directory: Path) -> str | None:
    """The tag ``directory/latest`` names, else the newest complete one (a save that died after its rename and
    before ``latest`` left it complete), else None."""
    tag = _checkpoint_io.read_latest(str(directory))
    if tag is not None:
        return tag
    tags = _dcp_tags(directory)
    return tags[-1] if tags else None


def _has_dcp_checkpoint(run_dir: Path) -> bool:
    directory = run_dir / DCP_DIR
    if not directory.is_dir():
        return False
    try:
        return _dcp_latest(directory) is not None
    except fmoe_checkpoint.CheckpointError:
        return True  # a damaged 'latest': the load names it


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every save and load without a process group that it assumes one process; that is the intent
    of ``--parallel fsdp2`` in one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _dcp_state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def _save_dcp(run_dir: Path, model, optimizer, sampler, extra: dict, rank: int) -> str:
    """A checkpoint of ``--parallel fsdp2``: every rank calls it.

    1. Rank 0 writes ``config.json``, removes what a crashed save left, and makes the staging folder.
    2. Every rank writes its RNG and sampler state, then DCP writes the model and AdamW state (a collective:
       every rank its own shards, rank 0 the metadata).
    3. Rank 0 records the size and sha256 of every file with ``extra`` in ``train.json``, renames the staging
       folder to ``step-<step>``, points ``latest`` at it, and removes the older checkpoints.
    """
    import torch.distributed.checkpoint as dcp

    io = _checkpoint_io
    directory = run_dir / DCP_DIR
    tag = f"step-{extra['step']:08d}"

    def prepare():
        io.json_save_atomic({"format": FORMAT, "config": extra["config"]}, str(run_dir / CONFIG_FILE))
        directory.mkdir(parents=True, exist_ok=True)
        io.clean_leftovers(str(directory))
        return io.new_staging(str(directory), tag)

    staging = io.on_rank0(prepare, f"preparing the checkpoint in {directory}")
    error = None
    try:
        state = {"rng": rng_state(), "sampler": sampler.state_dict()}
        io.torch_save_atomic(state, os.path.join(staging, io.rank_file(rank)), rank=rank)
    except Exception as exc:  # noqa: BLE001 - every rank learns of it before the collective save
        error = exc
    io.gather_checked(None, error, f"writing the per-rank state into {staging}")
    with _single_process_quiet():
        dcp.save(_dcp_state_dicts(model, optimizer), checkpoint_id=staging, no_dist=not io.dist_on())

    def commit():
        files = {
            name: {
                "bytes": os.path.getsize(os.path.join(staging, name)),
                "sha256": io.file_sha256(os.path.join(staging, name)),
            }
            for name in sorted(os.listdir(staging))
        }
        payload = {"format": FORMAT, "format_version": DCP_FORMAT_VERSION, **extra, "files": files}
        io.json_save_atomic(payload, os.path.join(staging, DCP_STATE))
        final = directory / tag
        if final.exists():  # a run resumed from an earlier checkpoint saves this step again
            io.remove_checkpoint(str(directory), tag)
        os.rename(staging, final)
        io.fsync_dir(str(directory))
        io.write_latest(str(directory), tag)
        for old in _dcp_tags(directory):
            if old != tag:
                io.remove_checkpoint(str(directory), old)
        for legacy in legacy_paths(run_dir):
            legacy.unlink()
        return str(final)

    return io.on_rank0(commit, f"committing the checkpoint {directory / tag}")


def _read_dcp_state(directory: Path, config: dict) -> tuple[Path, dict]:
    """``(checkpoint folder, train.json)`` of the newest checkpoint in ``directory``, after checking the size and
    sha256 of every file it lists and the configuration it was written with."""
    try:
        tag = _dcp_latest(directory)
    except fmoe_checkpoint.CheckpointError as exc:
        raise ResumeError(f"cannot resume from {directory}: {exc}") from exc
    where = directory / tag
    state_file = where / DCP_STATE
    try:
        state = json.loads(state_file.read_text())
        files = state["files"]
        if not isinstance(files, dict):
            raise TypeError(f"'files' is a {type(files).__name__}")
    except FileNotFoundError as exc:
        raise ResumeError(f"cannot resume from {directory}: {state_file} is missing ('latest' names {tag})") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ResumeError(f"{state_file} cannot be read ({exc}); it is corrupted") from exc
    if state.get("format") != FORMAT or any(k not in state for k in EXTRA_KEYS):
        raise ResumeError(f"{state_file} is not a checkpoint of fastmoe-train (it lacks {list(EXTRA_KEYS)})")
    if state.get("format_version") != DCP_FORMAT_VERSION:
        raise ResumeError(f"{state_file}: format {state.get('format_version')!r}, expected {DCP_FORMAT_VERSION}")
    for name, recorded in files.items():
        path = where / name
        if not path.is_file():
            raise ResumeError(f"cannot resume from {where}: checkpoint file {path} is missing")
        size = path.stat().st_size
        if size != recorded["bytes"]:
            raise ResumeError(
                f"cannot resume from {where}: checkpoint file {path} has {size} bytes but {DCP_STATE} recorded "
                f"{recorded['bytes']}: it was truncated or replaced after the checkpoint was written"
            )
        digest = _checkpoint_io.file_sha256(str(path))
        if digest != recorded["sha256"]:
            raise ResumeError(
                f"cannot resume from {where}: checkpoint file {path} is corrupt: its sha256 is {digest}, "
                f"{DCP_STATE} recorded {recorded['sha256']} (its bytes changed after the checkpoint was written)"
            )
    _check_config(state_file, state["config"], _comparable(config))
    return where, state


def _load_dcp(run_dir, model, optimizer, sampler, config, rank, world_size) -> dict:
    """Rank 0 checks the checkpoint's files and configuration (every rank raises its ResumeError); then DCP
    loads the model and AdamW state, resharded to this job's layout, and each rank restores its RNG and sampler
    state (saved by as many processes) or restarts them from derived seeds (saved by another number)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    io = _checkpoint_io
    config_file = run_dir / CONFIG_FILE

    def check():
        if config_file.exists():
            try:
                saved_config = json.loads(config_file.read_text())["config"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ResumeError(f"{config_file} cannot be read ({exc}); it is corrupted") from exc
            _check_config(config_file, saved_config, _comparable(config))
        where, state = _read_dcp_state(run_dir / DCP_DIR, config)
        return str(where), state

    found, message = None, None
    if rank == 0:
        try:
            found = check()
        except ResumeError as exc:
            message = str(exc)
    found, message = io.broadcast((found, message))  # every rank stops with rank 0's message
    if message is not None:
        raise ResumeError(message)
    where, extra = found
    targets = _dcp_state_dicts(model, optimizer)  # also creates the AdamW state that the load fills
    try:
        with _single_process_quiet():
            dcp.load(targets, checkpoint_id=where, no_dist=not io.dist_on())
        set_state_dict(model, optimizer, model_state_dict=targets["model"], optim_state_dict=targets["optim"])
    except Exception as exc:  # noqa: BLE001 - whatever failed, the message must name the checkpoint
        raise ResumeError(f"cannot resume from {where}: {type(exc).__name__}: {exc}") from exc
    if extra["world_size"] != world_size:  # saved by another number of processes
        return _restore_streams(where, extra, None, sampler, config, rank, world_size)
    path = os.path.join(where, io.rank_file(rank))
    read = lambda: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
    return _restore_streams(where, extra, read, sampler, config, rank, world_size, label=path)


def _restore_streams(where, extra: dict, rank_state, sampler, config: dict, rank: int, world_size: int, label=None):
    """The resume state of a checkpoint's ``extra`` with this rank's sampler and RNG restored from ``rank_state``
    (a dict, or a function that reads it); with ``rank_state`` None (saved by another number of processes) the
    rank's streams restart from seeds derived from the step. A state that cannot be read or applied raises
    ResumeError naming ``label`` (default ``where``)."""
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
        if callable(rank_state):
            rank_state = rank_state()
        sampler.load_state_dict(rank_state["sampler"])
        set_rng_state(rank_state["rng"])
    except Exception as exc:  # noqa: BLE001 - a torn RNG state raises from torch's internals
        raise ResumeError(
            f"{label or where}: the random state of rank {rank} cannot be restored ({exc}); it is corrupted"
        ) from exc
    state["rng"] = rank_state["rng"]
    return state
