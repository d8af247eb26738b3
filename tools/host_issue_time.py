"""Host time to issue one forward + backward of fastmoe-train's MoE layer against its dense FFN.

Builds both models exactly as fastmoe-train does (tools/profile_train_step.py's way: the same flags and
defaults), takes the first MoE layer of the MoE model and the dense FFN at the same place of the dense twin,
and times on the host ``y = ffn(x); y.backward(g)`` for ``x [batch * seq_len, d_model]``. Before each timed call
the device is synchronised, and the timed region itself does not synchronise, so on CUDA the time is what the
host spends issuing the work (Python, the dispatcher, autograd, kernel launches), not the GPU's time, as long as
the GPU keeps up (small layers; the default size does). ``--device meta`` runs the same calls on meta tensors:
no kernel runs at all, so it measures the host path alone on any machine.

    PYTHONPATH=python .venv/bin/python tools/host_issue_time.py --device cuda [--precision bf16]
        [--repeats 200] [--profile 20] [--composed] [--compile inductor]
        [any fastmoe-train model flag: --experts 32, --batch 64, ...]

Prints the median microseconds per forward + backward of each layer and their ratio (MoE / dense). With
``--compile BACKEND`` both layers are also timed under ``torch.compile`` with that backend (compiled by the warm-up
calls; the one op's layer with ``fullgraph=True``), in turn with the eager ones: what compiling adds to or takes
from the host's time a step (dynamo's guards, AOTAutograd's wrappers, the graph's op calls from Python). With
``--profile N`` it then runs N more calls of each layer under ``torch.profiler`` and prints, per call, the
dispatcher ops, the autograd nodes and the kernel launches, and the ops that took the most host time: where the
MoE layer's extra host time goes; on CUDA also the synchronising calls torch reports in one call, and with
``--trace DIR`` a trace of the profiled calls with the GPU's activity (DIR/moe.json, DIR/dense.json).
"""

import collections
import os
import statistics
import sys
import time

import torch

from fastmoe.train import cli
from fastmoe.train.loop import autocast
from fastmoe.train.model import GPT


def first_ffn(model: GPT, moe_model: GPT):
    """The FFN of ``model`` at the place of ``moe_model``'s first MoE layer."""
    for block, moe_block in zip(model.blocks, moe_model.blocks, strict=True):
        if moe_block.is_moe:
            return block.ffn
    raise SystemExit("the model has no MoE layer; check --moe-every")


def fresh_input(ffn, x):
    """Clears the layer's gradients and returns a new leaf copy of ``x``: the untimed part of a call."""
    ffn.zero_grad(set_to_none=True)
    return x.detach().requires_grad_(True)


def forward_backward(ffn, inp, grad, device, precision) -> None:
    """``y = ffn(inp); y.backward(grad)`` under the run's autocast: the work whose issue time is measured."""
    with autocast(device, precision):
        y = ffn(inp)
    y.backward(grad.to(y.dtype))


def time_layers(layers: dict, x, grad, device, precision, repeats: int, warmup: int) -> dict:
    """Median host microseconds of one forward + backward per layer. The layers take turns call by call, so a
    drift of the machine (clocks, other load) weighs on all of them alike."""
    times = {name: [] for name in layers}
    for step in range(warmup + repeats):
        for name, ffn in layers.items():
            inp = fresh_input(ffn, x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            forward_backward(ffn, inp, grad, device, precision)
            elapsed = time.perf_counter() - start
            if step >= warmup:
                times[name].append(elapsed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {name: statistics.median(values) * 1e6 for name, values in times.items()}


LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def find_syncs(ffn, x, grad, device, precision) -> list:
    """The synchronising calls torch reports (``torch.cuda.set_sync_debug_mode``) in one forward + backward, each
    as ``file:line: message`` (the Python line that made it; with TORCH_SHOW_CPP_STACKTRACES=1 the message holds
    the C++ stack too)."""
    import warnings

    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            forward_backward(ffn, fresh_input(ffn, x), grad, device, precision)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    # torch's words for a synchronising call; the one-time notice that the debug mode is a prototype is not one.
    return [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "called a synchronizing" in str(w.message)]


def profile_layer(ffn, x, grad, device, precision, calls: int, name: str, trace_dir=None) -> dict:
    """Runs ``calls`` forward + backward calls under torch.profiler; prints and returns the per-call counts. With
    ``trace_dir``, the GPU's activity is recorded too and the trace written there as ``<name>.json``."""
    from torch.profiler import ProfilerActivity, profile

    forward_backward(ffn, fresh_input(ffn, x), grad, device, precision)
    activities = [ProfilerActivity.CPU]
    if trace_dir is not None and device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            forward_backward(ffn, fresh_input(ffn, x), grad, device, precision)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    counts = collections.Counter()
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue  # the GPU's kernels and memsets, recorded with --trace
        if event.name in LAUNCHES:
            counts["kernel launches"] += 1
        elif event.name.startswith("autograd::engine::evaluate_function"):
            counts["autograd nodes"] += 1
        elif "::" in event.name and event.cpu_parent is None:
            counts["top-level ops"] += 1
    per_call = {key: counts[key] / calls for key in ("top-level ops", "autograd nodes", "kernel launches")}
    print(f"--- {name}: per call " + ", ".join(f"{key} {value:.1f}" for key, value in per_call.items()))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70))
    if device.type == "cuda":
        syncs = find_syncs(ffn, x, grad, device, precision)
        print(f"--- {name}: synchronising calls in one forward + backward: {len(syncs)}")
        for where in syncs:
            print(f"    {where}")
    if trace_dir is not None:
        os.makedirs(trace_dir, exist_ok=True)
        path = os.path.join(trace_dir, f"{name}.json")
        prof.export_chrome_trace(path)
        print(f"--- {name}: trace in {path} (chrome://tracing or ui.perfetto.dev)")
    return per_call


def main(argv=None) -> int:
    parser = cli.build_parser()
    parser.description = __doc__
    tool = parser.add_argument_group("host_issue_time")
    tool.add_argument("--repeats", type=int, default=200, help="timed forward + backward calls per layer")
    tool.add_argument("--warmup-calls", type=int, default=20, help="untimed calls first")
    tool.add_argument("--profile", type=int, default=0, metavar="N", help="then profile N calls of each layer")
    tool.add_argument(
        "--trace",
        metavar="DIR",
        default=None,
        help="with --profile: also record the GPU's activity and write each layer's trace to DIR/<moe|dense>.json",
    )
    tool.add_argument(
        "--composed",
        action="store_true",
        help="run the MoE layer's composed token path (fused_forward=False) instead of the one op fastmoe::moe_ffn",
    )
    tool.add_argument(
        "--compile",
        metavar="BACKEND",
        default=None,
        choices=["inductor", "aot_eager", "eager"],
        help="also time both layers under torch.compile with this backend (inductor, aot_eager or eager)",
    )
    args = parser.parse_args(argv)
    for flag, value, low in (
        ("--repeats", args.repeats, 1),
        ("--warmup-calls", args.warmup_calls, 0),
        ("--profile", args.profile, 0),
    ):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if args.trace is not None and not args.profile:
        parser.error(f"--trace {args.trace} writes the profile of --profile N calls; add --profile N (N >= 1)")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "meta" and args.precision != "fp32":
        parser.error(f"--device meta runs --precision fp32 only (autocast has no meta backend), got {args.precision}")
    if device.type == "meta" and args.compile:
        parser.error(f"--compile {args.compile} needs --device cpu or cuda (a compiled graph runs no meta kernels)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = args.batch * args.seq_len
    torch.manual_seed(args.seed)
    moe_model = GPT(cli.model_config(args, moe=True))
    layers = {}
    for moe in (True, False):
        torch.manual_seed(args.seed)
        model = moe_model if moe else GPT(cli.model_config(args, moe=False))
        ffn = first_ffn(model, moe_model).to(device)
        if moe and args.composed:
            ffn.fused_forward = False
        layers["moe" if moe else "dense"] = ffn
    if args.compile:
        for name in ("moe", "dense"):
            # the composed token path compiles only with graph breaks (its C++ TokenDispatch object)
            fullgraph = not (name == "moe" and args.composed)
            layers[f"{name} compiled"] = torch.compile(layers[name], backend=args.compile, fullgraph=fullgraph)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, args.d_model, generator=gen).to(device)
    grad = torch.randn(rows, args.d_model, generator=gen).to(device)
    results = time_layers(layers, x, grad, device, args.precision, args.repeats, args.warmup_calls)
    profiles = {}
    if args.profile:
        for name in ("moe", "dense"):
            profiles[name] = profile_layer(
                layers[name], x, grad, device, args.precision, args.profile, name, args.trace
            )
    print(f"device {device}, precision {args.precision}, x [{rows}, {args.d_model}], {args.repeats} calls")
    path = "composed" if args.composed else "fused"
    print(f"MoE layer (FMoETransformerMLP, {args.experts} experts, top-{args.top_k}, {path}): {results['moe']:9.1f} us")
    print(f"dense FFN:                                    {results['dense']:9.1f} us")
    print(f"ratio MoE / dense: {results['moe'] / results['dense']:.2f}")
    if args.compile:
        print(f"MoE layer under torch.compile ({args.compile}): {results['moe compiled']:9.1f} us")
        print(f"dense FFN under torch.compile ({args.compile}): {results['dense compiled']:9.1f} us")
        print(
            f"compiled / eager: MoE {results['moe compiled'] / results['moe']:.2f}, "
            f"dense {results['dense compiled'] / results['dense']:.2f}"
        )
    for key in profiles.get("moe", {}):
        print(f"{key} per call: MoE {profiles['moe'][key]:.1f}, dense {profiles['dense'][key]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
