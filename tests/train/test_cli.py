"""fastmoe-train's command line: every flag out of range, every combination the model cannot take and a context
longer than the corpus are usage errors (exit code 2) that name the flag and its value, before any data is read
or any model is built, never a traceback."""

import pytest
import torch
from train_cases import TINY, make_corpus

from fastmoe.train import cli
from fastmoe.train.data import load_corpus

# Where the corpus would be if the flags got that far: a usage error must come first.
NO_DATA = ["--data", "/nonexistent/fastmoe-train-corpus"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return make_corpus(tmp_path_factory)


def usage_error(capsys, argv) -> str:
    """Runs ``fastmoe-train argv`` in-process; returns its stderr, after checking it was a usage error."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, f"exit {exit_info.value.code!r}, stderr:\n{err}"
    assert "usage: fastmoe-train" in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--grad-clip", "-1"], "--grad-clip must be >= 0 (0 turns clipping off), got -1.0"),
        (["--grad-clip", "nan"], "--grad-clip must be a finite number, got nan"),
        (["--grad-clip", "inf"], "--grad-clip must be a finite number, got inf"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
        (["--weight-decay", "-0.5"], "--weight-decay must be >= 0, got -0.5"),
        (["--weight-decay", "500"], "--weight-decay times --lr must be below 1"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (["--lr", "-0.001"], "--lr must be > 0, got -0.001"),
        (["--min-lr-ratio", "nan"], "--min-lr-ratio must be a finite number, got nan"),
        (["--min-lr-ratio", "1.5"], "--min-lr-ratio must be in [0, 1], got 1.5"),
        (["--val-fraction", "nan"], "--val-fraction must be a finite number, got nan"),
        (["--balance-coef", "inf"], "--balance-coef must be a finite number, got inf"),
        (["--balance-coef", "-1"], "--balance-coef must be >= 0, got -1.0"),
        (["--time-budget", "nan"], "--time-budget must be a finite number, got nan"),
        (["--time-budget", "inf"], "--time-budget must be a finite number, got inf"),
        (["--time-budget", "-5"], "--time-budget must be > 0 seconds, got -5.0"),
        (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
        (["--seed", "-1"], "--seed must be in [0, 2**63), got -1"),
        (["--gate", "switch"], "--gate switch routes each token to 1 expert: --top-k must be 1, got 2"),
        (["--gate", "gshard", "--top-k", "1"], "--gate gshard routes each token to 2 experts: --top-k must be 2"),
        (["--moe-every", "5", "--layers", "2"], "--moe-every 5 leaves no MoE layer among --layers 2"),
        (["--model", "moe", "--moe-every", "3", "--layers", "2"], "--moe-every must be at most 2"),
        (["--device", "bogus"], "--device must be auto, cpu, cuda or cuda:N, got 'bogus'"),
        (["--device", "cpu:3"], "--device must be auto, cpu, cuda or cuda:N, got 'cpu:3'"),
        (["--device", "meta"], "--device must be auto, cpu, cuda or cuda:N, got 'meta'"),
    ],
)
def test_bad_flags_are_usage_errors_naming_the_flag(capsys, argv, message):
    assert message in usage_error(capsys, [*argv, *NO_DATA])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error(capsys):
    err = usage_error(capsys, ["--device", "cuda:0", *NO_DATA])
    assert "--device cuda:0: torch sees no CUDA device" in err


def test_experts_must_divide_over_the_torchrun_processes(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = usage_error(capsys, ["--experts", "3", "--top-k", "1", *NO_DATA])
    assert "--experts must be divisible by the 2 processes of this torchrun job, got 3" in err


def test_valid_edge_values_pass():
    """0 turns clipping and weight decay off, a dense-only run may place no MoE layer, and the gates' own k."""
    parser = cli.build_parser()
    for argv in (
        ["--grad-clip", "0", "--weight-decay", "0", "--balance-coef", "0"],
        ["--model", "dense", "--moe-every", "5", "--layers", "2"],
        ["--gate", "switch", "--top-k", "1"],
        ["--gate", "gshard", "--top-k", "2"],
        ["--device", "cpu", "--seed", str(2**63 - 1)],
    ):
        args = parser.parse_args(argv)
        cli.check_args(parser, args)  # a usage error would raise SystemExit


def test_a_context_longer_than_the_corpus_names_the_limit(capsys, corpus_file, tmp_path):
    corpus = load_corpus(corpus_file, 0.05)
    limit = min(corpus.train.numel() - 2, corpus.val.numel() - 1)
    argv = [*TINY, "--seq-len", str(limit + 1), "--data", str(corpus_file), "--out", str(tmp_path)]
    err = usage_error(capsys, argv)
    assert f"--seq-len {limit + 1} is longer than the corpus allows" in err
    assert f"{corpus.val.numel():,} validation bytes" in err
    assert f"--seq-len can be at most {limit:,}" in err
    # The limit itself is accepted: the windows fit.
    args = cli.build_parser().parse_args([*TINY, "--seq-len", str(limit)])
    cli.check_corpus_fits(cli.build_parser(), args, corpus)
