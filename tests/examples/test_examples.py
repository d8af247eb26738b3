"""Examples are documentation: run them at tiny sizes so they keep working."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_train_tiny_demo_runs_and_its_loss_falls():
    cmd = [
        sys.executable,
        str(ROOT / "examples/python/train_tiny.py"),
        "--steps",
        "15",
        "--d-model",
        "32",
        "--context",
        "16",
        "--batch",
        "8",
        "--layers",
        "1",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "step   15/15" in result.stdout
    first, last = (float(v) for v in result.stdout.rsplit("loss ", 1)[1].split(" in ")[0].split(" -> "))
    assert last < first


def test_train_tiny_demo_rejects_a_bad_argument():
    cmd = [sys.executable, str(ROOT / "examples/python/train_tiny.py"), "--experts", "0"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert "--experts must be >= 1, got 0" in result.stderr
