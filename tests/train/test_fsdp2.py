"""fastmoe-train --parallel fsdp2: PyTorch's stack (a DeviceMesh with DTensor experts, FSDP2), with the same
fastmoe.checkpoint folders as every other mode. Two gloo ranks under torchrun train both models and save; the
checkpoint holds the trained model (read back into the one-process model, it gives the validation loss the ranks
measured); one process resumes it, resharded, and the run continues its step, token and loss history; two processes
resume that one's checkpoint, resharded into their DTensors. In one process a resumed run is bitwise the
uninterrupted one. A checkpoint resumes with the other --parallel; a damaged checkpoint file, the dcp/ folder of an
earlier version and bad flag combinations are errors that name the file, the folder, the flag and the value."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_cases import TINY, make_corpus, subprocess_env, summary

from fastmoe import checkpoint as fmoe_checkpoint
from fastmoe.train import checkpointing, cli
from fastmoe.train.data import load_corpus, validation_windows
from fastmoe.train.loop import Distributed, evaluate
from fastmoe.train.model import GPT, parameter_counts


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory)


def flags(corpus_file, out, *more) -> list:
    return [*TINY, "--device", "cpu", "--parallel", "fsdp2", "--data", str(corpus_file), "--out", str(out), *more]


def checkpoint_folder(run_dir: Path) -> Path:
    """The newest checkpoint of ``run_dir`` (``<run>/checkpoint/<tag>``)."""
    folder = run_dir / checkpointing.CHECKPOINT_DIR
    return folder / fmoe_checkpoint.latest(str(folder))


def read_model(run_dir: Path, argv: list) -> tuple[GPT, dict]:
    """The one-process model of ``argv`` holding the weights of the newest checkpoint in ``run_dir``, read in this
    process (no process group), and what ``fastmoe.checkpoint.load`` returned (``extra``, ``meta``)."""
    args = cli.build_parser().parse_args(argv)
    model = GPT(cli.model_config(args, moe=run_dir.name == "moe"))
    info = fmoe_checkpoint.load(model, None, str(run_dir / checkpointing.CHECKPOINT_DIR))
    return model, info


def torchrun(nproc: int, argv: list, cwd: Path) -> list[str]:
    """``python -m fastmoe.train argv`` in ``nproc`` processes started as ``torchrun --nproc-per-node nproc``
    starts them (its environment variables; without its launcher, which would import torch once more). Returns
    each process's output; a process that fails or runs past 240 s fails the test, the others are stopped."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = subprocess_env() | {"OMP_NUM_THREADS": "1", "FASTMOE_COMM_TIMEOUT": "60", "MASTER_ADDR": "127.0.0.1"}
    env |= {"MASTER_PORT": str(port), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fastmoe.train", *argv],
            cwd=cwd,
            env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(nproc)
    ]
    outputs = [""] * nproc
    try:
        for rank, proc in enumerate(procs):
            outputs[rank] = proc.communicate(timeout=240)[0]
            assert proc.returncode == 0, f"rank {rank} failed:\n{outputs[rank][-3000:]}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_torchrun_fsdp2_then_one_process_then_two_resume_resharded(tmp_path, corpus_file, capsys):
    out = tmp_path / "out"
    argv = flags(corpus_file, out, "--model", "both", "--eval-every", "2", "--ckpt-every", "2", "--log-every", "1")
    outputs = torchrun(2, [*argv, "--steps", "4"], tmp_path)
    assert "--parallel fsdp2: FSDP2 over a (dp=1, ep=2) DeviceMesh" in outputs[0]
    tokens_per_rank_step = 8 * 32  # --batch x --seq-len
    before = summary(out)
    corpus = load_corpus(corpus_file)
    windows = validation_windows(corpus.val, 32, 2048)
    for name, result in before.items():
        assert result["steps"] == 4 and [p["step"] for p in result["history"]] == [0, 2, 4]
        assert result["replicas_equal"] is None  # FSDP2 shards every parameter: no replicas to compare
        assert result["history"][-1]["tokens"] == 4 * 2 * tokens_per_rank_step
        # the checkpoint of step 4 (every rank's shards) read into the one-process model: the validation loss the
        # two ranks measured at step 4 (fp32; one process sums in other orders than the two ranks)
        model, info = read_model(out / name, argv)
        assert info["extra"]["step"] == 4 and info["extra"]["world_size"] == 2 == info["meta"]["world_size"], info
        files = set(info["meta"]["files"])
        assert {f"rank-0000{r}.pt" for r in range(2)} | {".metadata", "__0_0.distcp", "__1_0.distcp"} <= files
        loss = evaluate(model, windows, 8, torch.device("cpu"), "fp32", Distributed())
        assert loss == pytest.approx(result["history"][-1]["val_loss"], rel=1e-5, abs=1e-5), name
        assert parameter_counts(model) == (result["params_total"], result["params_active"]), name
        if name == "moe":  # the global experts 0, 1 (rank 0) and 2, 3 (rank 1) all trained, each its own
            weight = model.blocks[0].ffn.experts.htoh4.weight
            assert not torch.equal(weight[:2], weight[2:])
    logs = {name: (out / name / "log.jsonl").read_text() for name in before}
    saved = {name: checkpoint_folder(out / name) for name in before}

    # one process resumes both models at step 4 and trains to step 8
    capsys.readouterr()
    assert cli.main([*argv, "--steps", "8", "--resume"]) == 0
    printed = capsys.readouterr().out
    after = summary(out)
    for name, result in before.items():
        assert f"{name}: resumed from {saved[name]} at step 4 " in printed
        assert "saved by 2 process(es), this run has 1: the model and optimizer state are resharded by DCP" in printed
        resumed = after[name]
        assert resumed["steps"] == 8 and [p["step"] for p in resumed["history"]] == [0, 2, 4, 6, 8]
        assert resumed["history"][:3] == result["history"]
        assert resumed["history"][-1]["tokens"] == result["history"][-1]["tokens"] + 4 * tokens_per_rank_step
        # training went on from the trained model: every later evaluation below the untrained one
        assert all(p["val_loss"] < result["history"][0]["val_loss"] - 0.3 for p in resumed["history"][3:]), resumed
        log = (out / name / "log.jsonl").read_text()
        assert log.startswith(logs[name])
        appended = [json.loads(line) for line in log[len(logs[name]) :].splitlines()]
        assert [(r["event"], r["step"]) for r in appended] == [
            ("train", 5), ("train", 6), ("eval", 6), ("train", 7), ("train", 8), ("eval", 8),
        ]  # fmt: skip
        # the new checkpoint replaced the old one and is written by one process
        folder = out / name / checkpointing.CHECKPOINT_DIR
        assert fmoe_checkpoint.list_checkpoints(str(folder)) == [checkpoint_folder(out / name).name]
        assert checkpoint_folder(out / name) != saved[name]
        assert read_model(out / name, argv)[1]["extra"]["world_size"] == 1

    # two processes resume the MoE model's one-process checkpoint, its experts resharded into their DTensors
    moe_argv = [*argv[: argv.index("--model")], *argv[argv.index("--model") + 2 :], "--model", "moe"]
    one_process = checkpoint_folder(out / "moe")
    outputs = torchrun(2, [*moe_argv, "--steps", "10", "--resume"], tmp_path)
    assert f"moe: resumed from {one_process} at step 8 " in outputs[0]
    assert "saved by 1 process(es), this run has 2: the model and optimizer state are resharded" in outputs[0]
    again = summary(out)["moe"]
    assert again["steps"] == 10 and [p["step"] for p in again["history"]] == [0, 2, 4, 6, 8, 10]
    assert again["history"][:5] == after["moe"]["history"]
    assert again["history"][-1]["tokens"] == after["moe"]["history"][-1]["tokens"] + 2 * 2 * tokens_per_rank_step
    assert again["history"][-1]["val_loss"] < before["moe"]["history"][0]["val_loss"] - 0.3
    model, info = read_model(out / "moe", moe_argv)
    assert info["extra"]["step"] == 10 and info["meta"]["world_size"] == 2


def test_one_process_fsdp2_resume_is_bitwise(tmp_path, corpus_file):
    """In one process --parallel fsdp2 trains the plain model with DCP checkpoints: 6 steps in one go equal 3
    steps, an interruption and a resume (the RNG and sampler state of the rank file, the AdamW state through DCP)."""
    common = ["--model", "moe", "--steps", "6", "--eval-every", "3", "--gate", "gshard"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli.main(flags(corpus_file, whole, *common)) == 0
    assert cli.main(flags(corpus_file, split, *common, "--stop-after", "3")) == 0
    assert cli.main(flags(corpus_file, split, *common, "--resume")) == 0
    a, b = summary(whole)["moe"], summary(split)["moe"]
    assert b["steps"] == 6 and a["final_train_loss"] == b["final_train_loss"]
    for key in ("step", "tokens", "val_loss"):  # not "time": the training time is measured
        assert [p[key] for p in a["history"]] == [p[key] for p in b["history"]], key
    model_a, _ = read_model(whole / "moe", flags(corpus_file, whole, *common))
    model_b, _ = read_model(split / "moe", flags(corpus_file, whole, *common))
    for (key, value), other in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(value, other), f"{key} differs after the resume"


def resume_error(argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("fastmoe-train: --resume: "), message
    return message


def test_a_checkpoint_resumes_with_the_other_parallel_and_a_damaged_file_is_named(tmp_path, corpus_file):
    """Every --parallel writes the same fastmoe.checkpoint folder: a checkpoint of either resumes with the other
    (here in one process). A flipped or a cut byte in DCP's data file is named by its checksum before it is read."""
    moe = ["--model", "moe", "--steps", "1", "--eval-every", "0"]
    fsdp2_out, ddp_out = tmp_path / "fsdp2", tmp_path / "ddp"
    assert cli.main(flags(corpus_file, fsdp2_out, *moe)) == 0
    ddp_argv = [*TINY, "--device", "cpu", "--data", str(corpus_file), "--out", str(ddp_out), *moe]
    assert cli.main(ddp_argv) == 0
    for out, other in ((ddp_out, "fsdp2"), (fsdp2_out, "ddp")):
        saved = checkpoint_folder(out / "moe")
        assert cli.main([*flags(corpus_file, out, *moe), "--parallel", other, "--steps", "2", "--resume"]) == 0
        result = summary(out)["moe"]
        assert result["steps"] == 2 and [p["step"] for p in result["history"]] == [0, 1, 2], (other, result)
        assert checkpoint_folder(out / "moe") != saved
    # one flipped byte in DCP's data file: the checksum names it before DCP reads it
    data = checkpoint_folder(fsdp2_out / "moe") / "__0_0.distcp"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    message = resume_error([*flags(corpus_file, fsdp2_out, *moe), "--resume"])
    assert f"checkpoint file {data} is corrupt: its sha256 is" in message and "meta.json recorded" in message
    data.write_bytes(bytes(blob[:100]))
    message = resume_error([*flags(corpus_file, fsdp2_out, *moe), "--resume"])
    assert f"checkpoint file {data} has 100 bytes but meta.json recorded {len(blob)}" in message


def test_the_dcp_folder_of_an_earlier_version_is_named_and_a_new_run_removes_it(tmp_path, corpus_file):
    """Before every --parallel saved through fastmoe.checkpoint, --parallel fsdp2 kept DCP folders in <run>/dcp/
    (step-<step>/ with a train.json, and a 'latest' file). A resume names that folder and says it is not read;
    a new run in the same --out removes it."""
    moe = ["--model", "moe", "--steps", "1", "--eval-every", "0"]
    old = tmp_path / "moe" / "dcp"
    (old / "step-00000004").mkdir(parents=True)
    (old / "step-00000004" / "train.json").write_text(json.dumps({"format": "fastmoe-train", "step": 4}))
    (old / "latest").write_text("step-00000004\n")
    message = resume_error([*flags(corpus_file, tmp_path, *moe), "--resume"])
    assert f"{old} holds checkpoints written by an earlier version of fastmoe-train" in message, message
    assert "which this version does not read" in message
    assert f"start a new run without --resume (which removes {old})" in message
    assert not (tmp_path / "moe" / checkpointing.CHECKPOINT_DIR).exists()  # the refused resume wrote nothing
    assert cli.main(flags(corpus_file, tmp_path, *moe)) == 0
    assert not old.exists() and summary(tmp_path)["moe"]["steps"] == 1
    assert fmoe_checkpoint.latest(str(tmp_path / "moe" / checkpointing.CHECKPOINT_DIR)) is not None


FSDP2 = ["--parallel", "fsdp2"]


@pytest.mark.parametrize(
    "argv,world_size,message",
    [
        (["--ep-size", "2"], 2, "--ep-size applies to --parallel fsdp2, got --ep-size 2 with --parallel ddp"),
        ([*FSDP2, "--ep-size", "0"], 2, "--ep-size must be >= 1, got 0"),
        ([*FSDP2, "--ep-size", "2"], 1, "--ep-size must divide the 1 process(es) of this job, got 2"),
        ([*FSDP2, "--ep-size", "3"], 4, "--ep-size must divide the 4 process(es) of this job, got 3"),
        ([*FSDP2, "--ep-size", "4", "--experts", "6"], 4, "--experts must be divisible by --ep-size 4, got 6"),
        ([*FSDP2, "--experts", "6"], 4, "--experts must be divisible by the 4 processes of this torchrun job, got 6"),
        (["--parallel", "fsdp"], 1, "argument --parallel: invalid choice: 'fsdp'"),
    ],
    ids=["ep-size-with-ddp", "ep-size-0", "ep-size-over-world", "ep-size-not-dividing", "experts-by-ep",
         "experts-by-world", "unknown-parallel"],
)  # fmt: skip
def test_bad_parallel_flags_are_named(capsys, monkeypatch, argv, world_size, message):
    """Checked before anything starts (WORLD_SIZE is what torchrun sets for each process)."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
