"""The Hugging Face example (examples/hf/finetune_moe.py) at CI size: a Mixtral model on fastmoe's experts and an
upcycled Llama model train on the corpus and their loss falls."""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastmoe.train.data import DEFAULT_CORPUS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples/hf/finetune_moe.py"
# The settings CI runs (examples/hf/README.md): about 20 s of CPU, half of it importing torch and transformers.
CI_ARGS = [
    "--steps", "60", "--dense-steps", "20", "--batch", "16", "--seq-len", "32", "--d-model", "64", "--d-ffn", "128",
    "--experts", "4", "--time-steps", "5", "--eval-tokens", "2048", "--device", "cpu",
]  # fmt: skip


def _transformers_major() -> int | None:
    try:
        return int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


pytestmark = pytest.mark.skipif(
    (_transformers_major() or 0) < 5,
    reason="needs Hugging Face transformers >= 5 (the hf extra: pip install --no-build-isolation '.[hf]')",
)


def _run(args, timeout):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    # One thread: at this size a second one gains nothing, and on a busy 2-core machine OpenMP threads that wait
    # for each other multiply the CPU time several times over.
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _number(pattern: str, text: str) -> tuple:
    match = re.search(pattern, text)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return tuple(float(v) for v in match.groups())


def test_hf_example_trains_mixtral_and_upcycled_llama_and_their_loss_falls():
    # Debian's fortunes when installed (CI installs it); else the repository's own docs, also English text.
    data = [] if DEFAULT_CORPUS.exists() else ["--data", str(ROOT / "docs")]
    result = _run(CI_ARGS + data, timeout=600)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "[mixtral] step   60/60" in out and "[llama-moe] step   60/60" in out
    for name in ("mixtral", "llama-moe"):
        first, last = _number(rf"\[{name}\] training loss, mean of the first \d+ steps ([\d.]+) -> of the last \d+ "
                              r"steps ([\d.]+): fell", out)  # fmt: skip
        assert last < first - 0.1, (name, first, last)
    # use_fastmoe changed only the experts' implementation: the same weights give the same loss on transformers'.
    hf, ours = _number(r"the same batch on both: loss ([\d.]+) \(grouped_mm\), ([\d.]+) \(fastmoe\)", out)
    assert abs(hf - ours) <= 1e-4 * hf, (hf, ours)
    # Both step times and their ratio are printed.
    hf_ms, ours_ms = _number(r"transformers \(grouped_mm\): +([\d.]+) ms\n\[mixtral\]   fastmoe: +([\d.]+) ms", out)
    (ratio,) = _number(r"ratio grouped_mm / fastmoe = ([\d.]+)x", out)
    assert hf_ms > 0 and ours_ms > 0 and abs(ratio - hf_ms / ours_ms) <= 0.01 + 0.01 * ratio
    # moefy with 1 % noise on the copies: the upcycled model starts where the dense model was.
    dense, upcycled = _number(r"validation loss dense ([\d.]+), upcycled ([\d.]+)", out)
    assert abs(dense - upcycled) < 0.05, (dense, upcycled)
    upcycled_again, tuned = _number(r"validation loss ([\d.]+) \(upcycled\) -> ([\d.]+) \(fine-tuned\)", out)
    assert upcycled_again == upcycled and tuned < upcycled


def test_hf_example_rejects_a_bad_argument():
    result = _run(["--experts", "4", "--top-k", "5"], timeout=300)
    assert result.returncode == 2
    assert "--top-k must be <= --experts = 4, got 5" in result.stderr
