"""bench_token_path.py runs end to end on the CPU (--device cpu --tiny): every op of every configuration is timed,
and the plain PyTorch version of each op (the benchmark's baseline) computes fastmoe's result."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_token_path  # noqa: E402

OPS = {"permute", "unpermute_combine", "unpermute_combine_w", "swiglu", "swiglu_backward"}


def test_every_op_of_every_configuration_is_timed_on_the_cpu(tmp_path):
    out = tmp_path / "token_path.jsonl"
    argv = ["--device", "cpu", "--tiny", "--configs", "qwen3,mixtral", "--iters", "2", "--warmup", "1"]
    assert bench_token_path.main([*argv, "--json", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["config"], r["op"]) for r in records} == {(c, op) for c in ("qwen3", "mixtral") for op in OPS}
    for record in records:
        assert record["fastmoe_us"] > 0 and record["torch_us"] > 0, record
        assert record["bytes"] > 0 and record["tbps"] is None, record  # no rates on the CPU
    assert next(r for r in records if r["config"] == "qwen3")["k"] == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_torch_baselines_compute_fastmoe_results(dtype):
    cfg = dict(T=48, d=24, h=16, E=6, k=3)
    for name, ours, theirs, _, tol in bench_token_path.cases(cfg, dtype, torch.device("cpu")):
        bench_token_path.check(name, ours(), theirs(), tol)  # raises SystemExit on a mismatch


def test_a_wrong_baseline_is_caught():
    x = torch.ones(4, 3)
    with pytest.raises(SystemExit, match="differ by"):
        bench_token_path.check("op", x, x * 1.5, 1e-3)


@pytest.mark.parametrize("flag, value", [("--configs", "qwen4"), ("--iters", "0"), ("--warmup", "-1")])
def test_bad_values_are_refused_naming_the_flag_and_value(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_token_path.main(["--device", "cpu", "--tiny", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and value in err, err
