"""Where a training step of a Hugging Face MoE model spends its GPU time, per kernel, for each experts
implementation: benchmarks/bench_hf_moe.py's models, weights and batch (8 decoder layers, d_model 2048, bf16,
batch 8 x seq 2048, SGD), two warm-up steps, then ``--steps`` steps under torch.profiler.

    PYTHONPATH=python python3 tools/profile_hf_step.py [--config qwen3_moe] [--impls fastmoe,grouped_mm]
        [--steps 2] [--rows 40] [--layers 8] [--diff | --sync-check | --gaps]

Prints, per implementation, torch.profiler's table sorted by CUDA time: each kernel's total over the profiled steps
and its number of calls. With ``--diff`` it prints instead, per step, each implementation's total kernel time and
the kernels whose calls or time differ between the first implementation and each other one (what the experts
implementation adds or saves; the kernels of attention, the router and the optimizer are the same in every run and
drop out). With ``--sync-check`` it runs one step per implementation under
``torch.cuda.set_sync_debug_mode("warn")`` and lists where the step made the host wait for the GPU (a wait leaves
the GPU idle until the host has issued the next kernels). With ``--gaps`` it prints, per implementation, how long the
GPU was busy and idle over the profiled steps and the ``--rows`` longest idle stretches, each with the kernels
before and after it: where the step's wall time goes beyond its kernels; then, a step, the caching allocator's device
allocations and frees and Python's garbage collections, which stall the host. Needs a CUDA device and transformers.
"""

import argparse
import collections
import gc
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "python"))
import bench_hf_moe  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="qwen3_moe", choices=sorted(bench_hf_moe.CONFIGS))
    parser.add_argument("--impls", default=f"{bench_hf_moe.FASTMOE},grouped_mm", help="comma-separated")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (after 2 warm-up steps)")
    parser.add_argument("--rows", type=int, default=40, help="kernels listed per implementation")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the configuration's)")
    parser.add_argument("--diff", action="store_true", help="kernels that differ between the implementations")
    parser.add_argument("--sync-check", action="store_true", help="where a step synchronizes with the GPU")
    parser.add_argument("--gaps", action="store_true", help="the GPU's idle stretches and the kernels around them")
    args = parser.parse_args(argv)
    known = (*bench_hf_moe.HF_IMPLS, bench_hf_moe.FASTMOE)
    args.impls = args.impls.split(",")
    for impl in args.impls:
        if impl not in known:
            parser.error(f"--impls: unknown implementation {impl!r}; choose from {', '.join(known)}")
    chosen = (("--diff", args.diff), ("--sync-check", args.sync_check), ("--gaps", args.gaps))
    modes = [flag for flag, on in chosen if on]
    if len(modes) > 1:
        parser.error(f"{' and '.join(modes)} are different runs: give one of them")
    if args.diff and len(args.impls) < 2:
        parser.error(f"--diff compares implementations: give at least two in --impls, got {','.join(args.impls)!r}")
    for flag, value in (("--steps", args.steps), ("--rows", args.rows), ("--layers", args.layers)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this profiles GPU kernels")
    from torch.profiler import ProfilerActivity, profile

    spec = bench_hf_moe.CONFIGS[args.config]
    config = dict(spec["config"])
    if args.layers is not None:
        config["num_hidden_layers"] = args.layers
    device = torch.device("cuda")
    model = bench_hf_moe.build_model(spec["arch"], config, torch.bfloat16, device, seed=0)
    ids = torch.randint(0, config["vocab_size"], (8, 2048), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        bench_hf_moe.loss_of(model, ids).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)

    kernels = {}
    for impl in args.impls:
        bench_hf_moe.set_impl(model, impl)
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        if args.sync_check:
            print_syncs(args.config, impl, step)
            continue
        before = stall_counters() if args.gaps else {}
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        if args.diff:
            kernels[impl] = kernel_times(prof.key_averages(), args.steps)
            continue
        if args.gaps:
            print_gaps(f"{args.config} {impl}", gpu_intervals(prof.events()), args.steps, args.rows)
            print_counts(f"{args.config} {impl}", before, stall_counters(), args.steps)
            continue
        print(f"===== {args.config} {impl}: {args.steps} steps", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=160))
    if args.diff:
        print_diff(args.config, kernels, args.rows)
    return 0


def print_syncs(config: str, impl: str, step) -> None:
    """Runs `step` once under the CUDA sync debug mode and prints each synchronizing call's Python location."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    print(f"{config} {impl}: {len(syncs)} synchronizing calls in one step")
    places = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    for place, count in places.most_common():
        print(f"  {count:4d}  {place}")


def gpu_intervals(events) -> list:
    """(start us, end us, name) of each GPU activity (kernel, copy, set) among a profile's events, by start."""
    from torch.autograd import DeviceType

    spans = [
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start
    ]
    return sorted(spans)


def print_gaps(label: str, spans: list, steps: int, rows: int) -> None:
    """The GPU's busy and idle time a step over `spans` (first start to last end), and the `rows` longest idle
    stretches with the activities on either side."""
    if not spans:
        print(f"{label}: no GPU activity recorded")
        return
    gaps, busy = [], 0.0
    run_start, run_end, last_name = spans[0][0], spans[0][1], spans[0][2]
    for start, end, name in spans[1:]:
        if start > run_end:  # the GPU idled from run_end to start
            gaps.append((start - run_end, run_end, last_name, name))
            busy += run_end - run_start
            run_start = start
        if end >= run_end:
            run_end, last_name = end, name
    busy += run_end - run_start
    span = run_end - spans[0][0]
    idle = span - busy
    print(
        f"{label}: GPU busy {busy / steps / 1e3:.3f} ms and idle {idle / steps / 1e3:.3f} ms a step "
        f"({len(gaps) / steps:g} idle stretches a step)"
    )
    for length, at, before, after in sorted(gaps, reverse=True)[:rows]:
        print(f"  {length:9.1f} us at {(at - spans[0][0]) / 1e3:9.3f} ms  after {before[:60]}  before {after[:60]}")


def stall_counters() -> dict:
    """Running counts of what can hold the host up for milliseconds inside a step: the CUDA caching allocator's
    device allocations, frees (each frees after a device synchronisation) and retries after a failed allocation,
    and Python's garbage collections per generation."""
    stats = torch.cuda.memory_stats()
    counts = {
        "cudaMalloc": stats.get("num_device_alloc", 0),
        "cudaFree": stats.get("num_device_free", 0),
        "allocation retries": stats.get("num_alloc_retries", 0),
    }
    for generation, gen_stats in enumerate(gc.get_stats()):
        counts[f"gc generation {generation}"] = gen_stats["collections"]
    return counts


def print_counts(label: str, before: dict, after: dict, steps: int) -> None:
    """How many of each of stall_counters() happened a step between `before` and `after`."""
    parts = [f"{name} {(after[name] - before[name]) / steps:g}" for name in before]
    print(f"{label}: a step: " + ", ".join(parts))


def kernel_times(averages, steps: int) -> dict:
    """{kernel name: (calls a step, microseconds a step)} of the GPU kernels and copies in `averages`."""
    times = {}
    for event in averages:
        total = getattr(event, "device_time_total", None)
        total = event.cuda_time_total if total is None else total
        if total > 0 and event.count > 0:
            times[event.key] = (event.count / steps, total / steps)
    return times


def print_diff(config: str, kernels: dict, rows: int) -> None:
    """Each implementation's kernel time a step, then per other implementation the kernels that differ from the
    first one's (calls or more than 1% of time), the largest differences first."""
    impls = list(kernels)
    for impl in impls:
        total = sum(us for _, us in kernels[impl].values())
        print(f"{config} {impl}: {total / 1e3:.3f} ms of kernels a step, {len(kernels[impl])} distinct kernels")
    base = impls[0]
    for other in impls[1:]:
        a, b = kernels[base], kernels[other]
        changed = []
        for name in set(a) | set(b):
            (ca, ta), (cb, tb) = a.get(name, (0, 0.0)), b.get(name, (0, 0.0))
            if ca != cb or abs(ta - tb) > 0.01 * max(ta, tb):
                changed.append((ta - tb, name, ca, ta, cb, tb))
        changed.sort(key=lambda row: -abs(row[0]))
        print(f"== kernels that differ, a step: {base} against {other} (difference = {base} - {other})")
        columns = (f"{base} calls", f"{base} us", f"{other} calls", f"{other} us")
        print(f"{'difference us':>14} " + " ".join(f"{c:>16}" for c in columns) + "  kernel")
        for delta, name, ca, ta, cb, tb in changed[:rows]:
            print(f"{delta:14.1f} {ca:16g} {ta:16.1f} {cb:16g} {tb:16.1f}  {name[:110]}")
        rest = changed[rows:]
        if rest:
            print(f"{sum(r[0] for r in rest):14.1f}  ({len(rest)} more kernels)")


if __name__ == "__main__":
    sys.exit(main())
