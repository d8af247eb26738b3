"""bench_moe_layer.py runs end to end on the CPU (--device cpu --tiny), and in fp32 its baselines compute the same
layer as fastmoe for GELU and SwiGLU experts, with and without expert biases."""

import json
import sys
from pathlib import Path

import pytest
import torch

import fastmoe

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_moe_layer  # noqa: E402

from baselines.moe_baselines import dense_ffn  # noqa: E402

CONFIGS = ("mixtral", "qwen3")  # the two that also time the Hugging Face blocks
BASE_METHODS = {"fastmoe", "grouped_mm_ref", "loop", "dense_ffn"}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "moe_layer.jsonl"
    argv = ["--device", "cpu", "--tiny", "--dtypes", "fp32", "--configs", ",".join(CONFIGS)]
    argv += ["--activation", "gelu,swiglu", "--bias", "off,on", "--iters", "2", "--warmup", "1", "--json", str(out)]
    assert bench_moe_layer.main(argv) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_every_case_and_method_is_timed_and_the_baselines_match_fastmoe(records):
    cases = [(r["config"], r["activation"], r["bias"], r["dtype"]) for r in records]
    assert cases == [
        (f"{c}-tiny", act, bias, "fp32") for c in CONFIGS for act in ("gelu", "swiglu") for bias in (False, True)
    ]
    for r in records:
        assert {k: r[k] for k in ("T", "d", "h")} == bench_moe_layer.TINY
        full = bench_moe_layer.CONFIGS[r["config"].removesuffix("-tiny")][0]
        assert (r["E"], r["k"]) == (full["E"], full["k"])  # --tiny shrinks T, d and h only
        assert BASE_METHODS <= set(r["methods"]), r["methods"].keys()
        for method, m in r["methods"].items():
            assert m["ms"] > 0, (method, m)
            assert m["peak_gib"] is None and m["pct_dense"] is None  # CPU: no peak memory, no dense matmul rate
        # same weights, inputs and routing in fp32: SwiGLU's [gate | up] split and the biases must match too
        for method in ("grouped_mm_ref", "loop"):
            assert r["methods"][method]["rel_err_vs_fastmoe"] < 1e-4, (r["config"], r["activation"], r["bias"], method)
        assert r["methods"]["dense_ffn"]["rel_err_vs_fastmoe"] is None
        assert set(r["speedup"]) == set(r["methods"]) - {"fastmoe", "dense_ffn"}
        assert r["vs_dense_ffn"] > 0


def test_hf_blocks_run_on_the_swiglu_cases_without_bias(records):
    pytest.importorskip("transformers.integrations.moe", reason="needs transformers 5 (its MoE experts interface)")
    for r in records:
        model = r["config"].removesuffix("-tiny")
        hf = {m for m in r["methods"] if m.startswith("hf_")}
        if r["activation"] != "swiglu" or r["bias"]:
            assert not hf, r["methods"].keys()  # HF experts are SwiGLU without bias
            continue
        assert f"hf_{model}_eager" in hf and hf <= {f"hf_{model}_{impl}" for impl in bench_moe_layer.HF_IMPLS}
        for method in hf:
            m = r["methods"][method]
            # with fastmoe's weights and its gate bias zeroed, HF's softmax-then-top-k routing is the same function
            assert m["rel_err_vs_fastmoe"] < 1e-4 and m["note"] == bench_moe_layer.HF_NOTE, (method, m)


def test_dense_swiglu_ffn_is_the_expert_mlp_of_a_one_expert_layer():
    """One expert, k = 1: the SwiGLU MoE layer is the dense SwiGLU FFN that the benchmark times at equal FLOPs."""
    torch.manual_seed(1)
    layer = fastmoe.FMoETransformerMLP(
        num_expert=1, d_model=16, d_hidden=24, top_k=1, bias=False, activation="swiglu"
    ).double()
    x = torch.randn(30, 16, dtype=torch.float64)
    w1, w2 = layer.experts.htoh4.weight[0], layer.experts.h4toh.weight[0]
    assert w1.shape == (48, 16) and w2.shape == (16, 24)
    torch.testing.assert_close(dense_ffn(x, w1, w2, "swiglu"), layer(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "flag, value",
    [("--activation", "relu"), ("--dtypes", "bf16,int8"), ("--bias", "yes"), ("--configs", ""), ("--compile", "fast")],
)
def test_bad_values_are_refused_naming_the_flag_and_value(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_moe_layer.main(["--device", "cpu", "--tiny", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and repr(value) in err, err


@pytest.mark.parametrize("composed", [False, True], ids=["one-op", "composed"])
def test_compiled_and_composed_layers_compute_the_same_layer(composed, tmp_path):
    """--compile times the layer under torch.compile, --composed runs fastmoe's composed token path, --recompute the
    layer recomputing its activation: every method computes the same function as the baselines and fastmoe's eager
    layer of that run (fp32 on the CPU)."""
    out = tmp_path / "moe_layer.jsonl"
    argv = ["--device", "cpu", "--tiny", "--dtypes", "fp32", "--configs", "train", "--skip-loop"]
    argv += ["--iters", "1", "--warmup", "2", "--json", str(out)] + (["--composed"] if composed else ["--compile"])
    assert bench_moe_layer.main(argv + ["--recompute"]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["composed"] is composed
    methods = record["methods"]
    assert (bench_moe_layer.COMPILED in methods) is not composed, methods.keys()
    assert bench_moe_layer.RECOMPUTED in methods, methods.keys()
    for method, m in methods.items():
        if method != "dense_ffn":
            assert m["ms"] > 0 and m["rel_err_vs_fastmoe"] < 1e-5, (method, m)


def test_cuda_graph_mode_reports_no_peak(tmp_path):
    """--compile default,reduce-overhead: the CUDA-graph method's record says why it has no peak (its graphs allocate
    from a private pool at capture, before the peak window), and the default mode's record has no such note."""
    out = tmp_path / "moe_layer.jsonl"
    argv = ["--device", "cpu", "--tiny", "--dtypes", "fp32", "--configs", "train", "--skip-loop", "--iters", "1"]
    argv += ["--warmup", "2", "--compile", "default,reduce-overhead", "--json", str(out)]
    assert bench_moe_layer.main(argv) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    graphed = record["methods"][bench_moe_layer.compiled_name(bench_moe_layer.CUDA_GRAPH_MODE)]
    assert graphed["peak_gib"] is None and graphed["peak_note"] == bench_moe_layer.CUDA_GRAPH_PEAK_NOTE, graphed
    assert graphed["ms"] > 0 and graphed["rel_err_vs_fastmoe"] < 1e-5, graphed
    assert "peak_note" not in record["methods"][bench_moe_layer.COMPILED]
