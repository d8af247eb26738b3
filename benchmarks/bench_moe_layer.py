"""Benchmark one MoE FFN layer (fwd+bwd) of fastmoe against the in-tree baselines, in one process.

Configurations (docs/benchmarks.md): 2-layer MLP experts (GELU, or SwiGLU with --activation swiglu), without
bias unless --bias on, bf16 unless --dtypes says otherwise, NaiveGate top-k routing.

    python benchmarks/bench_moe_layer.py [--configs mixtral,fine,paper,escan,train,qwen3] [--iters 30]
        [--activation gelu,swiglu] [--dtypes bf16,fp16] [--bias off,on] [--skip-loop] [--json out.jsonl]
        [--composed] [--compile [default,reduce-overhead]] [--recompute]
    python benchmarks/bench_moe_layer.py --device cpu --tiny --dtypes fp32   # the same on the CPU, in seconds

Every combination of configuration, activation, bias and dtype is a case. Per case it prints one JSON line and, at
the end, a table: median time of a forward+backward step (CUDA events after warm-up; wall clock on the CPU),
expert TFLOP/s (fwd+bwd = 3x the forward's expert FLOPs), that rate as a % of a dense matmul of the case's dtype
measured in the same process, peak memory above the parameters (CUDA only; over the timed steps, after the
warm-up, so what the process allocates once, such as cuBLAS's workspace, is not counted), and the speed-up of
fastmoe over each baseline. Every method gets the same parameters and inputs, and its output is checked against
fastmoe's.

Each case also times ``dense_ffn``: a dense MLP of width k * h with the case's activation, the same FLOPs as the
experts, which is what an MoE model is compared with at equal FLOPs per token (fastmoe-train's dense baseline).
``vs_dense_ffn`` is fastmoe's time over that one: the cost of the MoE layer's routing and grouped GEMMs relative
to a dense FFN.

``--composed`` runs fastmoe's layer on its composed token path (``layer.fused_forward = False``: the gate, the
token path and the experts op by op) instead of the one op ``fastmoe::moe_ffn``. ``--compile`` also times
``fastmoe_compiled``: the same layer under ``torch.compile`` with the default backend (``fullgraph=True`` but with
``--composed``); ``--compile default,reduce-overhead`` also times ``fastmoe_compiled_reduce-overhead`` (CUDA
graphs), and so on for each mode. Each is compiled by its first calls (the output check and the warm-up steps, so
give ``--warmup`` at least 2). Its ``speedup`` entry is its time over eager fastmoe's: at most 1.0 means
compiling does not slow the layer down. A CUDA-graph method's peak is not reported (``peak_gib`` null, with a
``peak_note``): its graphs allocate from a private pool when they are captured, in the warm-up steps before the
peak window opens, so the window would see none of it. ``--recompute`` also times ``fastmoe_recompute``: the same
layer with ``recompute_activation = True`` (the one op recomputes the activation in its backward instead of keeping
it).

Where ``transformers`` is importable, the SwiGLU cases of the ``mixtral`` and ``qwen3`` configurations without
bias also time Hugging Face's MoE block of that model (``MixtralSparseMoeBlock``, ``Qwen3MoeSparseMoeBlock``)
under each of its experts implementations (``hf_<model>_eager``, ``hf_<model>_grouped_mm``), with fastmoe's
weights copied in. Their routers have no bias, so their output is compared with fastmoe's with the gate bias
zeroed (the same top-k softmax routing otherwise).
"""

import argparse
import itertools
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
    # the MoE layer of Qwen3-30B-A3B
    "qwen3": [dict(T=16384, d=2048, h=768, E=128, k=8)],
}
DEFAULT_CONFIGS = "mixtral,fine,paper,escan,train"
TINY = dict(T=64, d=32, h=16)  # --tiny: these replace T, d and h; E and k stay those of the configuration
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ACTIVATIONS = ("gelu", "swiglu")
BIAS = {"off": False, "on": True}
DENSE = "dense_ffn"  # the equal-FLOPs dense FFN: timed, but not a baseline of the same function
COMPILED = "fastmoe_compiled"  # --compile: torch.compile(layer) with the default backend, in each mode asked for
RECOMPUTED = "fastmoe_recompute"  # --recompute: the same layer recomputing its activation in the backward
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
HF_MODELS = ("mixtral", "qwen3")  # the configurations that also time the HF MoE block of the model of that name
HF_IMPLS = ("eager", "grouped_mm")
CUDA_GRAPH_MODE = "reduce-overhead"  # the compile mode that replays CUDA graphs
CUDA_GRAPH_PEAK_NOTE = "peak not measured: CUDA graphs allocate from a private pool at capture, before the window"
HF_NOTE = "rel_err vs fastmoe with its gate bias zeroed: the HF router has none (same top-k softmax routing)"


def compiled_name(mode: str) -> str:
    return COMPILED if mode == "default" else f"{COMPILED}_{mode}"


def time_step(step, iters: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of `step()` over `iters` runs after `warmup` runs: CUDA events, or wall clock on CPU."""
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
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


def training_step(forward, trained, grad_out):
    """step(): the gradients of ``trained`` cleared, then ``forward().backward(grad_out)``: each step holds only
    its own gradients, as a training loop that zeroes them does."""

    def step():
        for p in trained:
            p.grad = None
        forward().backward(grad_out)

    return step


def start_peak_window(trained, device: torch.device):
    """Clears the gradients of ``trained`` and, on CUDA, resets the peak-memory statistics: returns the bytes
    allocated at that point, the base a step's peak is measured above (None off CUDA). Run warm-up steps first:
    what the process allocates once and keeps (cuBLAS's workspace) is not memory of a step."""
    for p in trained:
        p.grad = None
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def add_layer_arguments(parser, default: str) -> None:
    """The tools' choice of one layer: ``--config`` (a configuration of this benchmark) and ``--index`` (which of
    its shapes: the E-scan has four)."""
    parser.add_argument("--config", default=default, choices=sorted(CONFIGS))
    parser.add_argument("--index", type=int, default=0, help="which shape of the configuration (escan has four)")


def chosen_layer(parser, args) -> dict:
    """The shape that add_layer_arguments' options name; an --index out of range is refused by name."""
    shapes = CONFIGS[args.config]
    if not 0 <= args.index < len(shapes):
        parser.error(f"--index must be in [0, {len(shapes)}) for --config {args.config}, got {args.index}")
    return shapes[args.index]


def profiled_layer(cfg: dict, bias: bool = False, activation: str = "gelu"):
    """What the tools (tools/profile_layer_compile.py, memory_at_peak.py, ncu_layer.py) run: ``FMoETransformerMLP``
    with ``cfg``'s shape (parameters from seed 0, bf16, on CUDA), an input ``x`` that requires grad and an output
    gradient. Returns (layer, x, grad_out)."""
    torch.manual_seed(0)
    layer = fastmoe.FMoETransformerMLP(
        num_expert=cfg["E"], d_model=cfg["d"], d_hidden=cfg["h"], top_k=cfg["k"], bias=bias, activation=activation
    )
    layer = layer.cuda().bfloat16()
    x = torch.randn(cfg["T"], cfg["d"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return layer, x, torch.randn_like(x)


def dense_matmul_tflops(dtype: torch.dtype) -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = time_step(lambda: a @ b, iters=20, warmup=5, device=torch.device("cuda"))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def hf_impls() -> tuple:
    """(transformers' experts implementations among HF_IMPLS that the installed version offers, why none if none)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: F401
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: F401
    except ImportError as error:
        return (), f"{type(error).__name__}: {error}"
    impls = tuple(impl for impl in HF_IMPLS if impl == "eager" or impl in ALL_EXPERTS_FUNCTIONS)
    return impls, "" if impls else f"transformers offers none of the experts implementations {HF_IMPLS}"


def hf_block(model: str, cfg: dict, layer, device: torch.device, dtype: torch.dtype):
    """The HF MoE block of `model` (SwiGLU experts, no bias) with the shape of `cfg` and `layer`'s weights."""
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    shape = dict(hidden_size=cfg["d"], num_experts_per_tok=cfg["k"])
    if model == "mixtral":
        config = transformers.MixtralConfig(
            **shape, intermediate_size=cfg["h"], num_local_experts=cfg["E"], router_jitter_noise=0.0
        )
        block_class = MixtralSparseMoeBlock
    else:  # Qwen3-MoE renormalises the top-k probabilities (norm_topk_prob=True in Qwen3-30B-A3B)
        config = transformers.Qwen3MoeConfig(
            **shape, moe_intermediate_size=cfg["h"], num_experts=cfg["E"], norm_topk_prob=True
        )
        block_class = Qwen3MoeSparseMoeBlock
    with torch.device(device):
        block = block_class(config).to(dtype)
    with torch.no_grad():  # the same [E, 2h, d] gate-then-up layout as fastmoe's SwiGLU htoh4
        block.gate.weight.copy_(layer.gate.gate.weight)
        block.experts.gate_up_proj.copy_(layer.experts.htoh4.weight)
        block.experts.down_proj.copy_(layer.experts.h4toh.weight)
    return block


def hf_forward(block, impl: str, x: torch.Tensor) -> torch.Tensor:
    block.experts.config._experts_implementation = impl  # what model.set_experts_implementation sets
    out = block(x.unsqueeze(0))  # the blocks take [batch, seq, d]
    out = out[0] if isinstance(out, tuple) else out  # older blocks also return the router logits
    return out.reshape(x.shape)


def run_case(name: str, cfg: dict, act: str, bias: bool, dtype_name: str, args, dense_tflops, hf: tuple) -> dict:
    T, d, h, E, k = cfg["T"], cfg["d"], cfg["h"], cfg["E"], cfg["k"]
    device, dtype = torch.device(args.device), DTYPES[dtype_name]
    torch.manual_seed(0)
    layer = fastmoe.FMoETransformerMLP(num_expert=E, d_model=d, d_hidden=h, top_k=k, bias=bias, activation=act)
    if bias:  # the expert biases start at zero: random ones, so that a baseline that dropped them would show
        with torch.no_grad():
            layer.experts.htoh4.bias.normal_(0, 0.1)
            layer.experts.h4toh.bias.normal_(0, 0.1)
    layer = layer.to(device=device, dtype=dtype)
    layer.fused_forward = not args.composed
    experts = layer.experts
    params = (layer.gate.gate.weight, layer.gate.gate.bias, experts.htoh4.weight, experts.h4toh.weight)
    options = dict(b1=experts.htoh4.bias, b2=experts.h4toh.bias, activation=act)
    x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(T, d, device=device, dtype=dtype)

    methods = {
        "fastmoe": lambda: layer(x),
        "grouped_mm_ref": lambda: grouped_mm_moe(x, *params, k, **options),
    }
    if args.compile:  # each case compiles its own layer: forget the previous cases' graphs (dynamo's recompile limit)
        torch._dynamo.reset()
    for mode in args.compile:  # the same layer (same parameters) under torch.compile, compiled by the warm-up steps
        # one graph for the one op; the composed path compiles with graph breaks (its token path is a C++ object)
        compiled = torch.compile(layer, fullgraph=not args.composed, mode=mode)

        def run_compiled(compiled=compiled, graphed=mode == CUDA_GRAPH_MODE):
            if graphed:  # a new step: the CUDA graphs may reuse the previous step's outputs' memory
                torch.compiler.cudagraph_mark_step_begin()
            return compiled(x)

        methods[compiled_name(mode)] = run_compiled
    if args.recompute:

        def run_recomputed():  # the choice is made in the forward, which keeps or drops the activation
            layer.recompute_activation = True
            try:
                return layer(x)
            finally:
                layer.recompute_activation = False

        methods[RECOMPUTED] = run_recomputed
    if not args.skip_loop:
        methods["loop"] = lambda: loop_moe(x, *params, k, **options)
    first_width = (2 if act == "swiglu" else 1) * k * h
    dense_weights = tuple(
        (torch.randn(rows, cols, device=device, dtype=dtype) * cols**-0.5).requires_grad_()
        for rows, cols in ((first_width, d), (d, k * h))
    )
    methods[DENSE] = lambda: dense_ffn(x, *dense_weights, act)
    trained = [x, *layer.parameters(), *dense_weights]
    model = name if act == "swiglu" and not bias and name in HF_MODELS else None
    if model and hf:
        block = hf_block(model, cfg, layer, device, dtype)
        trained += list(block.parameters())
        for impl in hf:
            methods[f"hf_{model}_{impl}"] = lambda impl=impl: hf_forward(block, impl, x)

    with torch.no_grad():
        reference = {"": methods["fastmoe"]().float()}
        if model and hf:
            gate_bias = layer.gate.gate.bias
            saved = gate_bias.clone()
            gate_bias.zero_()
            reference["hf_"] = methods["fastmoe"]().float()
            gate_bias.copy_(saved)
    flops = 3 * 2 * T * k * d * h * (3 if act == "swiglu" else 2)  # fwd: 2*T*k*d*h per expert GEMM, 2h wide first
    dense = dense_tflops[dtype_name]
    result = {"config": name + ("-tiny" if args.tiny else ""), **cfg, "activation": act, "dtype": dtype_name}
    result["composed"] = args.composed
    result.update({"bias": bias, f"dense_{dtype_name}_tflops": None if dense is None else round(dense, 1)})
    result["methods"] = {}
    for method, forward in methods.items():
        rel_err = None
        if method != DENSE:  # another function: nothing to compare
            expected = reference["hf_" if method.startswith("hf_") else ""]
            with torch.no_grad():
                out = forward().float()
            rel_err = float(f"{((out - expected).norm() / expected.norm()).item():.2e}")

        step = training_step(forward, trained, grad_out)
        # Peak memory is measured above a base without gradients, so every method pays for its own weight and
        # input gradients (the previous method's must not sit in the base). The warm-up steps run before it: what
        # a process allocates once and keeps (cuBLAS's workspace, at the first GEMM of the first method timed) is
        # not memory of a step.
        for _ in range(args.warmup):
            step()
        base = start_peak_window(trained, device)
        ms = time_step(step, args.iters, 0, device)
        graphs = method == compiled_name(CUDA_GRAPH_MODE)
        measured = device.type == "cuda" and not graphs
        peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30 if measured else None
        tflops = flops / (ms * 1e-3) / 1e12
        result["methods"][method] = {
            "ms": round(ms, 3),
            "tflops": round(tflops, 1),
            "pct_dense": None if dense is None else round(100 * tflops / dense, 1),
            "peak_gib": None if peak_gib is None else round(peak_gib, 2),
            "rel_err_vs_fastmoe": rel_err,
            **({"note": HF_NOTE} if method.startswith("hf_") else {}),
            **({"peak_note": CUDA_GRAPH_PEAK_NOTE} if graphs else {}),
        }
    fm = result["methods"]["fastmoe"]["ms"]
    result["speedup"] = {m: round(v["ms"] / fm, 2) for m, v in result["methods"].items() if m not in ("fastmoe", DENSE)}
    result["vs_dense_ffn"] = round(fm / result["methods"][DENSE]["ms"], 2)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument("--activation", default="gelu", help="comma-separated: gelu, swiglu")
    parser.add_argument("--dtypes", default="bf16", help=f"comma-separated: {', '.join(DTYPES)}")
    parser.add_argument("--bias", default="off", help="comma-separated: off, on (expert biases)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help=f"tiny shapes ({TINY}), 3 timed steps after 1")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 30, 3 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5, 1 with --tiny)")
    parser.add_argument("--skip-loop", action="store_true", help="leave out the (slow) plain-loop baseline")
    parser.add_argument("--json", type=Path, help="also append the JSON lines to this file")
    parser.add_argument(
        "--composed", action="store_true", help="fastmoe runs its composed token path (layer.fused_forward = False)"
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default="",
        help=f"also time the layer under torch.compile, in these comma-separated modes: {', '.join(COMPILE_MODES)} "
        f"(the flag alone: default); as {COMPILED} (default mode) and {COMPILED}_<mode>",
    )
    parser.add_argument(
        "--recompute",
        action="store_true",
        help=f"also time {RECOMPUTED}: the same layer with recompute_activation = True",
    )
    args = parser.parse_args(argv)

    def choose(flag: str, value: str, choices) -> list:
        names = [c.strip() for c in value.split(",") if c.strip()]
        for c in names or [value]:
            if c not in choices:
                parser.error(f"{flag}: unknown value {c!r} in {value!r}; choose from {', '.join(choices)}")
        return names

    names = choose("--configs", args.configs, CONFIGS)
    acts = choose("--activation", args.activation, ACTIVATIONS)
    dtypes = choose("--dtypes", args.dtypes, DTYPES)
    biases = [BIAS[b] for b in choose("--bias", args.bias, BIAS)]
    args.compile = choose("--compile", args.compile, COMPILE_MODES) if args.compile else []
    args.iters = args.iters if args.iters is not None else (3 if args.tiny else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    if args.iters < 1 or args.warmup < 0:
        parser.error(f"--iters must be at least 1 and --warmup at least 0, got {args.iters} and {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_moe_layer: no CUDA device; the benchmark needs a GPU (or --device cpu --tiny)", file=sys.stderr)
        return 2
    if args.iters < 20 and not args.tiny:
        print(f"note: --iters {args.iters} is below the 20 runs the method asks for", file=sys.stderr)

    if args.device == "cuda":
        dense = {n: dense_matmul_tflops(DTYPES[n]) for n in dtypes}
        rates = ", ".join(f"{n} {v:.0f}" for n, v in dense.items())
        print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | dense matmul {rates} TFLOP/s")
    else:
        dense = dict.fromkeys(dtypes)
        print(f"# cpu | torch {torch.__version__} | wall-clock timing, no peak memory")
    hf, why_not = hf_impls()
    if not hf and "swiglu" in acts and False in biases and any(n in HF_MODELS for n in names):
        print(f"# Hugging Face MoE blocks skipped: {why_not}")
    rows = []
    shapes = [(name, {**cfg, **TINY} if args.tiny else cfg) for name in names for cfg in CONFIGS[name]]
    for (name, cfg), act, bias, dtype_name in itertools.product(shapes, acts, biases, dtypes):
        start = time.time()
        result = run_case(name, cfg, act, bias, dtype_name, args, dense, hf)
        line = json.dumps(result)
        print(line, flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(line + "\n")
        rows.append(result)
        case = f"{name} E={cfg['E']} {act} bias={'on' if bias else 'off'} {dtype_name}"
        print(f"# {case} done in {time.time() - start:.1f}s", file=sys.stderr, flush=True)

    header = (
        f"{'config':12} {'E':>4} {'act':6} {'dtype':5} {'bias':4} {'method':22} {'ms':>9} {'TFLOP/s':>8} "
        f"{'%dense':>7} {'peak GiB':>9} {'fastmoe x':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        for method, m in r["methods"].items():
            speed = f"{r['speedup'][method]:.2f}" if method in r["speedup"] else ""
            if method == DENSE:
                speed = f"1/{r['vs_dense_ffn']:.2f}"  # fastmoe takes vs_dense_ffn times the dense FFN's time
            pct = "-" if m["pct_dense"] is None else f"{m['pct_dense']:.1f}"
            peak = "-" if m["peak_gib"] is None else f"{m['peak_gib']:.2f}"
            print(
                f"{r['config']:12} {r['E']:>4} {r['activation']:6} {r['dtype']:5} {'on' if r['bias'] else 'off':4} "
                f"{method:22} {m['ms']:>9.3f} {m['tflops']:>8.1f} {pct:>7} {peak:>9} {speed:>10}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
