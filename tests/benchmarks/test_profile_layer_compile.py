"""tools/profile_layer_compile.py: its arguments are checked before it needs a CUDA device, so bad ones are refused
by name on any machine (the profile itself needs a GPU: docs/benchmarks.md)."""

import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_cli_refuses

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import profile_layer_compile  # noqa: E402


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--config", "escan", "--index", "4"], "--index"),
        (["--config", "train", "--index", "-1"], "--index"),
        (["--config", "qwen4"], "--config"),
        (["--activation", "tanh"], "--activation"),
    ],
)
def test_bad_arguments_are_refused_by_name(argv, named, capsys):
    assert_cli_refuses(profile_layer_compile.main, argv, named, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_good_arguments_reach_the_device_check(capsys):
    assert profile_layer_compile.main(["--config", "escan", "--index", "3", "--activation", "swiglu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
