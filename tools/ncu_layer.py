"""Nsight Compute's speed-of-light figures for every kernel of one MoE layer step: its share of the step and where
it sits against the GPU's compute and memory roofs.

Runs itself under ``ncu`` (``--section SpeedOfLight``, profiling only between ``torch.cuda.profiler.start`` and
``stop``): the inner run builds ``FMoETransformerMLP`` with one of bench_moe_layer.py's configurations (GELU
experts, bf16, without bias unless ``--bias``), takes three warm-up steps, then one profiled forward + backward.
Each kernel is replayed alone with its caches flushed, so the durations are those of kernels run in isolation; the
shares compare kernels with one another, not with a timed step. Per kernel (merged by name, in launch order):
calls, duration, share of the step's summed durations, compute (SM) and memory throughput as % of the GPU's peak,
DRAM throughput %, and a placement: ``memory`` where memory throughput is the larger and at least 60% of peak,
``compute`` where the SM's is, else ``latency`` (neither roof is near: launch, occupancy or dependency bound).

    PYTHONPATH=python python3 tools/ncu_layer.py --config train [--bias] [--csv out.csv]
    python3 tools/ncu_layer.py --parse out.csv        # the table again, from a saved ncu CSV
"""

import argparse
import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "python"))
import bench_moe_layer  # noqa: E402

SECTION = "GPU Speed Of Light Throughput"
METRICS = {
    "Duration": "duration",
    "Compute (SM) Throughput": "sm_pct",
    "Memory Throughput": "mem_pct",
    "DRAM Throughput": "dram_pct",
}
TO_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}
ROOF = 60.0  # % of peak at which a kernel counts as at that roof


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def parse(csv_text: str) -> list:
    """Kernels from ncu's ``--csv --page details`` output, merged by name in first-launch order: dicts with name,
    calls, duration (us, summed), and the duration-weighted sm_pct, mem_pct and dram_pct."""
    start = csv_text.find('"ID"')
    if start < 0:
        raise ValueError('no ncu CSV header (a line starting with "ID") in the input')
    launches = {}
    for row in csv.DictReader(io.StringIO(csv_text[start:])):
        if row.get("Section Name") != SECTION or row.get("Metric Name") not in METRICS:
            continue
        launch = launches.setdefault(row["ID"], {"name": row["Kernel Name"]})
        value = _number(row["Metric Value"])
        if row["Metric Name"] == "Duration":
            unit = row.get("Metric Unit", "ns").strip().lower()
            if unit not in TO_US:
                raise ValueError(f"unknown duration unit {unit!r} for kernel {row['Kernel Name']!r}")
            value *= TO_US[unit]
        launch[METRICS[row["Metric Name"]]] = value
    kernels = {}
    for launch in launches.values():  # in the CSV's order, the launch order
        if "duration" not in launch:
            continue
        k = kernels.setdefault(launch["name"], {"name": launch["name"], "calls": 0, "duration": 0.0})
        k["calls"] += 1
        k["duration"] += launch["duration"]
        for key in ("sm_pct", "mem_pct", "dram_pct"):
            k[key] = k.get(key, 0.0) + launch.get(key, 0.0) * launch["duration"]
    for k in kernels.values():
        for key in ("sm_pct", "mem_pct", "dram_pct"):
            k[key] = k[key] / k["duration"] if k["duration"] > 0 else 0.0
        k["placement"] = placement(k["sm_pct"], k["mem_pct"])
    return list(kernels.values())


def placement(sm_pct: float, mem_pct: float) -> str:
    if max(sm_pct, mem_pct) < ROOF:
        return "latency"
    return "memory" if mem_pct >= sm_pct else "compute"


def table(kernels: list, width: int = 70) -> str:
    total = sum(k["duration"] for k in kernels)
    lines = [
        f"{'us':>9} {'share':>6} {'calls':>5} {'SM %':>6} {'mem %':>6} {'DRAM %':>6}  {'placement':9}  kernel",
    ]
    for k in sorted(kernels, key=lambda k: -k["duration"]):
        share = 100 * k["duration"] / total if total > 0 else 0.0
        lines.append(
            f"{k['duration']:9.1f} {share:5.1f}% {k['calls']:5d} {k['sm_pct']:6.1f} {k['mem_pct']:6.1f} "
            f"{k['dram_pct']:6.1f}  {k['placement']:9}  {k['name'][:width]}"
        )
    lines.append(f"{total:9.1f} 100.0% {sum(k['calls'] for k in kernels):5d}  (the step's kernels, run in isolation)")
    return "\n".join(lines)


def inner(shape: dict, bias: bool) -> int:
    """The profiled process: warm-up steps, then one step between profiler start and stop."""
    layer, x, grad_out = bench_moe_layer.profiled_layer(shape, bias)
    step = bench_moe_layer.training_step(lambda: layer(x), [x, *layer.parameters()], grad_out)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_moe_layer.add_layer_arguments(parser, default="train")
    parser.add_argument("--bias", action="store_true", help="experts with biases")
    parser.add_argument("--csv", type=Path, help="also keep ncu's CSV here")
    parser.add_argument("--parse", type=Path, help="print the table of a saved ncu CSV and exit")
    parser.add_argument("--ncu", default=os.environ.get("NCU", "ncu"), help="the ncu executable (default: $NCU or ncu)")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = bench_moe_layer.chosen_layer(parser, args)
    if args.parse is not None:
        print(table(parse(args.parse.read_text())))
        return 0
    if args.inner:
        return inner(shape, args.bias)
    command = [args.ncu, "--profile-from-start", "off", "--section", "SpeedOfLight", "--csv", "--page", "details"]
    command += [sys.executable, str(Path(__file__).resolve()), "--inner", "--config", args.config]
    command += ["--index", str(args.index)] + (["--bias"] if args.bias else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        print(f"ncu_layer: no ncu executable at {args.ncu!r} (set --ncu or $NCU)", file=sys.stderr)
        return 2
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
        print(f"ncu_layer: ncu exited with {done.returncode}", file=sys.stderr)
        return done.returncode
    if args.csv is not None:
        args.csv.write_text(done.stdout)
    kernels = parse(done.stdout)
    print(f"# {args.config}[{args.index}] {bench_moe_layer.CONFIGS[args.config][args.index]} bias={args.bias} bf16")
    print(table(kernels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
