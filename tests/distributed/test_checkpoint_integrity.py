"""fastmoe.checkpoint against concurrent writers, corrupted bytes and malformed metadata.

- Concurrent saves: independent processes and a two-rank expert-parallel job save into one folder at the same
  time; every path a save returned must load with what that save wrote, ``latest`` must name a complete
  checkpoint, and no save may fail or lose another's checkpoint (the folder's lock serialises them).
- Corruption: bytes changed in any file of a checkpoint, keeping its size and leaving it readable (so neither the
  size check nor the reader can see it): the tensor data in DCP's ``__0_0.distcp`` (at the offsets its index
  records), a key name in DCP's index ``.metadata``, the tensor records of ``state.pt`` or of a rank file. Every
  file's sha256 is checked before anything is read, so ``load`` and ``consolidate`` raise a CheckpointError naming
  the file. meta.json lists every file with its size and sha256, and each MoE layer's ``fused``,
  ``num_experts_total`` and ``ep_size``.
- Malformed ``meta.json`` (including a missing checksum, a required file it does not list, a layer without its
  fields, another format version) or ``latest``: a CheckpointError naming the file, never a JSON, key or index
  error. A version-1 checkpoint (fastmoe's own shard files) raises a CheckpointError naming its version.
- Bad arguments (a tag outside the folder, a bad ``lock_timeout``) raise a ValueError naming them; a save that one
  rank never calls raises on the others within ``FASTMOE_COMM_TIMEOUT``.
"""

import hashlib
import json
import os
import re
import struct
import threading
import time
import traceback
import zipfile
from io import BytesIO

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from ckpt_models import TinyMoEModel, make_model, make_optimizer, train_step
from dist_harness import run_workers

import fastmoe
from conftest import assert_bitwise_equal
from fastmoe import checkpoint
from fastmoe.checkpoint import CheckpointError

# ----------------------------------------------------------------------------------------------- concurrent saves

# Independent single-process savers, each saving SAVES checkpoints, plus one two-rank EP job doing the same.
# Without a lock, savers that start together pick the same tag and delete or commit each other's staging folder
# within the first few saves.
WRITERS, SAVES = 2, 10
EP_JOB = WRITERS  # the writer id of the EP job


def stamp(writer: int, i: int) -> float:
    return float(1000 * writer + i)


def save_stamped(model, directory: str, writer: int, count: int) -> list:
    """``count`` saves, each with embed.bias and ``extra`` naming (writer, i); ``(i, path, None)`` for a save that
    returned, ``(i, None, error)`` for one that raised."""
    records = []
    for i in range(count):
        with torch.no_grad():
            model.embed.bias.fill_(stamp(writer, i))
        try:
            path = checkpoint.save(model, None, directory, extra={"writer": writer, "i": i})
            records.append((i, path, None))
        except Exception as exc:  # noqa: BLE001 - every failed save is reported by the test
            records.append((i, None, f"{type(exc).__name__}: {exc}"))
    return records


def independent_saver(directory: str, writer: int, count: int, barrier, results) -> None:
    """A process with no process group (a job of its own) that saves ``count`` times."""
    try:
        torch.set_num_threads(1)
        model = make_model(seed=writer)
        barrier.wait(timeout=180)
        results.put((writer, save_stamped(model, directory, writer, count)))
    except BaseException:  # noqa: BLE001 - sent back to the test with its traceback
        results.put((writer, traceback.format_exc()))


def ep_job_saver(rank: int, world_size: int, directory: str, count: int, barrier) -> list:
    """One rank of a two-rank EP job that saves ``count`` times (both ranks write their DCP file into one staging
    folder; rank 0 chooses the tag and commits)."""
    moe_group, _ = fastmoe.distributed.expert_parallel_groups(world_size)
    model = TinyMoEModel(world_size=world_size, moe_group=moe_group)
    barrier.wait(timeout=180)
    return save_stamped(model, directory, EP_JOB, count)


def test_concurrent_saves_into_one_folder_each_commit_a_complete_checkpoint(tmp_path):
    directory = str(tmp_path / "ckpt")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(WRITERS + 2)  # every saver starts its first save together
    results = ctx.Queue()
    procs = [
        ctx.Process(target=independent_saver, args=(directory, w, SAVES, barrier, results), daemon=True)
        for w in range(WRITERS)
    ]
    for p in procs:
        p.start()
    try:
        ep_records = run_workers(2, ep_job_saver, directory, SAVES, barrier, timeout=240)
        by_writer = dict(results.get(timeout=240) for _ in range(WRITERS))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    by_writer[EP_JOB] = ep_records[0]
    crashed = {w: r for w, r in by_writer.items() if isinstance(r, str)}
    assert not crashed, crashed
    assert [p for _, p, _ in ep_records[0]] == [p for _, p, _ in ep_records[1]], "the ranks of one job disagree"
    paths = [(path, w, i) for w, records in by_writer.items() for i, path, _ in records if path is not None]
    returned = {path: (w, i) for path, w, i in paths}
    assert len(returned) == len(paths), "two saves returned the same path"

    # Every path a save returned holds what that save wrote (a returned checkpoint is never empty or another's).
    wrong = []
    for path, (writer, i) in sorted(returned.items()):
        model = make_model(seed=99)
        try:
            info = checkpoint.load(model, None, directory, tag=os.path.basename(path))
        except Exception as exc:  # noqa: BLE001 - collected so the message lists every broken checkpoint
            wrong.append(f"{path} (writer {writer}, save {i}): {type(exc).__name__}: {exc}")
            continue
        if info["extra"] != {"writer": writer, "i": i} or not torch.all(model.embed.bias == stamp(writer, i)):
            wrong.append(f"{path} (writer {writer}, save {i}) holds {info['extra']}")
    assert not wrong, f"{len(wrong)} returned checkpoints do not load as saved:\n" + "\n".join(wrong[:5])
    # latest names the checkpoint committed last, which is complete.
    complete = checkpoint.list_checkpoints(directory)
    assert checkpoint.latest(directory) == complete[-1]
    assert checkpoint.load(make_model(seed=99), None, directory)["tag"] == complete[-1]

    # With the lock, the saves take turns: none fails, each commits its own checkpoint, nothing is left over.
    failed = [(w, i, error) for w, records in by_writer.items() for i, _, error in records if error is not None]
    assert not failed, f"{len(failed)} saves failed, e.g. {failed[:3]}"
    assert len(returned) == (WRITERS + 1) * SAVES
    assert sorted(complete) == sorted(os.path.basename(p) for p in returned)
    assert not [n for n in os.listdir(directory) if n.startswith((".partial-", ".deleting-"))]


def test_a_save_that_finds_the_folder_locked_leaves_the_live_save_alone(tmp_path):
    directory = str(tmp_path)
    model = make_model()
    checkpoint.save(model, None, directory, tag="before")

    # A save paused while it writes (it holds the lock, its staging folder exists): model.state_dict() waits.
    live = make_model(seed=1)
    entered, release = threading.Event(), threading.Event()

    def pause(*_):
        if not entered.is_set():
            entered.set()
            release.wait(timeout=120)

    live.register_state_dict_post_hook(pause)
    result = {}
    thread = threading.Thread(target=lambda: result.update(path=checkpoint.save(live, None, directory, tag="live")))
    thread.start()
    try:
        assert entered.wait(timeout=120), "the live save did not start writing"
        staging = [n for n in os.listdir(directory) if n.startswith(".partial-live")]
        assert len(staging) == 1, os.listdir(directory)
        lock = re.escape(os.path.join(directory, ".lock"))
        with pytest.raises(CheckpointError, match=rf"{lock} .*held by pid {os.getpid()}"):
            checkpoint.save(model, None, directory, lock_timeout=0)
        assert os.path.isdir(os.path.join(directory, staging[0])), "the staging folder of the live save is gone"
        assert checkpoint.latest(directory) == "before"
    finally:
        release.set()
        thread.join(timeout=120)
    assert result["path"] == os.path.join(directory, "live")
    loaded = make_model(seed=2)
    assert checkpoint.load(loaded, None, directory)["tag"] == "live"
    for key, value in live.state_dict().items():
        assert_bitwise_equal(loaded.state_dict()[key], value, key)
    assert checkpoint.save(model, None, directory, lock_timeout=0) == os.path.join(directory, "ckpt-000003")


@pytest.mark.parametrize("bad", [-1, "5", True, float("nan"), float("inf")])
def test_lock_timeout_must_be_a_finite_non_negative_number(tmp_path, bad):
    with pytest.raises(ValueError, match=re.escape(f"lock_timeout must be None or a finite number >= 0, got {bad!r}")):
        checkpoint.save(make_model(), None, str(tmp_path), lock_timeout=bad)


# ----------------------------------------------------------------------------------------------- corrupted bytes


def flip_tensor_bytes(path: str, start: int = 0, length: int | None = None, count: int = 16) -> int:
    """XORs the first ``count`` bytes of every tensor record of the torch.save archive at bytes ``[start, start +
    length)`` of ``path`` (stored, uncompressed zip entries ``<archive>/data/<n>``) with 0xFF; the file keeps its
    size and the archive stays readable. Returns how many records were changed."""
    with open(path, "rb") as f:
        f.seek(start)
        blob = f.read() if length is None else f.read(length)
    with zipfile.ZipFile(BytesIO(blob)) as archive:
        records = [i for i in archive.infolist() if re.search(r"/data/\d+$", i.filename) and i.file_size > 0]
    assert all(r.compress_type == zipfile.ZIP_STORED for r in records)
    with open(path, "r+b") as f:
        for record in records:
            name_len, extra_len = struct.unpack("<HH", blob[record.header_offset + 26 : record.header_offset + 30])
            begin = start + record.header_offset + 30 + name_len + extra_len
            f.seek(begin)
            data = f.read(min(count, record.file_size))
            f.seek(begin)
            f.write(bytes(b ^ 0xFF for b in data))
    return len(records)


def flip_dcp_tensor_bytes(checkpoint_path: str, fname: str) -> int:
    """Flips bytes of every tensor DCP stored in its file ``fname``: each one is a torch.save archive at the offset
    and length that DCP's index (``.metadata``) records for it."""
    metadata = dcp.FileSystemReader(checkpoint_path).read_metadata()
    items = [info for info in metadata.storage_data.values() if info.relative_path == fname]
    assert items, f"DCP's index names no item of {fname}"
    return sum(flip_tensor_bytes(os.path.join(checkpoint_path, fname), i.offset, i.length) for i in items)


RENAMED_KEY = (b"model.embed.bias", b"model.embed.BIAS")  # a key of DCP's index, and one of the same length


def rename_dcp_key(checkpoint_path: str, fname: str) -> int:
    """Renames one tensor in DCP's pickled index in place (same length, so the same size; it still unpickles)."""
    path = os.path.join(checkpoint_path, fname)
    with open(path, "rb") as f:
        data = f.read()
    old, new = RENAMED_KEY
    with open(path, "r+b") as f:
        f.write(data.replace(old, new))
    return data.count(old)


def still_readable(checkpoint_path: str, fname: str, state_b: dict) -> None:
    """Asserts that the changed file still reads without a checksum: only the sha256 can tell it was changed."""
    path = os.path.join(checkpoint_path, fname)
    if fname == "__0_0.distcp":  # DCP reads it, with other values
        state_dict = make_model(seed=5).state_dict()
        with pytest.warns(UserWarning, match="torch.distributed is disabled"):  # one process is the intent
            dcp.load({"model": state_dict}, checkpoint_id=checkpoint_path, no_dist=True)
        assert not torch.equal(state_dict["embed.bias"], state_b["embed.bias"])
    elif fname == ".metadata":  # DCP reads it, with a key the model does not have
        keys = dcp.FileSystemReader(checkpoint_path).read_metadata().state_dict_metadata
        assert RENAMED_KEY[1].decode() in keys and RENAMED_KEY[0].decode() not in keys
    else:  # torch.load reads it
        torch.load(path, weights_only=True)


# How each file of a checkpoint is changed, keeping its size and leaving it readable.
CORRUPT = {
    "__0_0.distcp": flip_dcp_tensor_bytes,
    ".metadata": rename_dcp_key,
    "state.pt": lambda path, fname: flip_tensor_bytes(os.path.join(path, fname)),
    "rank-00000.pt": lambda path, fname: flip_tensor_bytes(os.path.join(path, fname)),
}


@pytest.fixture
def saved(tmp_path):
    """A folder with checkpoints 'a' and 'b' (model, Adam, an ``extra`` and a rank_extra with a tensor, so that
    state.pt and the rank file hold tensor records) and the model state of 'b'."""
    directory = str(tmp_path / "ckpt")
    model = make_model()
    optimizer = make_optimizer(model)
    train_step(model, optimizer, 0)
    extra = {"scale": torch.linspace(0.5, 2.0, 5)}
    checkpoint.save(model, optimizer, directory, tag="a", extra=extra, rank_extra={"rng": torch.get_rng_state()})
    train_step(model, optimizer, 1)
    checkpoint.save(model, optimizer, directory, tag="b", extra=extra, rank_extra={"rng": torch.get_rng_state()})
    return directory, {k: v.clone() for k, v in model.state_dict().items()}


def load_b(directory: str) -> dict:
    model = make_model(seed=5)
    optimizer = make_optimizer(model)
    checkpoint.load(model, optimizer, directory, tag="b")
    return model.state_dict()


# consolidate reads no rank file, but checks every file of the checkpoint before it reads any.
@pytest.mark.parametrize("fname", sorted(CORRUPT))
@pytest.mark.parametrize("how", ["load", "consolidate"])
def test_changed_bytes_raise_a_checkpoint_error_naming_the_file(saved, fname, how):
    directory, state_b = saved
    checkpoint_b = os.path.join(directory, "b")
    path = os.path.join(checkpoint_b, fname)
    with open(path, "rb") as f:
        original = f.read()
    assert CORRUPT[fname](checkpoint_b, fname) > 0
    with open(path, "rb") as f:
        changed = f.read()
    assert len(changed) == len(original) and changed != original
    still_readable(checkpoint_b, fname, state_b)

    with pytest.raises(CheckpointError, match=rf"{re.escape(path)} is corrupt: its sha256 is [0-9a-f]{{64}}"):
        if how == "load":
            load_b(directory)
        else:
            checkpoint.consolidate(directory, "b")

    # The other checkpoint is untouched and loads; with its bytes back, 'b' loads as saved.
    model_a = make_model(seed=5)
    assert checkpoint.load(model_a, make_optimizer(model_a), directory, tag="a")["tag"] == "a"
    with open(path, "wb") as f:
        f.write(original)
    for key, value in load_b(directory).items():
        assert_bitwise_equal(value, state_b[key], key)


def test_a_dcp_file_that_meta_json_does_not_list_is_refused(saved):
    directory, state_b = saved
    checkpoint_b = os.path.join(directory, "b")
    meta_path = os.path.join(checkpoint_b, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["files"]["__0_0.distcp"], meta["sha256"]["__0_0.distcp"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    assert flip_dcp_tensor_bytes(checkpoint_b, "__0_0.distcp") > 0

    unlisted = rf"{re.escape(os.path.join(checkpoint_b, '__0_0.distcp'))}.*not listed in meta.json"
    for call in (lambda: load_b(directory), lambda: checkpoint.consolidate(directory, "b")):
        try:
            call()
        except CheckpointError as error:
            assert re.search(unlisted, str(error)), str(error)
        else:
            raise AssertionError("a DCP data file that meta.json does not list was read without its checksum")


def test_meta_json_records_a_sha256_of_every_file_and_the_layers(saved):
    directory, _ = saved
    meta = checkpoint.read_meta(directory, "b")
    files = [".metadata", "__0_0.distcp", "rank-00000.pt", "state.pt"]
    assert sorted(meta["sha256"]) == sorted(meta["files"]) == files
    assert sorted(os.listdir(os.path.join(directory, "b"))) == sorted([*files, "meta.json"])
    for fname, digest in meta["sha256"].items():
        with open(os.path.join(directory, "b", fname), "rb") as f:
            data = f.read()
        assert len(data) == meta["files"][fname], fname
        assert hashlib.sha256(data).hexdigest() == digest, fname
    assert meta["layers"] == {
        "mlp": {"fused": True, "num_experts_total": 4, "ep_size": 1},
        "moe": {"fused": False, "num_experts_total": 4, "ep_size": 1},
    }
    assert (meta["version"], meta["world_size"], meta["rank_extra"], meta["has_optimizer"]) == (2, 1, [0], True)


# ----------------------------------------------------------------------------------------------- malformed metadata


def drop(meta: dict, fname: str) -> None:
    """Removes ``fname`` from meta.json's sizes and checksums alike (so only its absence is wrong)."""
    del meta["files"][fname], meta["sha256"][fname]


def copy_file_records(meta: dict, fname: str, other: str) -> None:
    """Lists ``other`` in meta.json with the size and checksum of ``fname`` (so only its name is wrong)."""
    meta["files"][other], meta["sha256"][other] = meta["files"][fname], meta["sha256"][fname]


def edit_meta(change):
    def apply(text: str) -> str:
        meta = json.loads(text)
        change(meta)
        return json.dumps(meta)

    return apply


# Each case: how meta.json is changed, and what the error says after naming the file.
META_CASES = {
    "invalid-json": (lambda text: text[: len(text) // 2], "JSONDecodeError"),
    "not-utf8": (lambda text: b"\xff\xfe\x00{", "UnicodeDecodeError"),
    "json-list": (lambda text: "[1, 2, 3]", "the top level must be a JSON object"),
    "other-format": (edit_meta(lambda m: m.update(format="something-else")), "format='something-else'"),
    "newer-version": (edit_meta(lambda m: m.update(version=3)), "has format version 3; this fastmoe reads 2"),
    "sequence-not-an-int": (edit_meta(lambda m: m.update(sequence="7")), "'sequence' must be an int >= 0, got '7'"),
    "world-size-zero": (edit_meta(lambda m: m.update(world_size=0)), "'world_size' must be an int >= 1, got 0"),
    "files-missing": (edit_meta(lambda m: m.pop("files")), "'files' is missing"),
    "file-outside-the-folder": (
        edit_meta(lambda m: copy_file_records(m, "state.pt", "../../x.pt")),
        "'files' names '../../x.pt', which is not a plain file name",
    ),
    "file-named-like-the-lock": (
        edit_meta(lambda m: copy_file_records(m, "state.pt", ".lock")),
        "'files' names '.lock', which is not a plain file name",
    ),
    "state-not-listed": (edit_meta(lambda m: drop(m, "state.pt")), "'files' does not list state.pt"),
    "dcp-metadata-not-listed": (edit_meta(lambda m: drop(m, ".metadata")), "'files' does not list .metadata"),
    "file-size-negative": (
        edit_meta(lambda m: m["files"].update({"state.pt": -1})),
        "'files'['state.pt'] must be a size in bytes (an int >= 0), got -1",
    ),
    "checksums-missing": (edit_meta(lambda m: m.pop("sha256")), "'sha256' must hold one checksum for each file"),
    "checksum-of-a-file-missing": (
        edit_meta(lambda m: m["sha256"].pop("__0_0.distcp")),
        "'sha256' must hold one checksum for each file",
    ),
    "checksum-not-hex": (
        edit_meta(lambda m: m["sha256"].update({"state.pt": "abc"})),
        "'sha256'['state.pt'] must be 64 lowercase hex digits, got 'abc'",
    ),
    "checksum-of-an-unknown-file": (
        edit_meta(lambda m: m["sha256"].update({"other.pt": "0" * 64})),
        "'sha256' must hold one checksum for each file",
    ),
    "rank-extra-out-of-range": (edit_meta(lambda m: m.update(rank_extra=[5])), "'rank_extra' holds 5"),
    "rank-extra-without-its-file": (edit_meta(lambda m: m.update(rank_extra=[0])), "'rank_extra' holds 0"),
    "layers-missing": (edit_meta(lambda m: m.pop("layers")), "'layers' is missing"),
    "layer-not-an-object": (edit_meta(lambda m: m["layers"].update(mlp=[1])), "layers['mlp'] must be an object"),
    "layer-fused-missing": (edit_meta(lambda m: m["layers"]["moe"].pop("fused")), "layers['moe']['fused'] is missing"),
    "layer-fused-not-a-bool": (
        edit_meta(lambda m: m["layers"]["mlp"].update(fused=1)),
        "layers['mlp']['fused'] must be true or false, got 1",
    ),
    "layer-experts-missing": (
        edit_meta(lambda m: m["layers"]["mlp"].pop("num_experts_total")),
        "layers['mlp']['num_experts_total'] is missing",
    ),
    "layer-experts-zero": (
        edit_meta(lambda m: m["layers"]["mlp"].update(num_experts_total=0)),
        "layers['mlp']['num_experts_total'] must be an int >= 1, got 0",
    ),
    "layer-ep-size-missing": (
        edit_meta(lambda m: m["layers"]["moe"].pop("ep_size")),
        "layers['moe']['ep_size'] is missing",
    ),
    "layer-ep-size-not-a-divisor": (
        edit_meta(lambda m: m["layers"]["moe"].update(ep_size=3)),
        "layers['moe']['ep_size'] must be an int >= 1 that divides num_experts_total=4, got 3",
    ),
}


@pytest.mark.parametrize("case", sorted(META_CASES))
def test_malformed_meta_json_raises_a_checkpoint_error_naming_it(tmp_path, case):
    directory = str(tmp_path)
    model = make_model()
    checkpoint.save(model, None, directory, tag="good")
    checkpoint.save(model, None, directory, tag="bad")
    meta_path = os.path.join(directory, "bad", "meta.json")
    change, what = META_CASES[case]
    with open(meta_path) as f:
        edited = change(f.read())
    with open(meta_path, "wb") as f:
        f.write(edited if isinstance(edited, bytes) else edited.encode())

    named = rf"{re.escape(meta_path)}.*{re.escape(what)}"
    with pytest.raises(CheckpointError, match=named):
        checkpoint.read_meta(directory)  # 'latest' names 'bad'
    with pytest.raises(CheckpointError, match=named):
        checkpoint.load(make_model(), None, directory)
    with pytest.raises(CheckpointError, match=named):
        checkpoint.consolidate(directory, "bad")
    # A folder with unreadable metadata is not a complete checkpoint; the next save goes on from the good one.
    assert checkpoint.list_checkpoints(directory) == ["good"]
    assert checkpoint.load(make_model(seed=3), None, directory, tag="good")["tag"] == "good"
    assert checkpoint.save(model, None, directory) == os.path.join(directory, "ckpt-000002")


# meta.json as fastmoe wrote it in format version 1, when the experts were in its own shard files.
VERSION_1_META = {
    "format": "fastmoe-checkpoint",
    "version": 1,
    "tag": "old",
    "sequence": 1,
    "world_size": 1,
    "created_unix": 1700000000.0,
    "torch_version": "2.5.0",
    "has_optimizer": False,
    "layers": {
        "mlp": {
            "fused": True,
            "num_experts_total": 4,
            "ep_size": 1,
            "expert_params": {"htoh4.weight": {"shape": [12, 8], "dtype": "float32"}},
            "shards": ["shard-00000.pt"] * 4,
        }
    },
    "common_keys": {"embed.weight": {"shape": [8, 8], "dtype": "float32"}},
    "files": {"common.pt": 1234, "shard-00000.pt": 5678},
    "sha256": {"common.pt": "0" * 64, "shard-00000.pt": "1" * 64},
    "rank_extra": [],
}


def test_a_version_1_checkpoint_raises_a_checkpoint_error_naming_its_version(tmp_path):
    directory = str(tmp_path)
    os.makedirs(os.path.join(directory, "old"))
    meta_path = os.path.join(directory, "old", "meta.json")
    with open(meta_path, "w") as f:
        json.dump(VERSION_1_META, f)
    with open(os.path.join(directory, "latest"), "w") as f:
        f.write("old\n")

    version = rf"{re.escape(meta_path)} has format version 1; this fastmoe reads 2"
    for call in (
        lambda: checkpoint.read_meta(directory),
        lambda: checkpoint.read_meta(directory, "old"),
        lambda: checkpoint.load(make_model(), None, directory),
        lambda: checkpoint.load(make_model(), None, directory, tag="old"),
        lambda: checkpoint.consolidate(directory),
    ):
        with pytest.raises(CheckpointError, match=version):
            call()
    # It is not a checkpoint of this format: a save beside it leaves it alone, and rotation does not delete it.
    assert checkpoint.list_checkpoints(directory) == []
    model = make_model()
    for _ in range(2):
        checkpoint.save(model, None, directory, keep=1)
    assert checkpoint.list_checkpoints(directory) == [checkpoint.latest(directory)]
    with open(meta_path) as f:
        assert json.load(f) == VERSION_1_META


LATEST_CASES = {
    "parent-path": b"../../etc\n",
    "absolute-path": b"/etc\n",
    "separator": b"good/../good\n",
    "empty": b"",
    "staging-folder": b".partial-good\n",
    "not-utf8": b"\xff\xfe\n",
    "itself": b"latest\n",
}


@pytest.mark.parametrize("case", sorted(LATEST_CASES))
def test_malformed_latest_raises_a_checkpoint_error_naming_it(tmp_path, case):
    directory = str(tmp_path)
    model = make_model()
    checkpoint.save(model, None, directory, tag="good")
    latest_path = os.path.join(directory, "latest")
    with open(latest_path, "wb") as f:
        f.write(LATEST_CASES[case])

    named = rf"{re.escape(latest_path)} .*not a checkpoint tag"
    for call in (
        lambda: checkpoint.latest(directory),
        lambda: checkpoint.read_meta(directory),
        lambda: checkpoint.load(make_model(), None, directory),
        lambda: checkpoint.consolidate(directory),
    ):
        with pytest.raises(CheckpointError, match=named):
            call()
    # An explicit tag does not read 'latest'; a save replaces it.
    assert checkpoint.load(make_model(seed=3), None, directory, tag="good")["tag"] == "good"
    checkpoint.save(model, None, directory, tag="next")
    assert checkpoint.latest(directory) == "next"


@pytest.mark.parametrize("bad", ["../escape", "..", "a/b", "/abs", "a\\b", ""])
def test_a_tag_argument_outside_the_folder_is_rejected_naming_it(tmp_path, bad):
    directory = str(tmp_path)
    model = make_model()
    checkpoint.save(model, None, directory, tag="good")
    message = re.escape(f"got {bad!r}")
    with pytest.raises(ValueError, match=message):
        checkpoint.save(model, None, directory, tag=bad)
    for call in (checkpoint.read_meta, checkpoint.consolidate):
        with pytest.raises(ValueError, match=message):
            call(directory, bad)
    with pytest.raises(ValueError, match=message):
        checkpoint.load(model, None, directory, tag=bad)
    assert sorted(n for n in os.listdir(directory) if not n.startswith(".")) == ["good", "latest"]


# ------------------------------------------------------------------------------------------- a rank that never joins


def save_without_rank_1(rank: int, world_size: int, directory: str) -> str:
    """Rank 1 never calls save (it stays alive, busy elsewhere, for 20 s); rank 0's save must raise within
    FASTMOE_COMM_TIMEOUT (3 s here) instead of waiting for the process group's own timeout (10 minutes here)."""
    if rank == 1:
        time.sleep(20)
        return "skipped"
    model = make_model(seed=3)
    try:
        checkpoint.save(model, None, directory)
    except RuntimeError as error:
        return str(error)
    raise AssertionError("rank 0's save completed without rank 1")


def test_a_save_that_a_rank_skips_raises_within_the_comm_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMOE_COMM_TIMEOUT", "3")
    messages = run_workers(2, save_without_rank_1, str(tmp_path / "ckpt"), timeout=90, pg_timeout=600.0)
    assert messages[1] == "skipped"
    assert "FASTMOE_COMM_TIMEOUT" in messages[0] and "checkpoint exchange" in messages[0], messages[0]
