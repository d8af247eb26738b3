"""tools/host_issue_time.py: the host-time measurement of fastmoe-train's MoE layer against its dense FFN, and its
--profile breakdown, on the CPU with tiny widths (the GPU run is docs/gpu-verification.md's)."""

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "host_issue_time.py"
TINY = ["--device", "cpu", "--precision", "fp32", "--batch", "1", "--seq-len", "4", "--d-model", "16"]
TINY += ["--expert-hidden", "8", "--experts", "4", "--threads", "1", "--warmup-calls", "1"]


def load_tool():
    spec = importlib.util.spec_from_file_location("host_issue_time", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def profile_counts(capsys, *flags) -> tuple[dict, str]:
    """Runs the tool with --profile and returns {count name: (MoE, dense)} and its output."""
    assert load_tool().main([*TINY, "--repeats", "3", "--profile", "2", *flags]) == 0
    out = capsys.readouterr().out
    assert "ratio MoE / dense:" in out
    counts = {}
    for line in out.splitlines():
        if " per call: MoE " in line:
            key, values = line.split(" per call: MoE ")
            moe, dense = values.split(", dense ")
            counts[key] = (float(moe), float(dense))
    assert set(counts) == {"top-level ops", "autograd nodes", "kernel launches"}
    assert counts["kernel launches"] == (0.0, 0.0)  # the CPU launches no kernels
    assert "fastmoe::" not in out.split("--- dense")[1].split("device cpu")[0]
    return counts, out


def test_profile_counts_the_moe_layers_ops_and_nodes(capsys):
    composed, out = profile_counts(capsys, "--composed")
    assert "top-2, composed)" in out
    # the composed layer routes, permutes and combines around its two grouped GEMMs: more ops and nodes than the FFN's
    assert composed["top-level ops"][0] > composed["top-level ops"][1] > 0
    assert composed["autograd nodes"][0] > composed["autograd nodes"][1] > 0
    assert "fastmoe::grouped_linear" in out.split("--- dense")[0]
    # the one op fastmoe::moe_ffn: one top-level op and one node of its own (the rest are the leaves' AccumulateGrad)
    fused, out = profile_counts(capsys)
    assert "top-2, fused)" in out
    assert "fastmoe::moe_ffn" in out.split("--- dense")[0]
    assert fused["top-level ops"][0] < composed["top-level ops"][0]
    assert fused["autograd nodes"][0] < composed["autograd nodes"][0]
    assert fused["top-level ops"][1] == composed["top-level ops"][1]  # the same dense FFN


@pytest.mark.parametrize("flag", ["--repeats", "--profile"])
def test_bad_counts_are_refused(flag, capsys):
    with pytest.raises(SystemExit):
        load_tool().main([*TINY, flag, "-1"])
    assert f"{flag} must be >= " in capsys.readouterr().err


def test_trace_writes_each_layers_profile(tmp_path, capsys):
    import json

    profile_counts(capsys, "--trace", str(tmp_path / "traces"))
    for name in ("moe", "dense"):
        events = json.loads((tmp_path / "traces" / f"{name}.json").read_text())["traceEvents"]
        names = {event.get("name", "") for event in events}
        assert ("fastmoe::moe_ffn" in names) == (name == "moe"), name
        assert "aten::addmm" in names or "aten::linear" in names, name  # both layers' linears were recorded


def test_trace_needs_profile_and_meta_needs_fp32(capsys):
    with pytest.raises(SystemExit):
        load_tool().main([*TINY, "--trace", "somewhere"])
    assert "--trace somewhere writes the profile of --profile N calls" in capsys.readouterr().err
    on_meta = ["--device", "meta", *TINY[4:]]  # TINY without its --device cpu --precision fp32
    with pytest.raises(SystemExit):
        load_tool().main([*on_meta, "--precision", "bf16"])
    assert "--device meta runs --precision fp32 only" in capsys.readouterr().err


def test_compile_times_both_layers_compiled(capsys):
    import torch

    torch._dynamo.reset()
    assert load_tool().main([*TINY, "--repeats", "2", "--compile", "aot_eager"]) == 0
    out = capsys.readouterr().out
    times = {}
    for line in out.splitlines():
        if "under torch.compile (aot_eager):" in line:
            times[line.split(" under ")[0]] = float(line.rsplit(":", 1)[1].split()[0])
    assert set(times) == {"MoE layer", "dense FFN"}, out
    assert all(t > 0 for t in times.values()), times
    ratios = out.split("compiled / eager: ")[1].splitlines()[0]
    assert ratios.startswith("MoE ") and ", dense " in ratios, ratios


def test_compile_is_refused_on_meta(capsys):
    on_meta = ["--device", "meta", *TINY[2:]]  # TINY without its --device cpu
    with pytest.raises(SystemExit):
        load_tool().main([*on_meta, "--compile", "inductor"])
    assert "--compile inductor needs --device cpu or cuda" in capsys.readouterr().err
