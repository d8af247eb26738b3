"""Where a training step of a Hugging Face MoE model spends its GPU time, per kernel, for each experts
implementation: benchmarks/bench_hf_moe.py's models, weights and batch (8 decoder layers, d_model 2048, bf16,
batch 8 x seq 2048, SGD), two warm-up steps, then ``--steps`` steps under torch.profiler.

    PYTHONPATH=python python3 tools/profile_hf_step.py [--config qwen3_moe] [--impls fastmoe,grouped_mm]
        [--steps 2] [--rows 40] [--layers 8] [--diff] [--sync-check]

Prints, per implementation, torch.profiler's table sorted by CUDA time: each kernel's total over the profiled steps
and its number of calls. With ``--diff`` it prints instead, per step, each implementation's total kernel time and
the kernels whose calls or time differ between the first implementation and each other one (what the experts
implementation adds or saves; the kernels of attention, the router and the optimizer are the same in every run and
drop out). With ``--sync-check`` it runs one step per implementation under
``torch.cuda.set_sync_debug_mode("warn")`` and lists where the step made the host wait for the GPU (a wait leaves
the GPU idle until the host has issued the next kernels). Needs a CUDA device and transformers.
"""

import argparse
import collections
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
    args = parser.parse_args(argv)
    known = (*bench_hf_moe.HF_IMPLS, bench_hf_moe.FASTMOE)
    args.impls = args.impls.split(",")
    for impl in args.impls:
        if impl not in known:
            parser.error(f"--impls: unknown implementation {impl!r}; choose from {', '.join(known)}")
    if args.diff and args.sync_check:
        parser.error("--diff and --sync-check are two different runs: give one of them")
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
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        if args.diff:
            kernels[impl] = kernel_times(prof.key_averages(), args.steps)
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
