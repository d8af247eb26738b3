"""The expert-parallel benchmark runs end to end on CPU (gloo, two ranks) and its baseline computes the same
layer as fastmoe; the summary turns its JSON lines into the weak-scaling table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from summarize_ep import load, render  # noqa: E402

CONFIGS = ("fine", "paper")


def _tiny_two_rank_run(*args) -> tuple[dict, list]:
    """(environment, command) of bench_ep.py on 2 gloo ranks, tiny fp32 sizes, 2 timed steps after 1, plus args."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(ROOT / "benchmarks" / "bench_ep.py"), "--device", "cpu", "--tiny", "--dtype", "fp32",
        "--iters", "2", "--warmup", "1", *args,
    ]  # fmt: skip
    return env, command


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_bench_ep_tiny_cpu_two_ranks(tmp_path):
    out = tmp_path / "bench_ep.jsonl"
    env, command = _tiny_two_rank_run("--config", *CONFIGS, "--out", str(out), "--profile", str(tmp_path / "prof"))
    # the same with fastmoe's layer in 2 chunks: it must still agree with the baseline (checked before timing)
    chunked = [*command[: command.index("--out")], "--out", str(tmp_path / "chunked.jsonl"), "--ep-chunks", "2"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"bench_ep failed:\n{proc.stdout}\n{proc.stderr}"
    proc_chunked = subprocess.run(chunked, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc_chunked.returncode == 0, f"bench_ep --ep-chunks 2 failed:\n{proc_chunked.stdout}\n{proc_chunked.stderr}"

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["config"], r["impl"]) for r in records] == [
        (f"{c}-tiny", impl) for c in CONFIGS for impl in ("fastmoe", "ep_baseline")
    ]
    for r in records:
        assert r["W"] == 2 and r["backend"] == "gloo" and r["device"] == "cpu" and r["dtype"] == "fp32"
        # same weights, inputs and routing: the two layers agree to fp32 rounding, outputs and weight gradients
        assert r["rel_err_vs_fastmoe"] < 1e-5, r
        assert r["grad_rel_err_vs_fastmoe"] < 1e-5, r
        assert r["routing_agreement"] > 0.9, r
        assert r["ms"] > 0 and len(r["ms_per_rank"]) == 2 and r["ms"] == max(r["ms_per_rank"])

    # --profile: rank 0 prints the operator table, every rank writes a trace per config with fastmoe's exchange in it
    assert "fastmoe::exchange" in proc.stdout
    for config in CONFIGS:
        for rank in range(2):
            trace = json.loads((tmp_path / "prof" / f"{config}-W2-rank{rank}.json").read_text())
            names = {event.get("name") for event in trace["traceEvents"]}
            assert "fastmoe::exchange" in names and "fastmoe::ep_route" in names, sorted(n for n in names if n)[:20]

    chunked_records = [json.loads(line) for line in (tmp_path / "chunked.jsonl").read_text().splitlines()]
    assert [r["ep_chunks"] for r in chunked_records] == [2] * 4
    assert all(r["rel_err_vs_fastmoe"] < 1e-5 for r in chunked_records), chunked_records

    table = render(load([out, tmp_path / "chunked.jsonl"]))
    assert "### fine-tiny fp32 on cpu" in table and "### paper-tiny fp32 on cpu" in table
    assert "### fine-tiny fp32 on cpu, ep_chunks=2" in table
    assert "| 2 | " in table


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_bench_ep_replicate_under_skew_cpu_two_ranks(tmp_path):
    """--skew 0.5 sends half of the slots to expert 0 in both methods; --replicate 2 lets fastmoe copy it."""
    out = tmp_path / "replicate.jsonl"
    env, command = _tiny_two_rank_run("--config", "paper", "--out", str(out), "--replicate", "2", "--skew", "0.5")
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"bench_ep --replicate 2 --skew 0.5 failed:\n{proc.stdout}\n{proc.stderr}"

    fm, base = [json.loads(line) for line in out.read_text().splitlines()]
    assert (fm["impl"], base["impl"]) == ("fastmoe", "ep_baseline")
    for r in (fm, base):
        assert r["W"] == 2 and r["k"] == 2 and r["replicate"] == 2 and r["skew"] == 0.5, r
        # each method's own gate sends (about) half of all slots to expert 0: the baseline is skewed alike
        assert r["hot_share"] >= 0.45, r
        # the copies change the order in which slots are added only: fastmoe still agrees with the baseline
        assert r["rel_err_vs_fastmoe"] < 1e-5 and r["grad_rel_err_vs_fastmoe"] < 1e-5, r
    assert abs(fm["hot_share"] - base["hot_share"]) <= 0.02, (fm["hot_share"], base["hot_share"])
    assert fm["copies"] > 0, fm  # expert 0, hot, was copied in the timed steps
    assert base["copies"] is None and fm["ep_exchange"] == "flat"
    # the summary keeps the variant apart and says what the router and the copies did
    table = render(load([out]))
    assert "### paper-tiny fp32 on cpu, skew=0.5, replicate=2 (" in table, table
    assert f"- W=2: expert 0 took {fm['hot_share']:.2f} of the slots; fastmoe copied {fm['copies']} experts" in table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--skew", "1.5"], "--skew must be in [0, 1) (the fraction of slots sent to expert 0), got 1.5"),
        (["--skew", "-0.1"], "--skew must be in [0, 1) (the fraction of slots sent to expert 0), got -0.1"),
        (["--replicate", "-1"], "--replicate must be >= 0 (0: off), got -1"),
        (["--tiny", "--config", "fine", "--skew", "0.4"], "config fine has k=3 (--skew <= 0.3333)"),
        (["--ep-local-size", "2"], "--ep-local-size 2 needs --ep-exchange hierarchical, got flat"),
    ],
)
def test_bench_ep_bad_arguments(argv, message, capsys):
    """Checked before torch.distributed starts: an error naming the argument and its value, exit status 2."""
    from bench_ep import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _record(config, w, impl, ms):
    return {
        "config": config, "W": w, "impl": impl, "ms": ms, "tflops_per_gpu": 1.0, "peak_gib": 0.5, "T": 8, "d": 4,
        "h": 4, "E_local": 2, "k": 2, "dtype": "bf16", "device": "GPU", "torch": "x", "date": "2026-11-28T00:00:00Z",
    }  # fmt: skip


def test_summary_speedup_and_weak_scaling_efficiency(tmp_path):
    lines = [
        _record("paper", 1, "fastmoe", 99.0),  # replaced by the later W=1 line
        _record("paper", 1, "fastmoe", 2.0),
        _record("paper", 1, "ep_baseline", 3.0),
        _record("paper", 2, "fastmoe", 2.5),
        _record("paper", 2, "ep_baseline", 6.0),
        _record("paper", 4, "fastmoe", 4.0),  # no baseline line at W=4
    ]
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    rows = [line for line in render(load([path])).splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows == [
        "| 1 | 2.000 | 3.000 | 1.50× | 1.0 | 1.0 | 1.00 | 1.00 | 0.5 | 0.5 |",
        "| 2 | 2.500 | 6.000 | 2.40× | 1.0 | 1.0 | 0.80 | 0.50 | 0.5 | 0.5 |",
        "| 4 | 4.000 | – | – | 1.0 | – | 0.50 | – | 0.5 | – |",
    ]
