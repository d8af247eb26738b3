"""What is alive at the peak of one forward + backward step of an MoE layer: fastmoe against grouped_mm_ref.

For one of bench_moe_layer.py's configurations (``--config``, and ``--index`` within it, e.g. ``escan`` ``3`` for
E = 128), builds ``FMoETransformerMLP`` (bf16, without bias) and the ``grouped_mm_ref`` baseline with the same
weights, runs three warm-up steps of each, then records the CUDA caching allocator's history over one more step
(``torch.cuda.memory._record_memory_history``). Replaying that history gives the step's peak above what was
allocated before it (gradients cleared first, as bench_moe_layer.py measures) and the blocks alive at that point,
largest first, each with the frames that allocated it (fastmoe's C++ functions, ATen's, the baseline's Python
lines). Two methods whose peaks differ show where in this listing.

    PYTHONPATH=python python3 tools/memory_at_peak.py --config mixtral
    PYTHONPATH=python python3 tools/memory_at_peak.py --config escan --index 3 --rows 10
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "python"))
import bench_moe_layer  # noqa: E402

from baselines.moe_baselines import grouped_mm_moe  # noqa: E402

# Frames worth naming: this project's and the baseline's Python, fastmoe's and ATen's C++.
FILES = ("bench_moe_layer", "moe_baselines", "fastmoe/")
FUNCTIONS = ("fastmoe::", "at::native::", "grouped_gemm")


def frames_of(event: dict, depth: int = 4) -> str:
    named = []
    for frame in event.get("frames", []):
        name, filename = frame.get("name", ""), frame.get("filename", "")
        if any(f in filename for f in FILES) or any(f in name for f in FUNCTIONS):
            named.append(f"{name.split('(')[0]} ({Path(filename).name}:{frame.get('line', '')})")
    return " <- ".join(named[:depth]) or "(no named frame)"


def live_at_peak(trace: list) -> tuple:
    """(peak bytes above the recording's start, {address: (bytes, frames)} alive there) from a device trace."""
    live, total, best, best_live = {}, 0, 0, {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], frames_of(event))
            total += event["size"]
            if total > best:
                best, best_live = total, dict(live)
        elif event["action"] == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
    return best, best_live


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_moe_layer.add_layer_arguments(parser, default="mixtral")
    parser.add_argument("--activation", default="gelu", choices=bench_moe_layer.ACTIVATIONS)
    parser.add_argument("--rows", type=int, default=12, help="blocks listed per method")
    args = parser.parse_args(argv)
    c = bench_moe_layer.chosen_layer(parser, args)
    if not torch.cuda.is_available():
        print("memory_at_peak: needs a CUDA device", file=sys.stderr)
        return 2
    layer, x, grad_out = bench_moe_layer.profiled_layer(c, activation=args.activation)
    experts = layer.experts
    params = (layer.gate.gate.weight, layer.gate.gate.bias, experts.htoh4.weight, experts.h4toh.weight)
    methods = {
        "fastmoe": lambda: layer(x),
        "grouped_mm_ref": lambda: grouped_mm_moe(x, *params, c["k"], activation=args.activation),
    }
    trained = [x, *layer.parameters()]
    print(f"# {args.config}[{args.index}] {c} {args.activation} bf16")
    for name, forward in methods.items():
        step = bench_moe_layer.training_step(forward, trained, grad_out)
        for _ in range(3):
            step()
        base = bench_moe_layer.start_peak_window(trained, torch.device("cuda"))
        torch.cuda.memory._record_memory_history(max_entries=100000, stacks="all")
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        peak = torch.cuda.max_memory_allocated() - base
        best, live = live_at_peak(snapshot["device_traces"][torch.cuda.current_device()])
        print(
            f"=== {name}: peak {peak / 2**20:.2f} MiB above the step's start (replayed: {best / 2**20:.2f} MiB), "
            f"{len(live)} blocks alive there"
        )
        for size, frames in sorted(live.values(), key=lambda v: -v[0])[: args.rows]:
            print(f"  {size / 2**20:10.2f} MiB  {frames[:240]}")
        rest = sorted(live.values(), key=lambda v: -v[0])[args.rows :]
        if rest:
            print(f"  {sum(s for s, _ in rest) / 2**20:10.2f} MiB  in {len(rest)} smaller blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
