"""The memory-bound kernels of the token path, one call each, against the copy rate of the same run.

    PYTHONPATH=python python3 benchmarks/bench_token_path.py [--configs qwen3,mixtral,...] [--dtype bf16]
        [--iters 50] [--warmup 5] [--json FILE]
    python3 benchmarks/bench_token_path.py --device cpu --tiny   # the same on the CPU, in seconds (no rates)

For each configuration of bench_moe_layer.py (T tokens of width d, E experts, top-k, expert width h), with a
uniform random top-k routing, times one call of each of fastmoe's memory-bound token-path ops and of a plain
PyTorch way to compute the same result:

    permute              x [T, d] -> rows [T*k, d]          | x.index_select(0, token of each row)
    unpermute_combine    rows [T*k, d] -> [T, d], unweighted | rows[pair_pos].sum(1)
    unpermute_combine_w  the same weighted by [T, k] scores  | (rows[pair_pos] * scores).sum(1)
    swiglu               h [T*k, 2h] -> [T*k, h]             | silu(gate) * up
    swiglu_backward      (grad [T*k, h], h, scores) -> grad_h and the scores' gradient (the scaled backward)

Each line gives the median time, the bytes the op must move at least (each input read once, each output written
once) over that time, and that rate as a fraction of the rate of ``dst.copy_(src)`` over 1 GiB measured in the
same run (the practical bandwidth limit). The PyTorch column is the same op written with torch primitives, for
scale; its results are checked against fastmoe's (exact for the permute, to bf16 rounding elsewhere).
On the CPU (``--device cpu``, with ``--tiny`` shapes) it times wall clock and gives no rates: that run checks the
benchmark itself.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_moe_layer  # noqa: E402  (CONFIGS, time_step)

from fastmoe import ops  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="qwen3,mixtral,fine,train", help="comma-separated, from bench_moe_layer")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help=f"tiny shapes ({bench_moe_layer.TINY}; E and k kept)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", default=None, help="append one JSON record per op to this file")
    args = parser.parse_args(argv)
    args.configs = args.configs.split(",")
    for name in args.configs:
        if name not in bench_moe_layer.CONFIGS:
            parser.error(f"--configs: unknown configuration {name!r}; choose from {', '.join(bench_moe_layer.CONFIGS)}")
    for flag, value, least in (("--iters", args.iters, 1), ("--warmup", args.warmup, 0)):
        if value < least:
            parser.error(f"{flag} must be >= {least}, got {value}")
    return args


def copy_rate(device: torch.device) -> float:
    """Bytes per second of ``dst.copy_(src)`` over 1 GiB (read + written)."""
    src = torch.empty(1 << 29, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    ms = bench_moe_layer.time_step(lambda: dst.copy_(src), iters=20, warmup=3, device=device)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def cases(cfg: dict, dtype: torch.dtype, device: torch.device):
    """(name, fastmoe call, torch call, bytes moved, relative tolerance of check) per op of one configuration."""
    T, d, h, E, k = cfg["T"], cfg["d"], cfg["h"], cfg["E"], cfg["k"]
    gen = torch.Generator(device=device).manual_seed(0)
    idx = torch.rand(T, E, generator=gen, device=device).topk(k, dim=1).indices
    scores = torch.rand(T, k, generator=gen, device=device).to(dtype)
    plan = ops.make_plan(idx, E)
    rows = T * k
    token_of_row = plan.sorted_pair.clamp(min=0) // k
    pair_pos = plan.pair_pos
    x = torch.randn(T, d, generator=gen, device=device).to(dtype)
    ys = torch.randn(rows, d, generator=gen, device=device).to(dtype)
    hh = torch.randn(rows, 2 * h, generator=gen, device=device).to(dtype)
    grad_a = torch.randn(rows, h, generator=gen, device=device).to(dtype)
    row_scale = torch.rand(rows, generator=gen, device=device)  # the swiglu scale is in the accumulation type, fp32
    size = torch.tensor([], dtype=dtype).element_size()

    def swiglu_torch():
        gate, up = hh.chunk(2, dim=1)
        return F.silu(gate) * up

    def swiglu_backward_torch():
        gate, up = hh.float().chunk(2, dim=1)
        s = torch.sigmoid(gate)
        g = grad_a.float() * row_scale[:, None]
        grad_h = torch.cat((g * up * s * (1 + gate * (1 - s)), g * gate * s), dim=1).to(dtype)
        return grad_h, (grad_a.float() * gate * s * up).sum(1)

    return [
        ("permute", lambda: ops.permute(x, plan), lambda: x.index_select(0, token_of_row), (T + rows) * d * size, 0.0),
        (
            "unpermute_combine",
            lambda: ops.unpermute_combine(ys, plan),
            lambda: ys[pair_pos].sum(1),
            (rows + T) * d * size,
            2e-2,
        ),
        (
            "unpermute_combine_w",
            lambda: ops.unpermute_combine(ys, plan, scores),
            lambda: (ys[pair_pos] * scores[..., None]).sum(1),
            (rows + T) * d * size,
            2e-2,
        ),
        ("swiglu", lambda: ops.swiglu(hh), swiglu_torch, rows * 3 * h * size, 2e-2),
        (
            "swiglu_backward",
            lambda: ops.swiglu_scaled_backward(grad_a, hh, row_scale),
            swiglu_backward_torch,
            rows * (5 * h * size + 2 * row_scale.element_size()),
            2e-2,
        ),
    ]


def check(name: str, ours, theirs, tol: float) -> None:
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    theirs = theirs if isinstance(theirs, (tuple, list)) else (theirs,)
    for a, b in zip(ours, theirs, strict=True):
        a, b = a.float(), b.float()
        err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
        if err > tol:
            raise SystemExit(f"{name}: fastmoe and the PyTorch version differ by {err:.3g} (relative), above {tol}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_token_path: no CUDA device; the benchmark needs a GPU (or --device cpu --tiny)")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    gpu = device.type == "cuda"
    rate = copy_rate(device) if gpu else float("nan")
    machine = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"copy rate: {rate / 1e12:.3f} TB/s ({machine}, {args.dtype})" if gpu else f"on the CPU ({args.dtype})")
    header = f"{'config':8} {'op':20} {'fastmoe us':>11} {'TB/s':>6} {'of copy':>8}"
    print(f"{header} {'torch us':>10} {'torch/fastmoe':>14}")
    for name in args.configs:
        for cfg in bench_moe_layer.CONFIGS[name]:
            cfg = {**cfg, **bench_moe_layer.TINY} if args.tiny else cfg
            for op, ours, theirs, nbytes, tol in cases(cfg, dtype, device):
                check(f"{name} {op}", ours(), theirs(), tol)
                ms = bench_moe_layer.time_step(ours, args.iters, args.warmup, device)
                ms_torch = bench_moe_layer.time_step(theirs, args.iters, args.warmup, device)
                tbps = nbytes / (ms * 1e-3) / 1e12
                rates = f"{tbps:6.2f} {tbps * 1e12 / rate:8.2f}" if gpu else f"{'-':>6} {'-':>8}"
                print(f"{name:8} {op:20} {ms * 1e3:11.1f} {rates} {ms_torch * 1e3:10.1f} {ms_torch / ms:14.2f}")
                if args.json:
                    record = dict(config=name, **cfg, op=op, dtype=args.dtype, device=machine, bytes=nbytes)
                    record.update(fastmoe_us=ms * 1e3, torch_us=ms_torch * 1e3)
                    record.update(tbps=tbps if gpu else None, copy_tbps=rate / 1e12 if gpu else None)
                    with open(args.json, "a") as f:
                        f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
