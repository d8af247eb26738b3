"""Where one training step of fastmoe-train's MoE model and of its dense baseline spends its time.

Builds both models exactly as fastmoe-train does (the same flags, the same defaults), trains each for
--warmup-steps steps, then times --timed-steps more, the two models taking turns step by step (as fastmoe-train
does, so both see the same machine load): the forward (with the loss), the backward, the gradient clipping and
the AdamW step, median milliseconds per step. --ops adds torch.profiler's self time per step of fastmoe's ops,
the optimizer kernels and everything that differs between the two models by more than 0.5 ms.

    PYTHONPATH=python .venv/bin/python tools/profile_train_step.py --threads 1 [--ops] [--adamw foreach]
        [any fastmoe-train model flag: --experts 32, --balance-coef 0, ...]

With ``--device cuda`` (and ``--precision bf16`` for autocast, as fastmoe-train runs) each phase ends with a
device synchronisation, so the phase times are GPU times, and --ops reports the CUDA kernels' time (self device
time) instead of the CPU's.

The profiler's own overhead inflates some element-wise ops (GELU most of all), so use the phase table for
totals and the op table for shares between ops of the same kind.
"""

import argparse
import statistics
import time

import torch

from fastmoe.train import cli
from fastmoe.train.data import WindowSampler, load_corpus
from fastmoe.train.loop import LoopConfig, autocast, lm_loss, make_optimizer
from fastmoe.train.model import GPT

PHASES = ("forward", "backward", "clip", "adamw", "step")


def build(args, moe: bool, adamw: str, device: torch.device):
    torch.manual_seed(args.seed)
    model = GPT(cli.model_config(args, moe=moe)).to(device)
    cfg = LoopConfig(batch_size=args.batch, lr=args.lr, weight_decay=args.weight_decay)
    return model, make_optimizer(model, cfg, fused=adamw == "fused")


def make_step(model, optimizer, sampler, grad_clip: float, device: torch.device, precision: str):
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def step(times=None):
        t0 = now()
        inputs, targets = (t.to(device) for t in sampler.next_batch())
        with autocast(device, precision):
            logits = model(inputs)
        loss = lm_loss(logits, targets)
        aux = model.balance_loss()
        objective = loss if aux is None else loss + aux
        t1 = now()
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        t2 = now()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        t3 = now()
        optimizer.step()
        loss.item()
        t4 = now()
        if times is not None:
            for name, value in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
                times[name].append(value * 1e3)

    return step


def main() -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--warmup-steps", type=int, default=30, help="untimed steps first (default 30)")
    extra.add_argument("--timed-steps", type=int, default=40, help="timed steps (default 40)")
    extra.add_argument("--ops", action="store_true", help="also profile --timed-steps steps op by op")
    extra.add_argument("--adamw", choices=["fused", "foreach"], default="fused", help="optimizer implementation")
    own, rest = extra.parse_known_args()
    parser = cli.build_parser()
    args = parser.parse_args(rest)
    cli.check_args(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = load_corpus(args.data, args.val_fraction)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"{where}, {args.precision}, batch {args.batch} x {args.seq_len}, AdamW {own.adamw}")
    steps, times, op_tables = {}, {}, {}
    for name in ("moe", "dense"):
        model, optimizer = build(args, name == "moe", own.adamw, device)
        sampler = WindowSampler(corpus.train, args.batch, args.seq_len, seed=args.seed)
        steps[name] = make_step(model, optimizer, sampler, args.grad_clip, device, args.precision)
        times[name] = {phase: [] for phase in PHASES}
    # The two models take turns step by step, as in fastmoe-train, so both see the same machine load.
    for _ in range(own.warmup_steps):
        for step in steps.values():
            step()
    for _ in range(own.timed_steps):
        for name, step in steps.items():
            step(times[name])
    for name in steps:
        cells = "  ".join(f"{phase} {statistics.median(values):6.1f}" for phase, values in times[name].items())
        tokens_per_s = args.batch * args.seq_len / statistics.median(times[name]["step"]) * 1e3
        print(f"{name:5s} ms/step (median of {own.timed_steps}):  {cells}  ({tokens_per_s:,.0f} tokens/s)")
    if own.ops:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        for name, step in steps.items():
            with profile(activities=activities) as prof:
                for _ in range(own.timed_steps):
                    step()
            # On CUDA an op's self device time is the time of the kernels it launched, which are listed too:
            # the totals count the kernels (device-side events) only.
            op_tables[name] = {
                e.key: (
                    (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / own.timed_steps,
                    e.count / own.timed_steps,
                    not cuda or e.device_type == DeviceType.CUDA,
                )
                for e in prof.key_averages()
            }
    if op_tables:
        moe, dense = op_tables["moe"], op_tables["dense"]
        total = sum(v[0] for v in moe.values() if v[2])
        kind = "CUDA kernel" if cuda else "CPU"
        dense_total = sum(v[0] for v in dense.values() if v[2])
        print(f"\nprofiled {kind} self time per step: moe {total:.1f} ms, dense {dense_total:.1f} ms")
        print("   moe ms  calls  dense ms  calls  op")
        keys = [
            k
            for k in set(moe) | set(dense)
            if k.startswith("fastmoe::")
            or "adamw" in k.lower()
            or abs(moe.get(k, (0, 0, True))[0] - dense.get(k, (0, 0, True))[0]) > (0.1 if cuda else 0.5)
        ]
        for key in sorted(keys, key=lambda k: -moe.get(k, (0, 0, True))[0]):
            m, d = moe.get(key, (0.0, 0, True)), dense.get(key, (0.0, 0, True))
            print(f"  {m[0]:7.2f} {m[1]:6.0f}  {d[0]:8.2f} {d[1]:6.0f}  {key[:110]}")


if __name__ == "__main__":
    main()
