"""fastmoe-train end to end at tiny sizes: the MoE validation loss falls, --resume continues bit for bit (also
after a save killed midway), the two models match in active parameters, and under torchrun the MoE model trains
expert-parallel, reports the balance of every rank's tokens and resumes with another number of processes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_cases import TINY, make_corpus, subprocess_env, summary

from fastmoe import checkpoint as fmoe_checkpoint
from fastmoe.train import cli
from fastmoe.train.loop import LoopConfig, learning_rate, make_optimizer
from fastmoe.train.model import GPT, parameter_counts


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory)


def test_tiny_demo_both_models_and_the_moe_loss_falls(tmp_path, corpus_file):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "fastmoe.train",
        *TINY,
        "--steps",
        "40",
        "--eval-every",
        "20",
        "--data",
        str(corpus_file),
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert result.returncode == 0, result.stdout + result.stderr
    models = summary(out)
    assert set(models) == {"moe", "dense"}
    moe = models["moe"]
    assert [p["step"] for p in moe["history"]] == [0, 20, 40]
    assert moe["history"][0]["val_loss"] > 5.0  # about ln 256 untrained
    assert moe["history"][-1]["val_loss"] < moe["history"][0]["val_loss"] - 1.5
    assert moe["balance"]["moe/all/max_over_mean"] >= 1.0
    for name in ("moe", "dense"):
        assert "val loss" in result.stdout and name in result.stdout
        assert fmoe_checkpoint.latest(str(out / name / "checkpoint")) is not None
        events = [json.loads(line)["event"] for line in (out / name / "log.jsonl").read_text().splitlines()]
        assert events.count("eval") == 3 and "train" in events
    assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| moe |" in (out / "summary.md").read_text()


def log_events(path: Path) -> list:
    return [(r["event"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]


def assert_same_run(whole: Path, split: Path, names=("moe", "dense")) -> None:
    """The run in ``split`` (interrupted and resumed) is bitwise the one in ``whole``: losses, the validation
    history, every weight of the last checkpoint, and the log's records."""
    a, b = summary(whole), summary(split)
    for name in names:
        assert b[name]["steps"] == a[name]["steps"]
        assert a[name]["final_train_loss"] == b[name]["final_train_loss"]
        assert a[name]["final_val_loss"] == b[name]["final_val_loss"]
        assert [p["val_loss"] for p in a[name]["history"]] == [p["val_loss"] for p in b[name]["history"]]
        assert [p["tokens"] for p in a[name]["history"]] == [p["tokens"] for p in b[name]["history"]]
        state_a = fmoe_checkpoint.consolidate(str(whole / name / "checkpoint"))
        state_b = fmoe_checkpoint.consolidate(str(split / name / "checkpoint"))
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), f"{name}: {key} differs after resume"
        assert log_events(whole / name / "log.jsonl") == log_events(split / name / "log.jsonl")


def test_resume_continues_bitwise(tmp_path, corpus_file):
    """12 steps in one go equal 5 steps, an interruption, and a resume to 12: same losses, same weights."""
    common = [*TINY, "--steps", "12", "--eval-every", "4", "--gate", "gshard", "--data", str(corpus_file)]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli.main([*common, "--out", str(whole)]) == 0
    assert cli.main([*common, "--out", str(split), "--stop-after", "5"]) == 0
    assert summary(split)["moe"]["steps"] == 5
    assert cli.main([*common, "--out", str(split), "--resume"]) == 0
    assert summary(split)["moe"]["steps"] == 12
    assert_same_run(whole, split)


def test_a_save_killed_midway_resumes_from_the_previous_checkpoint(tmp_path, corpus_file):
    """A process killed while writing its step-4 checkpoint (fastmoe.checkpoint's fault point inside DCP's save,
    after the tensor file and before DCP's .metadata) leaves the step-2 checkpoint whole: --resume continues from
    it, bitwise."""
    common = [*TINY, "--model", "moe", "--steps", "6", "--eval-every", "2", "--ckpt-every", "2"]
    common += ["--data", str(corpus_file)]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli.main([*common, "--out", str(whole)]) == 0
    assert cli.main([*common, "--out", str(split), "--stop-after", "2"]) == 0
    command = [sys.executable, "-m", "fastmoe.train", *common, "--out", str(split), "--resume"]
    env = subprocess_env() | {fmoe_checkpoint.FAULT_ENV: "during_dcp"}
    killed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert killed.returncode == fmoe_checkpoint.FAULT_EXIT_CODE, killed.stdout + killed.stderr
    assert log_events(split / "moe" / "log.jsonl")[-1] == ("eval", 4)  # it had got past the last checkpoint
    folder = split / "moe" / "checkpoint"
    assert [p for p in folder.iterdir() if p.name.startswith(".partial-")], "the kill left no staging folder"
    assert cli.main([*common, "--out", str(split), "--resume"]) == 0
    assert_same_run(whole, split, names=("moe",))


def test_bf16_autocast_trains(tmp_path, corpus_file):
    argv = [*TINY, "--model", "moe", "--steps", "6", "--eval-every", "0", "--precision", "bf16"]
    assert cli.main([*argv, "--data", str(corpus_file), "--out", str(tmp_path)]) == 0
    history = summary(tmp_path)["moe"]["history"]
    assert [p["step"] for p in history] == [0, 6]
    assert history[-1]["val_loss"] < history[0]["val_loss"]


def test_dense_baseline_matches_active_parameters():
    args = cli.build_parser().parse_args(
        ["--d-model", "64", "--experts", "8", "--top-k", "2", "--layers", "3", "--moe-every", "2"]
    )
    moe, dense = GPT(cli.model_config(args, moe=True)), GPT(cli.model_config(args, moe=False))
    moe_total, moe_active = parameter_counts(moe)
    dense_total, dense_active = parameter_counts(dense)
    assert dense_total == dense_active
    assert [b.is_moe for b in moe.blocks] == [False, True, False]
    layer = moe.moe_layers()[0]
    expert_params = sum(p.numel() for p in layer.experts.parameters())
    gate_params = sum(p.numel() for p in layer.gate.parameters())
    # One expert (top-2 of 8 at width 128) is a quarter of the dense FFN (256) in weights, so the active count
    # is the dense count plus the gate and the extra expert biases (k copies of the output bias).
    assert moe_total == moe_active + expert_params * 6 // 8
    assert moe_active == dense_active + gate_params + (2 - 1) * 64
    # A forward of each gives logits over the 256 bytes.
    tokens = torch.randint(0, 256, (2, 16))
    assert moe(tokens).shape == dense(tokens).shape == (2, 16, 256)


def test_no_ffn_bias_drops_the_biases_of_both_models_ffns():
    args = cli.build_parser().parse_args(["--d-model", "64", "--experts", "8", "--layers", "2", "--no-ffn-bias"])
    moe, dense = GPT(cli.model_config(args, moe=True)), GPT(cli.model_config(args, moe=False))
    for model in (moe, dense):
        ffn_names = [n for n, _ in model.named_parameters() if ".ffn." in n and ".gate." not in n]
        assert ffn_names and not [n for n in ffn_names if n.endswith("bias")], ffn_names
    # Without the experts' output biases the active count is exactly dense's plus the gates.
    gates = sum(p.numel() for layer in moe.moe_layers() for p in layer.gate.parameters())
    assert parameter_counts(moe)[1] == parameter_counts(dense)[1] + gates
    with_bias = cli.model_config(cli.build_parser().parse_args([]), moe=True)
    assert with_bias.ffn_bias and GPT(with_bias).moe_layers()[0].experts.htoh4.bias is not None


def test_naive_gate_balance_loss_is_on_by_default_and_reaches_the_objective():
    parser = cli.build_parser()
    config = cli.model_config(parser.parse_args(["--d-model", "32", "--heads", "2", "--layers", "2"]), moe=True)
    assert config.balance_coef == cli.DEFAULT_BALANCE_COEF > 0
    model = GPT(config)
    assert all(layer.gate.balance_coef == config.balance_coef for layer in model.moe_layers())
    model(torch.randint(0, 256, (4, 16)))
    # Two layers, each coef * E * sum_e f_e P_e >= coef (the minimum is at an even load).
    assert model.balance_loss().item() >= 2 * config.balance_coef * (1 - 1e-6)
    off = cli.model_config(parser.parse_args(["--balance-coef", "0"]), moe=True)
    assert off.balance_coef == 0 and GPT(off).moe_layers()[0].gate.balance_coef == 0
    gshard = cli.model_config(parser.parse_args(["--gate", "gshard"]), moe=True)
    assert gshard.balance_coef == 0  # the GShard gate keeps its own loss


def test_optimizer_is_fused_on_the_cpu():
    model = GPT(cli.model_config(cli.build_parser().parse_args(["--d-model", "32", "--heads", "2"]), moe=True))
    optimizer = make_optimizer(model, LoopConfig())
    assert optimizer.defaults["fused"] is True
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    foreach = make_optimizer(model, LoopConfig(), fused=False)  # what profile_train_step --adamw foreach times
    assert foreach.defaults["foreach"] is True and not foreach.defaults["fused"]
    assert [g["weight_decay"] for g in foreach.param_groups] == [0.1, 0.0]


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = LoopConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(0.1)
    assert learning_rate(cfg, 9, 0.0) == pytest.approx(1.0)
    assert learning_rate(cfg, 55, 0.0) == pytest.approx(0.55)
    assert learning_rate(cfg, 100, 0.0) == pytest.approx(0.1)
    timed = LoopConfig(time_budget=60.0, lr=1.0, warmup=0, min_lr_ratio=0.0)
    assert learning_rate(timed, 5, 30.0) == pytest.approx(0.5)


def test_help_documents_every_flag(capsys):
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    flags = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    assert len(flags) > 30
    for flag in flags:
        assert flag in text
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--experts", "0"], "--experts must be >= 1, got 0"),
        (["--experts", "8", "--top-k", "9"], "--top-k must be at most --experts=8, got 9"),
        (["--d-model", "30", "--heads", "4"], "--d-model must be divisible by --heads=4, got 30"),
        (["--time-budget", "0"], "--time-budget must be > 0 seconds, got 0.0"),
        (["--val-fraction", "1.5"], "--val-fraction must be in (0, 1), got 1.5"),
        (["--balance-coef", "-1"], "--balance-coef must be >= 0, got -1.0"),
        (["--gate", "gshard", "--balance-coef", "0.01"], "--balance-coef applies to --gate naive"),
    ],
)
def test_bad_flags_are_named(capsys, argv, message):
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert message in capsys.readouterr().err


def test_missing_data_is_named(tmp_path):
    with pytest.raises(SystemExit, match=f"corpus not found: {tmp_path / 'none'} does not exist"):
        cli.main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "out")])


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_torchrun_trains_expert_parallel_then_resumes_with_one_process(tmp_path, corpus_file, capsys):
    """Two ranks under torchrun on gloo: the MoE model expert-parallel (2 of its 4 experts per rank) under
    DistributedGroupedDataParallel, the dense one under torch DDP, taking turns by training time with a time
    budget. Every rank must make the same choices (whose turn, the learning rate, when to stop), or the ranks
    call different collectives and hang; and the clipping must scale every rank alike (--grad-clip 0.01 clips
    every step), or the replicated parameters drift apart: the run checks at the end that both ranks hold
    bitwise-equal copies of everything but the experts. Each rank draws its own batches, and the summary's
    load-balance statistics count the tokens of both ranks.

    Then one process (no torchrun) resumes the run with a longer time budget: it continues from the step the two
    ranks reached, with all four experts, and appends to each log after the resumed step."""
    out = tmp_path / "out"
    env = subprocess_env() | {"OMP_NUM_THREADS": "1", "FASTMOE_COMM_TIMEOUT": "60"}
    flags = [*TINY, "--device", "cpu", "--model", "both", "--grad-clip", "0.01", "--eval-every", "20"]
    flags += ["--data", str(corpus_file), "--out", str(out)]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fastmoe.train",
        *flags, "--time-budget", "4",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    tokens_per_rank_step = 8 * 32  # --batch x --seq-len
    results = summary(out)
    assert set(results) == {"moe", "dense"}
    for name, result in results.items():
        assert result["steps"] > 0 and 4.0 <= result["train_time_s"] < 8.0, result
        assert result["replicas_equal"] is True
        assert result["history"][-1]["tokens"] == result["steps"] * 2 * tokens_per_rank_step
        folder = out / name / "checkpoint"
        meta = fmoe_checkpoint.read_meta(str(folder))
        assert meta["world_size"] == 2
        samplers = [torch.load(folder / meta["tag"] / f"rank-0000{r}.pt")["sampler"]["generator"] for r in range(2)]
        assert not torch.equal(samplers[0], samplers[1]), "both ranks drew the same batches"
        state = fmoe_checkpoint.consolidate(str(folder))
        experts = [key for key in state if ".experts." in key]
        assert bool(experts) == (name == "moe")
        for key in experts:  # [4, ...]: global experts 0 and 1 lived on rank 0, 2 and 3 on rank 1
            assert not torch.equal(state[key][:2], state[key][2:]), f"{name}: {key} is the same on both ranks"
    balance = results["moe"]["balance"]
    for layer in ("layer0", "layer1"):  # the last forward (a validation batch) of both ranks
        assert balance[f"moe/{layer}/num_tokens"] == 2 * tokens_per_rank_step
    logs = {name: (out / name / "log.jsonl").read_text() for name in results}

    capsys.readouterr()
    assert cli.main([*flags, "--time-budget", "6", "--resume"]) == 0
    printed = capsys.readouterr().out
    resumed = summary(out)
    for name, before in results.items():
        after = resumed[name]
        assert f"{name}: resumed from {out / name / 'checkpoint'}" in printed
        assert f"at step {before['steps']} " in printed and "saved by 2 process(es), this run has 1" in printed
        assert after["steps"] > before["steps"] and after["train_time_s"] >= 6.0
        assert after["history"][: len(before["history"])] == before["history"]
        more_tokens = (after["steps"] - before["steps"]) * tokens_per_rank_step
        assert after["history"][-1]["tokens"] == before["history"][-1]["tokens"] + more_tokens
        log = (out / name / "log.jsonl").read_text()
        assert log.startswith(logs[name])
        appended = [json.loads(line) for line in log[len(logs[name]) :].splitlines()]
        assert appended and all(record["step"] > before["steps"] for record in appended)
        assert after["replicas_equal"] is None  # one process: nothing to compare
    assert resumed["moe"]["balance"]["moe/layer0/num_tokens"] == tokens_per_rank_step


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_the_replica_check_names_a_parameter_that_differs_between_ranks():
    """The end-of-run check that the test above relies on finds a replicated parameter one rank changed, on every
    rank, and nothing when the ranks agree."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
    from dist_harness import run_workers
    from train_cases import replica_check_body

    assert run_workers(2, replica_check_body, False) == [[], []]
    assert run_workers(2, replica_check_body, True) == [["norm.weight"], ["norm.weight"]]
