"""Training step of Hugging Face MoE models with fastmoe's experts against transformers' own experts
implementations (docs/integrations.md, "Hugging Face MoE models").

One model per configuration, random weights built here (no download); the same model, weights and batch run
under each experts implementation in turn (``model.set_experts_implementation``), so only the expert
computation differs. A step is forward, cross-entropy loss (plus the router aux loss), backward and an optimizer
step. Configurations (8 decoder layers, d_model 2048, bf16, batch 8 x seq 2048 = 16,384 tokens a step):

- ``qwen3_moe``: Qwen3-MoE style, 128 experts, top-8, expert width 768;
- ``mixtral``: Mixtral style, 8 experts, top-2, expert width 7168.

    python benchmarks/bench_hf_moe.py [--configs qwen3_moe,mixtral] [--impls eager,grouped_mm,fastmoe]
                                      [--iters 10] [--warmup 3] [--rounds 1] [--json out.jsonl]
    python benchmarks/bench_hf_moe.py --tiny   # the same on the CPU, fp32, tiny shapes, in seconds

``--layers``, ``--d-model``, ``--experts``, ``--top-k``, ``--d-expert`` and ``--vocab`` change the shapes of the
chosen configurations (with ``--device cpu --dtype fp32``, a CPU run of any size). ``--block`` times one MoE
block (router, experts, and shared experts where the model has them) on random hidden states instead of the
model, with the square of its output as the loss: the part of the step that the experts implementation changes.

``--impls`` also takes ``fastmoe_hf_routers``: fastmoe's experts with transformers' own routers
(``use_fastmoe(model, fuse_routers=False)``), beside ``fastmoe`` what fastmoe's routers gain.

``--manual-gc`` turns Python's automatic garbage collection off while the steps run and collects before each timed
step, outside its time, as training loops that schedule collections themselves do: a full collection (every
other step here) otherwise falls inside some steps and not others, and is exposed where the GPU waits for the host.

``--rounds N`` times the implementations N times over, alternating their order, so that a machine whose speed
drifts during the run does not favour the one timed first.

Prints per configuration and implementation the median step time and, per configuration, the ratio of the
fastest of transformers' implementations to fastmoe (above 1: fastmoe is faster). Before timing, each
implementation's loss on the first batch is compared with fastmoe's (same weights, same routing), and printed.
"""

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
import fastmoe  # noqa: E402
from fastmoe.integrations import hf_moe  # noqa: E402

FASTMOE = hf_moe.IMPLEMENTATION
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")
# fastmoe's experts with transformers' own routers (use_fastmoe(fuse_routers=False)): what the fused routers gain
FASTMOE_HF_ROUTERS = FASTMOE + "_hf_routers"

# Shared by both configurations: 8 layers, d_model 2048; a 32k vocabulary keeps the LM head from hiding the MoE.
BASE = dict(
    vocab_size=32000,
    hidden_size=2048,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=4096,
)
CONFIGS = {
    "qwen3_moe": dict(
        arch="qwen3_moe",
        config=dict(
            BASE,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            head_dim=128,
        ),
    ),
    "mixtral": dict(
        arch="mixtral",
        config=dict(BASE, intermediate_size=7168, num_local_experts=8, num_experts_per_tok=2, head_dim=128),
    ),
}
TINY = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    head_dim=8,
)
TINY_CONFIGS = {
    "qwen3_moe": dict(
        arch="qwen3_moe",
        config=dict(
            TINY,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=True,
        ),
    ),
    "mixtral": dict(
        arch="mixtral", config=dict(TINY, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    ),
}


def build_model(arch: str, config: dict, dtype: torch.dtype, device: torch.device, seed: int):
    import transformers

    classes = {
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    }
    config_class, model_class = classes[arch]
    torch.manual_seed(seed)
    cfg = config_class(**config, output_router_logits=True)
    with torch.device(device):
        model = model_class(cfg)
    return model.to(dtype).train()


def make_optimizer(name: str, model):
    if name == "none":
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4, foreach=True)


def loss_of(model, ids) -> torch.Tensor:
    out = model(input_ids=ids, labels=ids)
    return out.loss if out.aux_loss is None else out.loss + out.aux_loss


def set_impl(model, impl: str) -> None:
    if impl in (FASTMOE, FASTMOE_HF_ROUTERS):
        hf_moe.use_fastmoe(model, fuse_routers=impl == FASTMOE)
        return
    if any(m.config._experts_implementation == FASTMOE for _, m in hf_moe.find_hf_experts(model)):
        hf_moe.restore_hf(model)  # the routers too: transformers' implementations run transformers' routers
    model.set_experts_implementation(impl)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, iters: int, warmup: int, device: torch.device, manual_gc: bool = False) -> list:
    """Wall-clock ms of each of iters steps, after warmup untimed ones. manual_gc: Python's automatic garbage
    collection is off while the steps run, and a full collection runs before each timed step, outside its time (as
    a training loop that schedules collections itself does), so no step pays for a collection that falls in it."""
    was_enabled = gc.isenabled()
    if manual_gc:
        gc.disable()
    try:
        for _ in range(warmup):
            step()
        times = []
        for _ in range(iters):
            if manual_gc:
                gc.collect()
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
    finally:
        if was_enabled:
            gc.enable()
    return times


def with_overrides(spec: dict, args) -> dict:
    """The configuration with the shape arguments given on the command line put in."""
    config = dict(spec["config"])
    experts_key = "num_local_experts" if spec["arch"] == "mixtral" else "num_experts"
    width_key = "intermediate_size" if spec["arch"] == "mixtral" else "moe_intermediate_size"
    for value, key in (
        (args.layers, "num_hidden_layers"),
        (args.d_model, "hidden_size"),
        (args.experts, experts_key),
        (args.top_k, "num_experts_per_tok"),
        (args.d_expert, width_key),
        (args.vocab, "vocab_size"),
    ):
        if value is not None:
            config[key] = value
    return dict(spec, config=config)


def run_config(name: str, spec: dict, args, device: torch.device, dtype: torch.dtype) -> list:
    spec = with_overrides(spec, args)
    if args.block:
        spec["config"]["num_hidden_layers"] = 1
    model = build_model(spec["arch"], spec["config"], dtype, device, args.seed)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    if args.block:
        # One MoE block (router, experts, shared parts) on random hidden states: the part the implementations change.
        trained = model.model.layers[0].mlp
        shape = (args.batch, args.seq, spec["config"]["hidden_size"])
        x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

        def compute_loss():
            return trained(x).float().square().mean()

    else:
        trained = model
        ids = torch.randint(0, spec["config"]["vocab_size"], (args.batch, args.seq), generator=gen).to(device)

        def compute_loss():
            return loss_of(model, ids)

    impls = args.impls
    # The loss of each implementation on the same weights and batch, before any optimizer step changes them.
    losses = {}
    with torch.no_grad():
        for impl in impls:
            set_impl(model, impl)
            losses[impl] = float(compute_loss())
    optimizer = make_optimizer(args.optimizer, trained)

    def step():
        loss = compute_loss()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        trained.zero_grad(set_to_none=True)
        if args.block:
            x.grad = None

    # Rounds: every implementation's warm-up and timed steps once a round, in the listed order and then the reverse
    # (A B, B A, ...), so that a machine drifting during the run weighs on each implementation alike.
    times = {impl: [] for impl in impls}
    round_ms = {impl: [] for impl in impls}
    peak_gib = {impl: 0.0 for impl in impls}
    for rnd in range(args.rounds):
        for impl in impls if rnd % 2 == 0 else impls[::-1]:
            set_impl(model, impl)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            steps = time_steps(step, args.iters, args.warmup, device, manual_gc=args.manual_gc)
            times[impl] += steps
            round_ms[impl].append(statistics.median(steps))
            if device.type == "cuda":
                peak_gib[impl] = max(peak_gib[impl], torch.cuda.max_memory_allocated(device) / 2**30)
            if args.rounds > 1:
                print(f"  round {rnd + 1}/{args.rounds} {impl:<11} step {round_ms[impl][-1]:10.2f} ms", flush=True)
    records = []
    for impl in impls:
        record = dict(
            config=name + ("-tiny" if args.tiny else "") + ("-block" if args.block else ""),
            impl=impl,
            ms=statistics.median(times[impl]),
            ms_min=min(times[impl]),
            rounds=args.rounds,
            ms_rounds=round_ms[impl],
            tokens=args.batch * args.seq,
            shape={k: spec["config"][k] for k in sorted(spec["config"])},
            dtype=str(dtype).replace("torch.", ""),
            device=str(device),
            optimizer=args.optimizer,
            manual_gc=args.manual_gc,
            loss=losses[impl],
            loss_rel_diff_vs_fastmoe=abs(losses[impl] - losses[FASTMOE]) / max(abs(losses[FASTMOE]), 1e-30)
            if FASTMOE in losses
            else None,
        )
        if device.type == "cuda":
            record["peak_mem_gib"] = peak_gib[impl]
        records.append(record)
        print(
            f"{record['config']:<16} {impl:<11} step {record['ms']:10.2f} ms (min {record['ms_min']:.2f})  "
            f"loss {record['loss']:.6g}",
            flush=True,
        )
    hf = [r for r in records if r["impl"] in HF_IMPLS]
    ours = [r for r in records if r["impl"] == FASTMOE]
    if hf and ours:
        best = min(hf, key=lambda r: r["ms"])
        ratio = best["ms"] / ours[0]["ms"]
        for r in records:
            r["hf_fastest"] = best["impl"]
            r["ratio_hf_fastest_over_fastmoe"] = ratio
        print(
            f"{records[0]['config']:<16} ratio {best['impl']} / fastmoe = {ratio:.3f}x "
            f"({'fastmoe faster' if ratio > 1 else 'fastmoe slower'})",
            flush=True,
        )
    return records


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="qwen3_moe,mixtral", help="comma-separated: qwen3_moe, mixtral")
    parser.add_argument(
        "--impls",
        default=None,
        help=f"comma-separated experts implementations: {', '.join(HF_IMPLS)}, {FASTMOE}, {FASTMOE_HF_ROUTERS} "
        f"(fastmoe's experts with transformers' routers) (default: eager,grouped_mm,{FASTMOE})",
    )
    parser.add_argument("--tiny", action="store_true", help="CPU, fp32, tiny shapes: checks the script in seconds")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16, or fp32 with --tiny")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (2 with --tiny)")
    parser.add_argument("--seq", type=int, default=None, help="default 2048 (8 with --tiny)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 10, 2 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, 1 with --tiny)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time the implementations this many times, alternating their order (A B, B A, ...); the median is over "
        "every round's steps, and each round's median is recorded",
    )
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw", "none"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--manual-gc",
        action="store_true",
        help="Python's automatic garbage collection off during the steps, a full collection before each timed step "
        "(outside its time)",
    )
    parser.add_argument(
        "--block", action="store_true", help="time one MoE block (router and experts) on random hidden states"
    )
    # Shape overrides, applied to every configuration chosen (for runs between --tiny and the full size).
    parser.add_argument("--layers", type=int, default=None, help="decoder layers")
    parser.add_argument("--d-model", type=int, default=None, help="hidden size")
    parser.add_argument("--experts", type=int, default=None, help="routed experts per layer")
    parser.add_argument("--top-k", type=int, default=None, help="experts per token")
    parser.add_argument("--d-expert", type=int, default=None, help="an expert's intermediate width")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size")
    parser.add_argument("--json", default=None, help="append one JSON line per configuration and implementation")
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.device = args.device or ("cpu" if tiny else "cuda")
    args.dtype = args.dtype or ("fp32" if tiny else "bf16")
    defaults = dict(batch=(2, 8), seq=(8, 2048), iters=(2, 10), warmup=(1, 3))  # (with --tiny, without)
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    bounds = (("--rounds", args.rounds, 1), ("--iters", args.iters, 1), ("--warmup", args.warmup, 0))
    bounds += (("--batch", args.batch, 1), ("--seq", args.seq, 1))
    for flag, value, low in bounds:
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    args.impls = (args.impls or f"eager,grouped_mm,{FASTMOE}").split(",")
    for impl in args.impls:
        known = (*HF_IMPLS, FASTMOE, FASTMOE_HF_ROUTERS)
        if impl not in known:
            parser.error(f"--impls: unknown implementation {impl!r}; choose from {', '.join(known)}")
    args.configs = args.configs.split(",")
    for name in args.configs:
        if name not in CONFIGS:
            parser.error(f"--configs: unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
    return args


def main(argv=None) -> list:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny (or --device cpu) on a machine without a GPU")
    table = TINY_CONFIGS if args.tiny else CONFIGS
    print(
        f"fastmoe {fastmoe.__version__}, torch {torch.__version__}, device {device}, {args.dtype}, "
        f"batch {args.batch} x seq {args.seq}, optimizer {args.optimizer}",
        flush=True,
    )
    records = []
    for name in args.configs:
        records += run_config(name, table[name], args, device, dtype)
    if args.json:
        with open(args.json, "a") as out:
            for record in records:
                out.write(json.dumps(record) + "\n")
    return records


if __name__ == "__main__":
    main()
