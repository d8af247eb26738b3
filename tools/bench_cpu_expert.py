"""Times grouped_linear on the CPU at the size of make demo's MoE layers: forward and backward of the two expert
layers (d -> h -> d) over N rows split evenly across E experts, beside the same FLOPs as two dense torch GEMMs.

    PYTHONPATH=python .venv/bin/python tools/bench_cpu_expert.py [--threads 1] [--repeats 7]
"""

import argparse
import time

import torch
import torch.nn.functional as F

from fastmoe import ops


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8192, help="routed rows N = tokens * top_k (default 8192)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, d, h, e = args.rows, args.d_model, args.hidden, args.experts
    counts = torch.full((e,), n // e, dtype=torch.int64)
    counts[: n % e] += 1
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    x = torch.randn(n, d, requires_grad=True)
    w1, w2 = (torch.randn(e, h, d) * 0.05).requires_grad_(), (torch.randn(e, d, h) * 0.05).requires_grad_()
    b1, b2 = torch.zeros(e, h, requires_grad=True), torch.zeros(e, d, requires_grad=True)
    dw1, dw2 = (torch.randn(h, d) * 0.05).requires_grad_(), (torch.randn(d, h) * 0.05).requires_grad_()

    def grouped():
        ops.grouped_linear(F.gelu(ops.grouped_linear(x, offsets, w1, b1)), offsets, w2, b2).sum().backward()

    def dense():
        F.linear(F.gelu(F.linear(x, dw1)), dw2).sum().backward()

    flops = 3 * 2 * 2 * n * d * h  # two layers, forward + backward = 3x forward
    for name, fn in (("fastmoe grouped_linear", grouped), ("dense torch GEMMs, same FLOPs", dense)):
        ms = median_ms(fn, args.repeats)
        print(f"{name:32s} {ms:8.1f} ms  {flops / ms / 1e6:6.1f} GFLOP/s")
    print(f"N={n}, {d} -> {h} -> {d}, {e} experts, {torch.get_num_threads()} threads, torch {torch.__version__}")


if __name__ == "__main__":
    main()
