"""fastmoe-train --resume: nothing to resume, other flags, and damaged checkpoints of both formats (the
fastmoe.checkpoint folder and the earlier single file) are errors that name the folder or file and what is wrong
with it (never a traceback from torch's internals); the log keeps what the checkpoint covers; and checkpoints of the
earlier single-file format still resume."""

import json

import pytest
import torch
from train_cases import TINY, make_corpus, summary, write_legacy_checkpoint

from fastmoe import checkpoint as fmoe_checkpoint
from fastmoe.train import checkpointing, cli


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return make_corpus(tmp_path_factory)


def moe_flags(corpus_file, *more) -> list:
    return [*TINY, "--model", "moe", "--steps", "2", "--eval-every", "0", "--data", str(corpus_file), *more]


def resume_error(argv) -> str:
    """Runs ``fastmoe-train argv`` in-process and returns its error message, after checking it stopped with one
    (SystemExit with a message: exit code 1, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("fastmoe-train: "), message
    return message


def test_resume_into_an_empty_folder_is_an_error_naming_it(tmp_path, corpus_file):
    out = tmp_path / "empty"
    message = resume_error([*moe_flags(corpus_file), "--out", str(out), "--resume"])
    assert f"{out} holds no checkpoint to resume" in message
    assert str(out / "moe" / "checkpoint") in message and "leave out --resume" in message
    assert not (out / "moe" / "log.jsonl").exists()


def test_resume_refuses_other_flags_naming_them(tmp_path, corpus_file):
    assert cli.main([*moe_flags(corpus_file), "--out", str(tmp_path)]) == 0
    log = (tmp_path / "moe" / "log.jsonl").read_text()
    argv = [*moe_flags(corpus_file), "--experts", "8", "--out", str(tmp_path), "--resume"]
    message = resume_error(argv)
    assert str(tmp_path / "moe" / "config.json") in message and "num_experts: checkpoint 4 vs now 8" in message
    assert (tmp_path / "moe" / "log.jsonl").read_text() == log  # a refused resume leaves the run as it was


@pytest.mark.parametrize("damage", ["empty", "truncated", "damaged zip directory", "torn RNG state"])
def test_a_damaged_single_file_checkpoint_is_named(tmp_path, corpus_file, damage):
    """Checkpoints of the earlier format are one torch.save'd file: each kind of damage must give an error that
    names it, not EOFError, a zip reader's error or 'Invalid mt19937 state' from torch."""
    path = write_legacy_checkpoint(tmp_path / "moe", moe_flags(corpus_file), corpus_file)
    blob = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
        expected = f"{path} is empty (0 bytes)"
    elif damage == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
        expected = f"{path} ({len(blob) // 2:,} bytes) cannot be read: it is truncated or corrupted"
    elif damage == "damaged zip directory":  # torch.save writes a zip file; its directory is at the end
        start = len(blob) - 120
        path.write_bytes(blob[:start] + bytes(b ^ 0xFF for b in blob[start : start + 64]) + blob[start + 64 :])
        expected = f"{path} ({len(blob):,} bytes) cannot be read: it is truncated or corrupted"
    else:
        payload = torch.load(path, weights_only=False)
        payload["rng"]["torch"] = torch.zeros_like(payload["rng"]["torch"])
        torch.save(payload, path)
        expected = f"{path} cannot be restored: it is corrupted"
    message = resume_error([*moe_flags(corpus_file), "--out", str(tmp_path), "--resume"])
    assert expected in message


@pytest.mark.parametrize(
    "damage", ["truncated state.pt", "empty rank file", "flipped byte in DCP's data", "damaged latest", "no meta.json"]
)
def test_a_damaged_checkpoint_folder_is_named(tmp_path, corpus_file, damage):
    """Each file of a fastmoe.checkpoint folder (the state with ``extra``, the rank's RNG and sampler state, the
    tensors DCP wrote, the ``latest`` pointer, meta.json) damaged in its own way: the message names the file (or
    the folder, when nothing complete is left) and what is wrong with it."""
    assert cli.main([*moe_flags(corpus_file), "--out", str(tmp_path), "--stop-after", "1"]) == 0
    folder = tmp_path / "moe" / "checkpoint"
    tag_dir = folder / fmoe_checkpoint.latest(str(folder))
    if damage == "truncated state.pt":
        victim = tag_dir / "state.pt"
        size = victim.stat().st_size
        victim.write_bytes(victim.read_bytes()[:100])
        expected = f"checkpoint file {victim} has 100 bytes but meta.json recorded {size}: it was truncated"
    elif damage == "empty rank file":
        victim = tag_dir / "rank-00000.pt"
        victim.write_bytes(b"")
        expected = f"checkpoint file {victim} has 0 bytes but meta.json recorded"
    elif damage == "flipped byte in DCP's data":
        victim = tag_dir / "__0_0.distcp"
        blob = bytearray(victim.read_bytes())
        blob[len(blob) // 3] ^= 0x01
        victim.write_bytes(bytes(blob))
        expected = f"checkpoint file {victim} is corrupt: its sha256 is"
    elif damage == "damaged latest":
        victim = folder / "latest"
        victim.write_bytes(b"\xff\xfe../x")
        expected = f"cannot resume from {folder}: {victim} holds"
    else:
        victim = folder
        (tag_dir / "meta.json").unlink()
        (folder / "latest").unlink()
        expected = f"holds no checkpoint to resume (none in {folder})"
    message = resume_error([*moe_flags(corpus_file), "--out", str(tmp_path), "--resume"])
    assert expected in message, message


def test_resume_reads_a_single_file_checkpoint_older_than_the_balance_and_bias_flags(tmp_path, corpus_file):
    """A checkpoint written before balance_coef and ffn_bias existed had no balance loss and FFN biases: it
    resumes with --balance-coef 0 and is refused with the balance loss on. The next save writes the folder and
    removes the single file."""
    flags = moe_flags(corpus_file, "--balance-coef", "0")
    path = write_legacy_checkpoint(tmp_path / "moe", flags, corpus_file)
    payload = torch.load(path, weights_only=False)
    for field in ("balance_coef", "ffn_bias"):
        del payload["config"][field]
    torch.save(payload, path)
    message = resume_error([*moe_flags(corpus_file), "--out", str(tmp_path), "--resume"])
    assert f"{path} was written by a different configuration" in message
    assert "balance_coef: checkpoint 0.0 vs now 0.01" in message
    assert cli.main([*flags, "--out", str(tmp_path), "--resume"]) == 0
    result = summary(tmp_path)["moe"]
    assert result["steps"] == 2 and [p["step"] for p in result["history"]] == [0, 2]
    assert result["history"][0]["val_loss"] == 5.5  # the history came from the file
    assert not path.exists() and fmoe_checkpoint.latest(str(tmp_path / "moe" / "checkpoint")) is not None


def test_a_single_file_checkpoint_of_another_process_count_is_refused(tmp_path, corpus_file):
    path = write_legacy_checkpoint(tmp_path / "moe", moe_flags(corpus_file), corpus_file)
    path.rename(tmp_path / "moe" / "checkpoint.rank0.pt")
    (tmp_path / "moe" / "checkpoint.rank1.pt").write_bytes(b"")
    message = resume_error([*moe_flags(corpus_file), "--out", str(tmp_path), "--resume"])
    assert f"{tmp_path / 'moe'} holds a checkpoint of an earlier version written by 2 processes" in message
    assert "this run has 1" in message


def test_single_file_checkpoints_of_several_processes_are_refused_under_fsdp2(tmp_path, corpus_file):
    """The per-rank files of an earlier version hold each rank's plain tensors, which FSDP2's shards are not: a
    torchrun job with --parallel fsdp2 is told to resume them with --parallel ddp (checked before any process group
    collective, so called here as rank 0 of two)."""
    run_dir = tmp_path / "moe"
    path = write_legacy_checkpoint(run_dir, moe_flags(corpus_file), corpus_file)
    path.rename(run_dir / "checkpoint.rank0.pt")
    (run_dir / "checkpoint.rank1.pt").write_bytes(b"")
    with pytest.raises(checkpointing.ResumeError) as error:
        checkpointing.load(
            run_dir, model=None, optimizer=None, sampler=None, config={}, rank=0, world_size=2, parallel="fsdp2"
        )
    message = str(error.value)
    assert f"{run_dir} holds a checkpoint of an earlier version (checkpoint.rank0.pt, checkpoint.rank1.pt)" in message
    assert "resume it with --parallel ddp and the number of processes that wrote it" in message


def test_resume_drops_log_records_past_the_checkpoint(tmp_path, corpus_file):
    """Records a run wrote after its last checkpoint (it was killed later) are not kept: the resumed run writes
    those steps again, so the log reads as one run."""
    argv = [*moe_flags(corpus_file), "--steps", "4", "--eval-every", "2", "--log-every", "1", "--out", str(tmp_path)]
    assert cli.main([*argv, "--stop-after", "2"]) == 0
    log = tmp_path / "moe" / "log.jsonl"
    with open(log, "a") as handle:
        handle.write(json.dumps({"event": "train", "step": 3, "loss": 9.0}) + "\n")
        handle.write(json.dumps({"event": "eval", "step": 4, "val_loss": 9.0}) + "\n")
        handle.write('{"event": "tra')  # torn by the kill
    assert cli.main([*argv, "--resume"]) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [(r["event"], r["step"]) for r in records]
    assert steps == [
        ("eval", 0),
        ("train", 1),
        ("train", 2),
        ("eval", 2),
        ("train", 3),
        ("train", 4),
        ("eval", 4),
    ]
    assert all(r.get("loss") != 9.0 and r.get("val_loss") != 9.0 for r in records)
