"""Files, process-group coordination and fault injection for :mod:`fastmoe.checkpoint`.

Every file of a checkpoint is written to ``<path>.tmp``, flushed and fsync'ed, then renamed over ``<path>`` with
``os.replace`` and the folder fsync'ed, so a reader sees either the old file, or the new one complete.
"""

import json
import os
import re
import shutil

import torch
import torch.distributed as dist

FORMAT = "fastmoe-checkpoint"
VERSION = 1
META = "meta.json"
COMMON = "common.pt"
LATEST = "latest"
STAGING_PREFIX = ".partial-"
TRASH_PREFIX = ".deleting-"

# Fault injection for the crash-safety tests: FASTMOE_CHECKPOINT_FAULT is a comma-separated list of
# ``point`` or ``point@rank``; the process (of that rank, or any rank) calls os._exit(FAULT_EXIT_CODE) when save
# reaches that point. The points, in the order save reaches them, are listed in FAULT_POINTS.
FAULT_ENV = "FASTMOE_CHECKPOINT_FAULT"
FAULT_EXIT_CODE = 75
FAULT_POINTS = (
    "after_staging",  # every rank: the staging folder exists, nothing written yet
    "during_shard",  # the rank's expert shard is half written (torn temporary file), then the process dies
    "after_shard",  # the rank's expert shard is complete in the staging folder
    "before_meta",  # rank 0: every shard and common.pt written, meta.json not yet
    "before_commit",  # rank 0: meta.json written, the staging folder not yet renamed to its tag
    "before_latest",  # rank 0: the checkpoint is complete under its tag, ``latest`` still names the previous one
    "before_rotate",  # rank 0: ``latest`` names the new checkpoint, old ones (keep=N) not yet deleted
)

_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]*$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the path, key or value at fault."""


def fault_point(point: str, rank: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    for item in spec.split(","):
        name, _, at = item.strip().partition("@")
        if name not in FAULT_POINTS:
            raise ValueError(f"{FAULT_ENV}={spec!r} names an unknown point {name!r}; points: {list(FAULT_POINTS)}")
        if name == point and (not at or int(at) == rank):
            os._exit(FAULT_EXIT_CODE)


def check_tag(tag) -> str:
    if not isinstance(tag, str) or not _TAG_RE.match(tag) or tag == LATEST or len(tag) > 200:
        raise ValueError(
            f"tag must be a folder name of letters, digits and _.+=- (not starting with '.' or '-', not "
            f"{LATEST!r}), got {tag!r}"
        )
    return tag


# ----------------------------------------------------------------------------------------------- files


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, write, *, rank: int = 0, torn_fault: str | None = None) -> int:
    """Writes ``path`` through ``write(fileobj)`` into ``path.tmp``, fsyncs it and renames it into place.
    Returns the file's size. With ``torn_fault`` set, that fault point truncates the temporary file to half
    and kills the process before the rename (a torn write)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    if torn_fault is not None and _fault_armed(torn_fault, rank):
        with open(tmp, "r+b") as f:
            f.truncate(size // 2)
        fault_point(torn_fault, rank)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return size


def _fault_armed(point: str, rank: int) -> bool:
    spec = os.environ.get(FAULT_ENV, "")
    for item in spec.split(","):
        name, _, at = item.strip().partition("@")
        if name == point and (not at or int(at) == rank):
            return True
    return False


def torch_save_atomic(obj, path: str, *, rank: int = 0, torn_fault: str | None = None) -> int:
    return write_atomic(path, lambda f: torch.save(obj, f), rank=rank, torn_fault=torn_fault)


def json_save_atomic(obj, path: str) -> int:
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    return write_atomic(path, lambda f: f.write(data))


def torch_load(path: str, expected_size: int | None, weights_only: bool):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing")
    size = os.path.getsize(path)
    if expected_size is not None and size != expected_size:
        raise CheckpointError(
            f"checkpoint file {path} has {size} bytes but meta.json recorded {expected_size}: it was truncated or "
            f"replaced after the checkpoint was written"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except Exception as exc:
        hint = " (pass weights_only=False to read a payload of arbitrary Python objects)" if weights_only else ""
        raise CheckpointError(f"cannot read checkpoint file {path}: {exc}{hint}") from exc


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: that folder is not a complete fastmoe checkpoint")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not fastmoe checkpoint metadata (format={meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has format version {meta.get('version')!r}; this fastmoe reads {VERSION}")
    return meta


def list_checkpoints(directory: str) -> list[str]:
    """The tags of the complete checkpoints in ``directory`` (those with a readable meta.json), oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        if name.startswith(".") or name == LATEST:
            continue
        path = os.path.join(directory, name, META)
        if not os.path.isfile(path):
            continue
        try:
            meta = read_json(path)
        except (CheckpointError, ValueError):
            continue
        found.append((meta.get("sequence", 0), name))
    return [name for _, name in sorted(found)]


def read_latest(directory: str) -> str | None:
    """The tag named by ``directory/latest``, or None when there is no such file."""
    path = os.path.join(directory, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def write_latest(directory: str, tag: str) -> None:
    write_atomic(os.path.join(directory, LATEST), lambda f: f.write((tag + "\n").encode()))


def remove_checkpoint(directory: str, tag: str) -> None:
    """Renames the checkpoint away first (one atomic step: it stops being a checkpoint), then deletes it."""
    trash = os.path.join(directory, f"{TRASH_PREFIX}{tag}")
    if os.path.exists(trash):
        shutil.rmtree(trash)
    os.rename(os.path.join(directory, tag), trash)
    fsync_dir(directory)
    shutil.rmtree(trash)


def clean_leftovers(directory: str) -> None:
    """Deletes staging and trash folders that a crashed save or rotation left behind."""
    for name in os.listdir(directory):
        if name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


# ----------------------------------------------------------------------------------------------- process group


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if dist_on():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(obj) -> list:
    """``obj`` of every rank of the default group, in rank order (``[obj]`` without a process group)."""
    if not dist_on():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if not dist_on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_checked(value, exc: BaseException | None, what: str) -> list:
    """Gathers ``value`` from every rank, after every rank learns whether any rank failed, so all raise together
    instead of one rank hanging in a later collective. A rank that failed re-raises its own exception; the
    others raise a CheckpointError that quotes the failed ranks' messages."""
    gathered = all_gather((value, None if exc is None else f"{type(exc).__name__}: {exc}"))
    if exc is not None:
        raise exc
    failed = [(rank, msg) for rank, (_, msg) in enumerate(gathered) if msg is not None]
    if failed:
        text = "\n".join(f"  rank {rank}: {msg}" for rank, msg in failed)
        raise CheckpointError(f"{what} failed on {len(failed)} other rank(s):\n{text}")
    return [v for v, _ in gathered]


def on_rank0(fn, what: str):
    """Runs ``fn()`` on rank 0 and returns its value on every rank; if it raises, rank 0 re-raises and the other
    ranks raise a CheckpointError with its message."""
    rank, _ = rank_and_world()
    value, exc = None, None
    if rank == 0:
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - sent to the other ranks, then re-raised
            exc = e
    value, message = broadcast((value, None if exc is None else f"{type(exc).__name__}: {exc}"))
    if exc is not None:
        raise exc
    if message is not None:
        raise CheckpointError(f"{what} failed on rank 0: {message}")
    return value
