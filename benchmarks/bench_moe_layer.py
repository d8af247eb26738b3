"""Benchmark one MoE FFN layer (fwd+bwd) of fastmoe against the in-tree baselines, in one process.

Configurations (docs/benchmarks.md): 2-layer GELU MLP experts without bias, bf16, NaiveGate top-k routing.

    python benchmarks/bench_moe_layer.py [--configs mixtral,fine,paper,escan] [--iters 30] [--json out.jsonl]

Per case it prints one JSON line and, at the end, a table: median time of a forward+backward step (CUDA
events, after warm-up), expert TFLOP/s (fwd+bwd = 3x the forward's expert FLOPs), that rate as a % of a dense
bf16 matmul measured in the same process, peak memory above the parameters, and the speed-up of fastmoe over
each baseline. Every method gets the same parameters and inputs, and its output is checked against fastmoe's.

Each case also times ``dense_ffn``: a dense GELU MLP of width k * h, the same FLOPs as the experts, which is what
an MoE model is compared with at equal FLOPs per token (fastmoe-train's dense baseline). ``vs_dense_ffn`` is
fastmoe's time over that one: the cost of the MoE layer's routing and grouped GEMMs relative to a dense FFN.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastmoe  # noqa: E402
from baselines.moe_baselines import dense_ffn, grouped_mm_moe, loop_moe  # noqa: E402

CONFIGS = {
    "mixtral": [dict(T=8192, d=4096, h=14336, E=8, k=2)],
    "fine": [dict(T=16384, d=2048, h=1408, E=64, k=6)],
    "paper": [dict(T=4096, d=1024, h=4096, E=64, k=2)],
    "escan": [dict(T=8192, d=1024, h=4096, E=e, k=2) for e in (2, 8, 32, 128)],
    # an MoE layer of the GPU training comparison (docs/training.md): 16,384 tokens a step, d_model 1024
    "train": [dict(T=16384, d=1024, h=2048, E=8, k=2)],
}
DENSE = "dense_ffn"  # the equal-FLOPs dense FFN: timed, but not a baseline of the same function


def time_step(step, iters: int, warmup: int) -> float:
    """Median milliseconds of `step()` over `iters` runs after `warmup` runs, timed with CUDA events."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def dense_bf16_tflops() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_step(lambda: a @ b, iters=20, warmup=5)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def run_case(name: str, cfg: dict, iters: int, warmup: int, dense_tflops: float, skip_loop: bool) -> dict:
    T, d, h, E, k = cfg["T"], cfg["d"], cfg["h"], cfg["E"], cfg["k"]
    torch.manual_seed(0)
    layer = fastmoe.FMoETransformerMLP(num_expert=E, d_model=d, d_hidden=h, top_k=k, bias=False)
    layer = layer.to(device="cuda", dtype=torch.bfloat16)
    experts = layer.experts
    params = (layer.gate.gate.weight, layer.gate.gate.bias, experts.htoh4.weight, experts.h4toh.weight)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)

    methods = {
        "fastmoe": lambda: layer(x),
        "grouped_mm_ref": lambda: grouped_mm_moe(x, *params, k),
    }
    if not skip_loop:
        methods["loop"] = lambda: loop_moe(x, *params, k)
    dense_weights = tuple(
        (torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * cols**-0.5).requires_grad_()
        for rows, cols in ((k * h, d), (d, k * h))
    )
    methods[DENSE] = lambda: dense_ffn(x, *dense_weights)

    with torch.no_grad():
        reference = methods["fastmoe"]().float()
    flops = 3 * 4 * T * k * d * h  # two expert GEMMs of 2*T*k*d*h each; fwd+bwd = 3x fwd
    result = {"config": name, **cfg, "dtype": "bf16", "dense_bf16_tflops": round(dense_tflops, 1)}
    result["methods"] = {}
    for method, forward in methods.items():
        rel_err = None
        if method != DENSE:  # another function: nothing to compare
            with torch.no_grad():
                out = forward().float()
            rel_err = float(f"{((out - reference).norm() / reference.norm()).item():.2e}")

        def clear_grads():
            for p in (x, *params, *dense_weights):
                p.grad = None

        def step(forward=forward):
            clear_grads()
            forward().backward(grad_out)

        # Peak memory is measured above a base without gradients, so every method pays for its own weight and
        # input gradients (the previous method's must not sit in the base).
        clear_grads()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = time_step(step, iters, warmup)
        peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
        tflops = flops / (ms * 1e-3) / 1e12
        result["methods"][method] = {
            "ms": round(ms, 3),
            "tflops": round(tflops, 1),
            "pct_dense": round(100 * tflops / dense_tflops, 1),
            "peak_gib": round(peak_gib, 2),
            "rel_err_vs_fastmoe": rel_err,
        }
    fm = result["methods"]["fastmoe"]["ms"]
    result["speedup"] = {m: round(v["ms"] / fm, 2) for m, v in result["methods"].items() if m not in ("fastmoe", DENSE)}
    result["vs_dense_ffn"] = round(fm / result["methods"][DENSE]["ms"], 2)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="mixtral,fine,paper,escan,train")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--skip-loop", action="store_true", help="leave out the (slow) plain-loop baseline")
    parser.add_argument("--json", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_moe_layer: no CUDA device; the benchmark needs a GPU", file=sys.stderr)
        return 2
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    for name in names:
        if name not in CONFIGS:
            parser.error(f"--configs: unknown configuration {name!r}; choose from {sorted(CONFIGS)}")
    if args.iters < 20:
        print(f"note: --iters {args.iters} is below the 20 runs the method asks for", file=sys.stderr)

    dense = dense_bf16_tflops()
    device = torch.cuda.get_device_name()
    print(f"# {device} | torch {torch.__version__} | dense bf16 matmul {dense:.0f} TFLOP/s")
    rows = []
    for name in names:
        for cfg in CONFIGS[name]:
            start = time.time()
            result = run_case(name, cfg, args.iters, args.warmup, dense, args.skip_loop)
            line = json.dumps(result)
            print(line, flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(line + "\n")
            rows.append(result)
            print(f"# {name} E={cfg['E']} done in {time.time() - start:.1f}s", file=sys.stderr, flush=True)

    header = (
        f"{'config':8} {'E':>4} {'method':15} {'ms':>9} {'TFLOP/s':>8} {'%dense':>7} {'peak GiB':>9} {'fastmoe x':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        for method, m in r["methods"].items():
            speed = f"{r['speedup'][method]:.2f}" if method in r["speedup"] else ""
            if method == DENSE:
                speed = f"1/{r['vs_dense_ffn']:.2f}"  # fastmoe takes vs_dense_ffn times the dense FFN's time
            print(
                f"{r['config']:8} {r['E']:>4} {method:15} {m['ms']:>9.3f} {m['tflops']:>8.1f} "
                f"{m['pct_dense']:>7.1f} {m['peak_gib']:>9.2f} {speed:>10}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
