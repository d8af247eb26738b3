"""fastmoe-train end to end at tiny sizes: the MoE validation loss falls, --resume continues bit for bit, the
two models match in active parameters, checkpoints are atomic, and the command line documents and checks its
flags."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmoe.train import checkpointing, cli
from fastmoe.train.data import DEFAULT_CORPUS
from fastmoe.train.loop import LoopConfig, learning_rate, make_optimizer
from fastmoe.train.model import GPT, parameter_counts

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--d-model",
    "32",
    "--layers",
    "2",
    "--heads",
    "2",
    "--seq-len",
    "32",
    "--batch",
    "8",
    "--experts",
    "4",
    "--top-k",
    "2",
    "--eval-tokens",
    "2048",
    "--warmup",
    "5",
    "--lr",
    "1e-2",
    "--no-progress",
]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    """The default corpus when it is installed, else a generated English-like text (so the test runs anywhere)."""
    if DEFAULT_CORPUS.exists():
        return DEFAULT_CORPUS
    words = "the of and to in is that it for as with was on be by this are from or an at which not have".split()
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(words), (60_000,), generator=gen).tolist()
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(" ".join(words[i] for i in picks))
    return path


def summary(out: Path) -> dict:
    return {m["name"]: m for m in json.loads((out / "summary.json").read_text())["models"]}


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
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
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
        assert (out / name / "checkpoint.pt").is_file()
        events = [json.loads(line)["event"] for line in (out / name / "log.jsonl").read_text().splitlines()]
        assert events.count("eval") == 3 and "train" in events
    assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| moe |" in (out / "summary.md").read_text()


def test_resume_continues_bitwise(tmp_path, corpus_file):
    """12 steps in one go equal 5 steps, an interruption, and a resume to 12: same losses, same weights."""
    common = [*TINY, "--steps", "12", "--eval-every", "4", "--gate", "gshard", "--data", str(corpus_file)]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli.main([*common, "--out", str(whole)]) == 0
    assert cli.main([*common, "--out", str(split), "--stop-after", "5"]) == 0
    assert summary(split)["moe"]["steps"] == 5
    assert cli.main([*common, "--out", str(split), "--resume"]) == 0
    a, b = summary(whole), summary(split)
    for name in ("moe", "dense"):
        assert b[name]["steps"] == 12
        assert a[name]["final_train_loss"] == b[name]["final_train_loss"]
        assert a[name]["final_val_loss"] == b[name]["final_val_loss"]
        assert [p["val_loss"] for p in a[name]["history"]] == [p["val_loss"] for p in b[name]["history"]]
        state_a = torch.load(whole / name / "checkpoint.pt", weights_only=False)["model"]
        state_b = torch.load(split / name / "checkpoint.pt", weights_only=False)["model"]
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), f"{name}: {key} differs after resume"


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


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    sampler = type("S", (), {"state_dict": lambda self: {"generator": torch.Generator().get_state()}})()
    path = tmp_path / "checkpoint.pt"
    kwargs = dict(model=model, optimizer=optimizer, sampler=sampler, train_time=1.0, history=[], config={"a": 1})
    checkpointing.save(path, step=1, **kwargs)
    before = path.read_bytes()

    def failing_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        checkpointing.save(path, step=2, **kwargs)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_resume_refuses_other_flags(tmp_path, corpus_file):
    common = [*TINY, "--model", "moe", "--steps", "2", "--eval-every", "0", "--data", str(corpus_file)]
    assert cli.main([*common, "--out", str(tmp_path)]) == 0
    with pytest.raises(RuntimeError, match="num_experts: checkpoint 4 vs now 8"):
        cli.main([*common[:-2], "--experts", "8", "--data", str(corpus_file), "--out", str(tmp_path), "--resume"])


def test_resume_reads_a_checkpoint_older_than_the_balance_and_bias_flags(tmp_path, corpus_file):
    """A checkpoint written before balance_coef and ffn_bias existed had no balance loss and FFN biases: it
    resumes with --balance-coef 0 and is refused with the balance loss on."""
    common = [*TINY, "--model", "moe", "--steps", "2", "--eval-every", "0", "--data", str(corpus_file)]
    assert cli.main([*common, "--balance-coef", "0", "--out", str(tmp_path), "--stop-after", "1"]) == 0
    path = tmp_path / "moe" / "checkpoint.pt"
    payload = torch.load(path, weights_only=False)
    assert payload["config"]["balance_coef"] == 0.0 and payload["config"]["ffn_bias"] is True
    for field in ("balance_coef", "ffn_bias"):
        del payload["config"][field]
    torch.save(payload, path)
    with pytest.raises(RuntimeError, match="balance_coef: checkpoint 0.0 vs now 0.01"):
        cli.main([*common, "--out", str(tmp_path), "--resume"])
    assert cli.main([*common, "--balance-coef", "0", "--out", str(tmp_path), "--resume"]) == 0
    assert summary(tmp_path)["moe"]["steps"] == 2


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
def test_torchrun_trains_both_models_expert_parallel_with_replicas_in_step(tmp_path, corpus_file):
    """Two ranks under torchrun on gloo: the MoE model expert-parallel (2 of its 4 experts per rank) under
    DistributedGroupedDataParallel, the dense one under torch DDP, taking turns by training time with a time
    budget. Every rank must make the same choices (whose turn, the learning rate, when to stop), or the ranks
    call different collectives and hang; and the clipping must scale every rank alike (--grad-clip 0.01 clips
    every step), or the replicated parameters drift apart. At the end both ranks hold bitwise-equal copies of
    everything but the experts, and different experts."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    env.update(OMP_NUM_THREADS="1", FASTMOE_COMM_TIMEOUT="60")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fastmoe.train",
        "--device", "cpu", "--model", "both", "--time-budget", "4", "--grad-clip", "0.01", "--eval-every", "20",
        "--data", str(corpus_file), "--out", str(out), *TINY,
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = summary(out)
    assert set(results) == {"moe", "dense"}
    for name, result in results.items():
        assert result["steps"] > 0 and 4.0 <= result["train_time_s"] < 8.0, result
        states = [torch.load(out / name / f"checkpoint.rank{r}.pt", weights_only=False) for r in range(2)]
        assert states[0]["step"] == states[1]["step"] == result["steps"]
        assert states[0]["train_time"] == states[1]["train_time"]
        models = [state["model"] for state in states]
        assert models[0].keys() == models[1].keys()
        experts = [key for key in models[0] if ".experts." in key]
        assert bool(experts) == (name == "moe")
        for key in models[0]:
            if key in experts:
                assert not torch.equal(models[0][key], models[1][key]), f"{name}: {key} is the same on both ranks"
            else:
                assert torch.equal(models[0][key], models[1][key]), f"{name}: replicas of {key} differ"
