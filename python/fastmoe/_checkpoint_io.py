"""Files, metadata validation, the folder lock, process-group coordination and fault injection for
:mod:`fastmoe.checkpoint`.

Every file of a checkpoint is written to ``<path>.tmp``, flushed and fsync'ed, then renamed over ``<path>`` with
``os.replace`` and the folder fsync'ed, so a reader sees either the old file, or the new one complete. The sha256
of the bytes is computed as they are written and recorded in meta.json, so a reader can tell a file whose bytes
changed afterwards (disk, copy or transfer corruption) from the one that was saved.
"""

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import time
import warnings

import torch
import torch.distributed as dist

from fastmoe import _groups

FORMAT = "fastmoe-checkpoint"
VERSION = 2  # 1: fastmoe's own shard files (before the experts were written by DCP)
META = "meta.json"
STATE = "state.pt"  # rank 0: extra, the optimizer's param groups, and every value that is not a tensor
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the tensors
LATEST = "latest"
LOCK = ".lock"
STAGING_PREFIX = ".partial-"
TRASH_PREFIX = ".deleting-"

# Fault injection for the crash-safety tests: FASTMOE_CHECKPOINT_FAULT is a comma-separated list of
# ``point`` or ``point@rank``; the process (of that rank, or any rank) calls os._exit(FAULT_EXIT_CODE) when save
# reaches that point. The points, in the order save reaches them, are listed in FAULT_POINTS.
FAULT_ENV = "FASTMOE_CHECKPOINT_FAULT"
FAULT_EXIT_CODE = 75
FAULT_POINTS = (
    "after_staging",  # every rank: the staging folder exists, nothing written yet
    "during_dcp",  # inside DCP's save: the rank's tensor file is written, DCP's .metadata not yet
    "after_dcp",  # every rank: DCP's save is complete (tensor files and .metadata)
    "before_meta",  # rank 0: every file written (state.pt too), meta.json not yet
    "before_commit",  # rank 0: meta.json written, the staging folder not yet renamed to its tag
    "before_latest",  # rank 0: the checkpoint is complete under its tag, ``latest`` still names the previous one
    "before_rotate",  # rank 0: ``latest`` names the new checkpoint, old ones (keep=N) not yet deleted
)

# A tag, and every file name meta.json lists, is a plain name inside the checkpoint folder: no separator, no
# leading '.' (so never '..', a staging or trash folder, or the lock file).
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


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


def is_tag(tag) -> bool:
    return isinstance(tag, str) and bool(_TAG_RE.match(tag)) and tag != LATEST and len(tag) <= 200


def check_tag(tag) -> str:
    if not is_tag(tag):
        raise ValueError(
            f"tag must be a folder name of letters, digits and _.+=- (not starting with '.' or '-', not "
            f"{LATEST!r}), got {tag!r}"
        )
    return tag


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


# ----------------------------------------------------------------------------------------------- files


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A write-only file object that hashes the bytes on their way to ``f`` (torch.save writes its zip
    sequentially through ``write``), so a file is not read back to checksum it."""

    def __init__(self, f):
        self.f, self.sha256, self.count = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.count += memoryview(data).nbytes
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: str) -> dict:
    """``{"size", "sha256"}`` of a file already written (by DCP), as :func:`write_atomic` returns them."""
    return {"size": os.path.getsize(path), "sha256": file_sha256(path)}


def write_atomic(path: str, write) -> dict:
    """Writes ``path`` through ``write(fileobj)`` into ``path.tmp``, fsyncs it and renames it into place.
    Returns ``{"size", "sha256"}`` of the file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        writer = _HashingWriter(f)
        write(writer)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    # A writer that seeked back would make the streamed hash differ from the file's bytes; hash the file then.
    digest = writer.sha256.hexdigest() if writer.count == size else file_sha256(tmp)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return {"size": size, "sha256": digest}


def torch_save_atomic(obj, path: str) -> dict:
    return write_atomic(path, lambda f: torch.save(obj, f))


def json_save_atomic(obj, path: str) -> dict:
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    return write_atomic(path, lambda f: f.write(data))


def verify_file(directory: str, meta: dict, fname: str) -> str:
    """The path of file ``fname`` of the checkpoint in ``directory``, after checking its size and sha256 against
    ``meta``."""
    path = os.path.join(directory, fname)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing")
    size, expected_size = os.path.getsize(path), meta["files"][fname]
    if size != expected_size:
        raise CheckpointError(
            f"checkpoint file {path} has {size} bytes but meta.json recorded {expected_size}: it was truncated or "
            f"replaced after the checkpoint was written"
        )
    actual, expected_sha256 = file_sha256(path), meta["sha256"][fname]
    if actual != expected_sha256:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt: its sha256 is {actual}, meta.json recorded {expected_sha256} "
            f"(its bytes changed after the checkpoint was written)"
        )
    return path


def verify_files(directory: str, meta: dict, rank: int = 0, world_size: int = 1) -> None:
    """Checks every ``world_size``-th file of the checkpoint (from the ``rank``-th, in name order), so that the
    ranks of a job share the reading."""
    for fname in sorted(meta["files"])[rank::world_size]:
        verify_file(directory, meta, fname)


def torch_load(directory: str, meta: dict, fname: str, weights_only: bool):
    """``torch.load`` of file ``fname`` of the checkpoint in ``directory`` (checked by :func:`verify_file`)."""
    path = verify_file(directory, meta, fname)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except Exception as exc:
        hint = " (pass weights_only=False to read a payload of arbitrary Python objects)" if weights_only else ""
        raise CheckpointError(f"cannot read checkpoint file {path}: {exc}{hint}") from exc


def read_json(path: str) -> dict:
    """meta.json at ``path``, parsed and checked against the schema (:func:`validate_meta`)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: that folder is not a complete fastmoe checkpoint")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"cannot read checkpoint metadata {path}: {type(exc).__name__}: {exc}") from exc
    return validate_meta(meta, path)


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def validate_meta(meta, path: str) -> dict:
    """Checks every field :mod:`fastmoe.checkpoint` reads from meta.json, so a malformed file raises one
    CheckpointError naming ``path`` here, not a KeyError or IndexError deep inside a load. Unknown fields are
    allowed (newer writers may add some); ``sha256`` must hold a digest for every file ``files`` lists."""

    def bad(what: str):
        raise CheckpointError(f"{path} is not valid fastmoe checkpoint metadata: {what}")

    if not isinstance(meta, dict):
        bad(f"the top level must be a JSON object, got a JSON {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not fastmoe checkpoint metadata (format={meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has format version {meta.get('version')!r}; this fastmoe reads {VERSION} (version 1 checkpoints, "
            f"fastmoe's own shard files, are read by fastmoe releases before the DCP format)"
        )
    for key in ("tag", "sequence", "world_size", "has_optimizer", "layers", "files", "rank_extra"):
        if key not in meta:
            bad(f"{key!r} is missing")
    if not isinstance(meta["tag"], str):
        bad(f"'tag' must be a string, got {meta['tag']!r}")
    if not _is_int(meta["sequence"], 0):
        bad(f"'sequence' must be an int >= 0, got {meta['sequence']!r}")
    if not _is_int(meta["world_size"], 1):
        bad(f"'world_size' must be an int >= 1, got {meta['world_size']!r}")
    if not isinstance(meta["has_optimizer"], bool):
        bad(f"'has_optimizer' must be true or false, got {meta['has_optimizer']!r}")

    files = meta["files"]
    if not isinstance(files, dict):
        bad(f"'files' must be an object of file name -> size, got {files!r}")
    for fname, size in files.items():
        if not (is_tag(fname) or fname == DCP_METADATA):
            bad(f"'files' names {fname!r}, which is not a plain file name inside the checkpoint folder")
        if not _is_int(size, 0):
            bad(f"'files'[{fname!r}] must be a size in bytes (an int >= 0), got {size!r}")
    for required in (STATE, DCP_METADATA):
        if required not in files:
            bad(f"'files' does not list {required}")
    sums = meta.get("sha256")
    if not isinstance(sums, dict) or set(sums) != set(files):
        got = f"checksums of {sorted(sums)}" if isinstance(sums, dict) else repr(sums)
        bad(f"'sha256' must hold one checksum for each file of 'files' {sorted(files)}, got {got}")
    for fname, digest in sums.items():
        if not isinstance(digest, str) or not _SHA256_RE.match(digest):
            bad(f"'sha256'[{fname!r}] must be 64 lowercase hex digits, got {digest!r}")

    rank_extra = meta["rank_extra"]
    if not isinstance(rank_extra, list):
        bad(f"'rank_extra' must be a list of ranks, got {rank_extra!r}")
    for r in rank_extra:
        if not _is_int(r, 0) or r >= meta["world_size"] or rank_file(r) not in files:
            bad(f"'rank_extra' holds {r!r}, not a rank in [0, {meta['world_size']}) whose rank file 'files' lists")

    layers = meta["layers"]
    if not isinstance(layers, dict):
        bad(f"'layers' must be an object of layer name -> layer, got {layers!r}")
    for name, info in layers.items():
        where = f"layers[{name!r}]"
        if not isinstance(info, dict):
            bad(f"{where} must be an object, got {info!r}")
        for key in ("fused", "num_experts_total", "ep_size"):
            if key not in info:
                bad(f"{where}[{key!r}] is missing")
        if not isinstance(info["fused"], bool):
            bad(f"{where}['fused'] must be true or false, got {info['fused']!r}")
        total, ep_size = info["num_experts_total"], info["ep_size"]
        if not _is_int(total, 1):
            bad(f"{where}['num_experts_total'] must be an int >= 1, got {total!r}")
        if not _is_int(ep_size, 1) or total % ep_size:
            bad(f"{where}['ep_size'] must be an int >= 1 that divides num_experts_total={total}, got {ep_size!r}")
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
        except CheckpointError:  # unreadable metadata: not a complete checkpoint; load(tag=...) says why
            continue
        found.append((meta["sequence"], name))
    return [name for _, name in sorted(found)]


def read_latest(directory: str) -> str | None:
    """The tag named by ``directory/latest``, or None when there is no such file. A file that does not hold a
    tag (a plain folder name inside ``directory``) is an error: it never comes from a save, which writes it
    atomically, so it was edited or corrupted."""
    path = os.path.join(directory, LATEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(1024)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    text = data.decode("utf-8", errors="backslashreplace")  # undecodable bytes are not a tag; show them
    tag = text.strip()
    if not is_tag(tag):
        raise CheckpointError(
            f"{path} holds {text[:100]!r}, which is not a checkpoint tag (a folder name inside {directory} of "
            f"letters, digits and _.+=-, not starting with '.' or '-', not {LATEST!r})"
        )
    return tag


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
    """Deletes staging and trash folders that a crashed save or rotation left behind. Called only while holding
    the folder's :class:`SaveLock`: every live save holds it from before its staging folder exists until after
    its commit, so no folder deleted here belongs to a save that can still commit."""
    for name in os.listdir(directory):
        if name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def new_staging(directory: str, tag: str) -> str:
    """Creates the staging folder of a save. Its name is unique per save, so a rank of a crashed job that is
    still writing can never put a file into the staging folder of a later save of the same tag."""
    staging = os.path.join(directory, f"{STAGING_PREFIX}{tag}.{secrets.token_hex(4)}")
    os.makedirs(staging)
    return staging


# ----------------------------------------------------------------------------------------------- the folder lock


class SaveLock:
    """An exclusive ``flock`` on ``directory/.lock``, taken by the process that chooses a save's tag (rank 0 of
    its job) before it cleans leftovers, held while every rank writes and until ``latest`` and rotation are
    done. Two jobs saving into one folder thus take turns instead of choosing the same tag and deleting or
    committing each other's staging folder. The kernel drops the lock when the holder dies, so a crashed save
    never blocks the next one. The file stays (deleting a lock file races with a process about to lock it)."""

    def __init__(self, directory: str, timeout: float | None):
        self.path = os.path.join(directory, LOCK)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._acquire(directory, timeout)
            holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, holder.encode(), 0)
        except BaseException:
            os.close(self.fd)
            raise

    def _acquire(self, directory: str, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.002
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise CheckpointError(
                        f"cannot lock {self.path} ({exc}): the checkpoint folder must be on a filesystem that "
                        f"supports flock (local disks and NFS do; Lustre needs the 'flock' mount option)"
                    ) from exc
            if deadline is not None and time.monotonic() >= deadline:
                try:
                    holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
                except OSError:
                    holder = "another process"
                raise CheckpointError(
                    f"cannot save into {directory}: the lock file {self.path} is held by {holder} (another save "
                    f"of this folder is in progress; waited {timeout} s, see save(lock_timeout=...))"
                )
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(pause * 2, 0.1)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # a save that times out later must not name this process as the holder
            fcntl.flock(self.fd, fcntl.LOCK_UN)  # explicit: a forked child holding the descriptor keeps no lock
        finally:
            os.close(self.fd)
            self.fd = None


def check_lock_timeout(value) -> None:
    ok = value is None or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    )
    if not ok:
        raise ValueError(f"lock_timeout must be None or a finite number >= 0, got {value!r}")


# ----------------------------------------------------------------------------------------------- process group


@contextlib.contextmanager
def dcp_quiet():
    """DCP warns on every save and load without a process group that it assumes one process; that is the intent
    of a checkpoint written or read by one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


_dcp_group = (None, None, None)  # (the default group it was made for, its timeout, the group)
DCP_TIMEOUT_ENV = "FASTMOE_CHECKPOINT_TIMEOUT"


def dcp_timeout() -> float:
    """``FASTMOE_CHECKPOINT_TIMEOUT`` in seconds (default 1800, torch's own default): how long DCP's coordination
    inside a save or a load waits for the slowest rank's reads or writes."""
    return _groups.env_seconds(DCP_TIMEOUT_ENV, 1800.0)


def dcp_group():
    """The process group DCP coordinates over (None without a process group): a gloo group of every rank (so its
    small exchanges never need a CUDA device) whose collectives give up after :func:`dcp_timeout`; a rank that
    dies inside DCP closes its connections, so the others raise at once. Made on first use by every rank (save
    and load are collectives), again after the default group is replaced or the timeout changed."""
    global _dcp_group
    if not dist_on():
        return None
    world, timeout, group = _dcp_group
    if world is not dist.group.WORLD or timeout != dcp_timeout():
        timeout = dcp_timeout()
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
        _dcp_group = (dist.group.WORLD, timeout, group)
    return group


def rank_and_world() -> tuple[int, int]:
    if dist_on():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(obj) -> list:
    """``obj`` of every rank of the default group, in rank order (``[obj]`` without a process group). Bounded by
    ``FASTMOE_COMM_TIMEOUT``: a rank that never joins makes the others raise instead of wait."""
    if not dist_on():
        return [obj]
    return _groups._all_gather_object(obj, dist.group.WORLD, "checkpoint exchange (all_gather)")


def broadcast(obj, extra_seconds: float = 0.0):
    """Rank 0's ``obj`` on every rank (the objects are small: paths, checksums, messages), bounded as
    :func:`all_gather` is, plus ``extra_seconds`` (how much later than the others rank 0 may come)."""
    if not dist_on():
        return obj
    mine = obj if dist.get_rank() == 0 else None
    what = "checkpoint exchange (broadcast from rank 0)"
    return _groups._all_gather_object(mine, dist.group.WORLD, what, extra_seconds)[0]


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


def on_rank0(fn, what: str, extra_seconds: float = 0.0):
    """Runs ``fn()`` on rank 0 and returns its value on every rank; if it raises, rank 0 re-raises and the other
    ranks raise a CheckpointError with its message. The other ranks wait for it ``extra_seconds`` longer than
    any other exchange (``fn`` may wait for the folder's lock)."""
    rank, _ = rank_and_world()
    value, exc = None, None
    if rank == 0:
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - sent to the other ranks, then re-raised
            exc = e
    value, message = broadcast((value, None if exc is None else f"{type(exc).__name__}: {exc}"), extra_seconds)
    if exc is not None:
        raise exc
    if message is not None:
        raise CheckpointError(f"{what} failed on rank 0: {message}")
    return value
