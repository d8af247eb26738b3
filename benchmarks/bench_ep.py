"""Expert-parallel MoE layer benchmark (weak scaling): fastmoe against a plain-PyTorch EP layer, fwd+bwd.

    torchrun --standalone --nproc-per-node W benchmarks/bench_ep.py [--config mixtral fine paper] [--out F]
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_ep.py --device cpu --tiny     # gloo, for tests
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_ep.py --config fine --profile /tmp/prof  # where time goes
    torchrun --standalone --nproc-per-node 4 benchmarks/bench_ep.py --ep-exchange hierarchical --ep-local-size 2
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_ep.py --config mixtral paper --replicate 2 --skew 0.5

Every rank holds T tokens and E_local experts, the same at every W (weak scaling), so the layer has
W * E_local experts and each token's k slots go to any rank. Both methods run the expert-parallel code path at
every W, including W = 1 (a one-rank group, whose exchanges are local copies), so t(W=1) / t(W) is the cost of
going across GPUs. 2-layer GELU experts without bias, NaiveGate top-k routing from a gate of fixed seed (the
same on every rank; roughly uniform routing), fwd+bwd with a fixed output gradient.

Methods, in one process with the same weights and inputs:
- ``fastmoe``: ``fastmoe.FMoETransformerMLP(E_local, d, h, top_k=k, world_size=W, moe_group=WORLD, bias=False)``;
- ``ep_baseline``: benchmarks/baselines/ep_baseline.py (gate, argsort, ``all_to_all_single`` of counts and rows,
  ``torch._grouped_mm``, reverse all-to-all, ``index_add`` combine), which computes its own routing with
  ``torch.topk``. The correctness check (once per config, before timing; aborts on failure) gives the baseline
  fastmoe's routing and compares the outputs and the expert-weight gradients on identical routing; it also
  reports the fraction of tokens whose top-k experts agree between the two gates (``routing_agreement``:
  bf16 ties at the k-th logit may be broken differently by ``torch.topk`` and fastmoe's fused top-k).

Timing: every iteration starts after a device sync and a barrier on all ranks; CUDA events around one step;
warm-up, then the median over ``--iters`` per rank; the reported time is the maximum over ranks of the
per-rank medians. TFLOP/s per GPU counts the two expert GEMMs of the T*k rows a rank sends out
(3 * 4 * T * k * d * h for fwd+bwd) over that time; ``pct_dense`` is that over a dense 8192^3 bf16 matmul
measured in the same process. ``peak_gib`` is the maximum over ranks of the peak memory above the parameters.
Rank 0 appends one JSON line per (config, method) to ``--out``.

Variants of fastmoe's layer: ``--ep-chunks n`` (chunked overlap), ``--ep-exchange hierarchical --ep-local-size L``
(the two-level exchange over nodes of L ranks, forced on one host; the line records the exchange the layer runs,
flat on a one-rank group), ``--replicate n`` (``ep_replicate=n``, hot-expert replication; ``copies`` is the mean
number of experts fastmoe copied per timed step). ``--skew F`` skews the router of both methods alike: after the
weights are built, the gate's bias of global expert 0 is raised (the same value on every rank, in the run's dtype)
by the amount that puts expert 0 among the top k of a fraction F*k of all ranks' tokens, so that a fraction F of
all slots go to it (F <= 1/k: a token picks an expert once). ``hot_share`` records the fraction of slots each
method's own gate sent to expert 0 (without ``--skew``, the share the gate as built gives it).
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastmoe  # noqa: E402
from baselines.ep_baseline import EPBaselineMLP, route  # noqa: E402

CONFIGS = {
    "mixtral": dict(T=8192, d=4096, h=14336, E_local=4, k=2),
    "fine": dict(T=16384, d=2048, h=1408, E_local=32, k=6),
    "paper": dict(T=4096, d=1024, h=4096, E_local=32, k=2),
}
TINY = {name: dict(T=64, d=32, h=48, E_local=4, k=min(cfg["k"], 3)) for name, cfg in CONFIGS.items()}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# relative error of the whole output allowed between the two methods on the same routing
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-5}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(step, iters: int, warmup: int, device) -> list:
    """Per-iteration milliseconds of ``step()`` over ``iters`` runs after ``warmup`` runs, each started after a
    sync and a barrier of all ranks (CUDA events on GPU, the host clock on CPU)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        _sync(device)
        dist.barrier()
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def dense_bf16_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = statistics.median(time_step(lambda: a @ b, iters=20, warmup=5, device=device))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _all_ranks(values, op):
    """Reduces a list of floats over all ranks (``op`` = dist.ReduceOp.MAX / MIN / SUM), in float64."""
    t = torch.tensor(values, dtype=torch.float64, device=_COMM_DEVICE)
    dist.all_reduce(t, op=op)
    return t.tolist()


def _gather_floats(value: float) -> list:
    t = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=_COMM_DEVICE)
    t[dist.get_rank()] = value
    dist.all_reduce(t)
    return t.tolist()


_COMM_DEVICE = torch.device("cpu")


def build_layers(cfg: dict, world: int, device, dtype, ep_chunks: int = 1, **layer_args):
    """fastmoe's EP layer and the baseline with the same weights: the gate from a fixed seed (the same on every
    rank), each rank's experts from a seed of its own. ``layer_args`` go to fastmoe's layer (ep_exchange,
    ep_local_size, ep_replicate)."""
    rank = dist.get_rank()
    torch.manual_seed(1234)
    fm = fastmoe.FMoETransformerMLP(
        num_expert=cfg["E_local"],
        d_model=cfg["d"],
        d_hidden=cfg["h"],
        top_k=cfg["k"],
        bias=False,
        world_size=world,
        moe_group=dist.group.WORLD,
        ep_chunks=ep_chunks,
        **layer_args,
    )
    torch.manual_seed(5678 + rank)
    fm.experts.htoh4.reset_parameters()
    fm.experts.h4toh.reset_parameters()
    base = EPBaselineMLP(cfg["E_local"], cfg["d"], cfg["h"], top_k=cfg["k"])
    base.load_state_dict(fm.state_dict())
    return fm.to(device=device, dtype=dtype), base.to(device=device, dtype=dtype)


def _all_gather_floats(values: torch.Tensor) -> torch.Tensor:
    """Every rank's ``values [n]`` (the same n on every rank), stacked by rank, in float64 on the host."""
    mine = values.detach().to(device=_COMM_DEVICE, dtype=torch.float64)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return torch.cat(parts).cpu()


@torch.no_grad()
def skew_router(fm, base, x, skew: float, k: int) -> None:
    """Raises the gate bias of global expert 0 in both layers by the same amount ``b``, chosen so that expert 0
    is among the top k of a fraction ``skew * k`` of all ranks' tokens, i.e. gets a fraction ``skew`` of all slots.
    A token takes expert 0 iff its logit plus ``b`` beats the k-th largest of the other experts' logits, so ``b`` is
    the matching quantile of that margin over every rank's tokens (gathered; the same ``b`` on every rank). The
    bias is in the run's dtype, so the share is met up to its rounding; ``hot_share`` measures it."""
    logits = fm.gate.gate(x).float()
    margin = logits[:, 1:].topk(k, dim=-1).values[:, -1] - logits[:, 0]
    margins = _all_gather_floats(margin).sort().values
    n, total = round(skew * k * margins.numel()), margins.numel()
    spread = (margins[-1] - margins[0]).item()
    if n >= total:
        b = margins[-1].item() + 0.05 * spread + 1e-3
    elif n == 0:
        b = margins[0].item() - 0.05 * spread - 1e-3
    else:
        b = (margins[n - 1].item() + margins[n].item()) / 2
    fm.gate.gate.bias[0] += b
    base.gate.gate.bias.copy_(fm.gate.gate.bias)


@torch.no_grad()
def hot_shares(fm, base, x, k: int) -> dict:
    """The fraction of all ranks' slots that each method's own gate sends to global expert 0."""
    fm_idx = fm.gate(x)[0]
    base_idx, _ = route(x, base.gate.gate.weight, base.gate.gate.bias, k)
    hot = [(fm_idx == 0).sum().item(), (base_idx == 0).sum().item(), fm_idx.numel()]
    fm_hot, base_hot, slots = _all_ranks(hot, dist.ReduceOp.SUM)
    return {"fastmoe": round(fm_hot / slots, 4), "ep_baseline": round(base_hot / slots, 4)}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def check_agreement(fm, base, x, grad_out, dtype) -> dict:
    """Compares the outputs and the expert-weight gradients on the same routing (fastmoe's gate output, detached
    for the baseline), and reports how often the two gates route alike. Every rank aborts if any rank's relative
    error is above the tolerance."""
    idx, score = fm.gate(x)
    idx, score = idx.detach(), score.detach()
    out_fm = fm(x)
    out_base = base(x, routing=(idx, score))
    out_fm.backward(grad_out)
    out_base.backward(grad_out)
    errors = [_rel_err(out_base, out_fm)]
    for name in ("htoh4", "h4toh"):
        errors.append(_rel_err(getattr(base.experts, name).weight.grad, getattr(fm.experts, name).weight.grad))
    with torch.no_grad():
        own_idx, _ = route(x, base.gate.gate.weight, base.gate.gate.bias, base.top_k)
    same = (own_idx.sort(-1).values == idx.sort(-1).values).all(-1).float().mean().item()
    for p in [x, *fm.parameters(), *base.parameters()]:
        p.grad = None
    rel_err, grad_err = _all_ranks([errors[0], max(errors[1:])], dist.ReduceOp.MAX)
    (same,) = _all_ranks([same], dist.ReduceOp.MIN)
    if not max(rel_err, grad_err) <= TOLERANCE[dtype]:
        raise SystemExit(
            f"bench_ep: fastmoe and ep_baseline differ on the same routing: relative error of the output "
            f"{rel_err:.3e}, of the expert-weight gradients {grad_err:.3e} (max over ranks), tolerance "
            f"{TOLERANCE[dtype]:.0e}; not timing"
        )
    return {
        "rel_err_vs_fastmoe": float(f"{rel_err:.2e}"),
        "grad_rel_err_vs_fastmoe": float(f"{grad_err:.2e}"),
        "routing_agreement": round(same, 4),
    }


def run_config(name: str, cfg: dict, args, device, dtype, dense) -> list:
    world, rank = dist.get_world_size(), dist.get_rank()
    layer_args = dict(ep_replicate=args.replicate)
    if args.ep_exchange != "flat":
        layer_args.update(ep_exchange=args.ep_exchange, ep_local_size=args.ep_local_size)
    fm, base = build_layers(cfg, world, device, dtype, args.ep_chunks, **layer_args)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(cfg["T"], cfg["d"], generator=gen).to(device=device, dtype=dtype).requires_grad_()
    grad_out = torch.randn(cfg["T"], cfg["d"], generator=gen).to(device=device, dtype=dtype)
    if args.skew > 0:
        skew_router(fm, base, x, args.skew, cfg["k"])
    hot = hot_shares(fm, base, x, cfg["k"])
    check = check_agreement(fm, base, x, grad_out, dtype)

    flops = 3 * 4 * cfg["T"] * cfg["k"] * cfg["d"] * cfg["h"]
    common = {
        "config": name + ("-tiny" if args.tiny else ""),
        "W": world,
        **cfg,
        "dtype": args.dtype,
        "ep_chunks": args.ep_chunks,
        "variant": variant_name(args),  # the options asked for (the lines below record what the layer ran)
        "ep_exchange": fm.ep_exchange,
        "ep_local_size": fm.ep_local_size,
        "replicate": args.replicate,
        "skew": args.skew,
        "backend": dist.get_backend(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "iters": args.iters,
        "warmup": args.warmup,
        "dense_bf16_tflops": None if dense is None else round(dense, 1),
        **check,
    }
    results = []
    for impl, layer in (("fastmoe", fm), ("ep_baseline", base)):
        params = list(layer.parameters())

        def clear_grads(params=params):
            x.grad = None
            for p in params:
                p.grad = None

        copies = []  # experts fastmoe copied in each step (ep_replicate)

        def step(layer=layer, clear_grads=clear_grads, copies=copies if impl == "fastmoe" else None):
            clear_grads()
            layer(x).backward(grad_out)
            if copies is not None:
                copies.append(len(layer.replicated_experts))

        if impl == "fastmoe":
            fastmoe_step = step  # what --profile runs
        clear_grads()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base_mem = torch.cuda.memory_allocated(device)
        times = time_step(step, args.iters, args.warmup, device)
        timed_copies = copies[-args.iters :]  # the timed steps, after the warm-up ones
        peak = (torch.cuda.max_memory_allocated(device) - base_mem) / 2**30 if device.type == "cuda" else 0.0
        clear_grads()
        median = statistics.median(times)
        ranks_ms = _gather_floats(median)
        ms = max(ranks_ms)
        (peak_max,) = _all_ranks([peak], dist.ReduceOp.MAX)
        tflops = flops / (ms * 1e-3) / 1e12
        results.append(
            {
                **common,
                "impl": impl,
                "ms": round(ms, 3),
                "ms_per_rank": [round(t, 3) for t in ranks_ms],
                "tflops_per_gpu": round(tflops, 3 if args.tiny else 1),
                "pct_dense": None if dense is None else round(100 * tflops / dense, 1),
                "peak_gib": round(peak_max, 2) if device.type == "cuda" else None,
                "hot_share": hot[impl],
                "copies": round(statistics.fmean(timed_copies), 3) if impl == "fastmoe" else None,
            }
        )
    if args.profile is not None:
        profile_steps(fastmoe_step, device, args.profile / f"{name}-W{world}-rank{rank}.json")
    speedup = round(results[1]["ms"] / results[0]["ms"], 3)
    for r in results:
        r["fastmoe_speedup"] = speedup
    return results


def profile_steps(step, device, trace: Path) -> None:
    """Five runs of ``step`` (a fwd+bwd step, as timed) under torch.profiler: rank 0 prints the operators and
    kernels by device time, each rank writes its trace (chrome://tracing, Perfetto)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    trace.parent.mkdir(parents=True, exist_ok=True)
    _sync(device)
    dist.barrier()
    with profile(activities=activities) as prof:
        for _ in range(5):
            step()
        _sync(device)
    prof.export_chrome_trace(str(trace))
    if dist.get_rank() == 0:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70), flush=True)


def variant_name(args) -> str:
    """The variant of fastmoe's layer the options ask for, e.g. ``"ep_chunks=2"`` or ``"skew=0.5, replicate=2"``
    (``""`` for the plain layer): benchmarks/summarize_ep.py gives each its own table."""
    parts = []
    if args.ep_chunks != 1:
        parts.append(f"ep_chunks={args.ep_chunks}")
    if args.ep_exchange != "flat":
        parts.append(f"{args.ep_exchange} exchange, nodes of {args.ep_local_size}")
    if args.skew:
        parts.append(f"skew={args.skew}")
    if args.replicate:
        parts.append(f"replicate={args.replicate}")
    return ", ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (for a CPU run in tests)")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench_ep.jsonl"), help="JSON lines appended here")
    parser.add_argument(
        "--ep-chunks",
        type=int,
        default=1,
        help="fastmoe's ep_chunks: token chunks whose exchanges overlap each other's experts (default 1)",
    )
    parser.add_argument(
        "--ep-exchange",
        choices=("flat", "hierarchical"),
        default="flat",
        help="fastmoe's ep_exchange: hierarchical forces the two-level exchange over nodes of --ep-local-size ranks",
    )
    parser.add_argument(
        "--ep-local-size",
        type=int,
        default=None,
        help="ranks per node of the hierarchical exchange (fastmoe's ep_local_size; must divide W); default: the "
        "launcher's LOCAL_WORLD_SIZE",
    )
    parser.add_argument(
        "--replicate",
        type=int,
        default=0,
        help="fastmoe's ep_replicate: copy up to this many hot experts to every rank per step (default 0: off)",
    )
    parser.add_argument(
        "--skew",
        type=float,
        default=0.0,
        help="send a fraction F in [0, 1) of all slots to global expert 0, in both methods, by raising its gate "
        "bias (F <= 1/k; default 0: the gate as built, roughly uniform)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="after timing, profile 5 fastmoe steps per config with torch.profiler; rank 0 prints the kernel "
        "table and every rank writes a Chrome trace into this folder",
    )
    args = parser.parse_args(argv)
    if args.ep_chunks < 1:
        parser.error(f"--ep-chunks must be >= 1, got {args.ep_chunks}")
    if args.iters < 1 or args.warmup < 0:
        parser.error(f"--iters must be >= 1 and --warmup >= 0, got --iters {args.iters} --warmup {args.warmup}")
    if args.replicate < 0:
        parser.error(f"--replicate must be >= 0 (0: off), got {args.replicate}")
    if not 0.0 <= args.skew < 1.0:
        parser.error(f"--skew must be in [0, 1) (the fraction of slots sent to expert 0), got {args.skew}")
    if args.ep_local_size is not None and args.ep_local_size < 1:
        parser.error(f"--ep-local-size must be >= 1, got {args.ep_local_size}")
    if args.ep_local_size is not None and args.ep_exchange != "hierarchical":
        parser.error(f"--ep-local-size {args.ep_local_size} needs --ep-exchange hierarchical, got {args.ep_exchange}")
    for name in args.config:
        k = (TINY if args.tiny else CONFIGS)[name]["k"]
        if args.skew * k > 1:
            parser.error(
                f"--skew {args.skew} asks for that fraction of the slots on expert 0, but a token takes an expert "
                f"at most once, so the fraction is at most 1/k: config {name} has k={k} (--skew <= {1 / k:.4g})"
            )

    global _COMM_DEVICE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("bench_ep: no CUDA device; use --device cpu (gloo) to run on CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl", device_id=device)
        _COMM_DEVICE = device
    else:
        device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("gloo")
    dtype = DTYPES[args.dtype]
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0 and args.iters < 20:
        print(f"note: --iters {args.iters} is below the 20 runs the method asks for", file=sys.stderr)
    try:
        dense = dense_bf16_tflops(device)
        if rank == 0:
            dense_text = "" if dense is None else f" | dense bf16 matmul {dense:.0f} TFLOP/s"
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            print(f"# W={world} | {name} | torch {torch.__version__}{dense_text}", flush=True)
        for name in args.config:
            cfg = TINY[name] if args.tiny else CONFIGS[name]
            start = time.time()
            results = run_config(name, cfg, args, device, dtype, dense)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the layers of this config are gone; the next one starts clean
            if rank == 0:
                with args.out.open("a") as f:
                    for r in results:
                        f.write(json.dumps(r) + "\n")
                for r in results:
                    variant = "" if not (args.replicate or args.skew) else f" hot {r['hot_share']} copies {r['copies']}"
                    print(
                        f"{r['config']:12} W={world} {r['impl']:12} {r['ms']:9.3f} ms {r['tflops_per_gpu']:8} "
                        f"TFLOP/s/GPU peak {r['peak_gib']} GiB  fastmoe x{r['fastmoe_speedup']}  "
                        f"rel_err {r['rel_err_vs_fastmoe']} grad {r['grad_rel_err_vs_fastmoe']} "
                        f"routing {r['routing_agreement']}{variant}",
                        flush=True,
                    )
                print(f"# {name} done in {time.time() - start:.1f}s", file=sys.stderr, flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
