"""Where one forward + backward step of an MoE layer spends its GPU time, eager against torch.compile.

For each backend named (``eager`` for none, else a torch.compile backend: ``aot_eager``, ``inductor``), times the
step of ``FMoETransformerMLP`` (GELU experts unless ``--activation swiglu``, without bias unless ``--bias``, bf16;
a shape of bench_moe_layer.py's, ``--config`` and ``--index``) with CUDA events (median of 20 after 5 warm-up
steps), its peak memory above the parameters, and then profiles 5 steps: kernels launched per step, their summed GPU
time per step, and the kernels with the most time. Wall time well above the kernels' sum means the
GPU waited on the host.

    PYTHONPATH=python python3 tools/profile_layer_compile.py --config train --backends eager,aot_eager,inductor
    PYTHONPATH=python python3 tools/profile_layer_compile.py --config train --backends eager --bias
    PYTHONPATH=python python3 tools/profile_layer_compile.py --config qwen3 --activation swiglu --backends eager
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "python"))
import bench_moe_layer  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_moe_layer.add_layer_arguments(parser, default="train")
    parser.add_argument("--backends", default="eager,inductor", help="comma-separated: eager, aot_eager, inductor")
    parser.add_argument("--rows", type=int, default=22, help="kernels listed per backend")
    parser.add_argument("--bias", action="store_true", help="experts with biases (what a bias costs)")
    parser.add_argument("--activation", default="gelu", choices=bench_moe_layer.ACTIVATIONS)
    args = parser.parse_args(argv)
    shape = bench_moe_layer.chosen_layer(parser, args)
    if not torch.cuda.is_available():
        print("profile_layer_compile: needs a CUDA device", file=sys.stderr)
        return 2
    layer, x, grad_out = bench_moe_layer.profiled_layer(shape, bias=args.bias, activation=args.activation)
    trained = [x, *layer.parameters()]
    cuda = torch.device("cuda")
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        torch._dynamo.reset()
        forward = layer if backend == "eager" else torch.compile(layer, backend=backend, fullgraph=True)
        step = bench_moe_layer.training_step(lambda forward=forward: forward(x), trained, grad_out)
        for _ in range(5):
            step()
        base = bench_moe_layer.start_peak_window(trained, cuda)  # as the layer bench: each step's own gradients
        ms = bench_moe_layer.time_step(step, iters=20, warmup=0, device=cuda)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels.sort(key=lambda e: -e.self_device_time_total)
        gpu_us = sum(e.self_device_time_total for e in kernels) / 5
        launches = sum(e.count for e in kernels) / 5
        name = f"{args.config}[{args.index}] {args.activation}{' bias' if args.bias else ''}"
        print(
            f"=== {name} {backend}: {ms:.3f} ms  peak {peak:.2f} GiB  "
            f"kernels/step {launches:.0f}  gpu {gpu_us / 1e3:.3f} ms"
        )
        for e in kernels[: args.rows]:
            print(f"  {e.self_device_time_total / 5:9.1f} us  x{e.count / 5:4.1f}  {e.key[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
