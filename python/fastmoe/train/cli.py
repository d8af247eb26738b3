"""fastmoe-train: train an MoE GPT and its dense baseline with the same active FLOPs per token, then compare them.

fastmoe-train                                  # both models, default sizes, on the GPU if there is one
fastmoe-train --time-budget 240 --out runs/x   # both models, 240 s of training each
fastmoe-train --model moe --steps 2000 --experts 16 --top-k 2 --gate gshard
fastmoe-train --resume --out runs/x            # continue both runs from their last checkpoints
torchrun --nproc-per-node 8 -m fastmoe.train   # expert parallelism over every GPU (see docs/training.md)
torchrun --nproc-per-node 8 -m fastmoe.train --parallel fsdp2 --ep-size 4   # DeviceMesh, FSDP2 and DCP
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

import fastmoe
from fastmoe.train import checkpointing
from fastmoe.train.data import Corpus, CorpusError, load_corpus
from fastmoe.train.loop import Distributed, LoopConfig, Trainer, run_interleaved, run_sequential
from fastmoe.train.model import GATES, GPT, ModelConfig, check_config, gate_factory
from fastmoe.train.report import plot, write_summary

DEFAULT_STEPS = 500
DEFAULT_THREADS = 1
DEFAULT_BALANCE_COEF = 0.01
# Gates whose routing fixes k: --top-k must be this for them.
GATE_TOP_K = {"switch": 1, "gshard": 2}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastmoe-train",
        description=__doc__.split("\n\n")[0],
        epilog="\n".join(__doc__.split("\n\n")[1:]).rstrip()
        + "\n\nOutputs in --out: summary.md and summary.json (the table), val_loss.png (validation loss against "
        "training time), and per model <model>/checkpoint/ (a fastmoe.checkpoint folder, with every --parallel), "
        "<model>/config.json and <model>/log.jsonl.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_argument_group("what to train")
    what.add_argument(
        "--model",
        choices=["both", "moe", "dense"],
        default="both",
        help="train the MoE model, its dense baseline, or both (default: both; see --schedule)",
    )
    what.add_argument("--experts", type=int, default=16, help="experts per MoE layer, over all ranks (default: 16)")
    what.add_argument(
        "--top-k",
        type=int,
        default=2,
        help="experts each token is routed to (default: 2; --gate switch needs 1, --gate gshard 2)",
    )
    what.add_argument(
        "--gate",
        choices=sorted(GATES),
        default="naive",
        help="gate of the MoE layers, see docs/gates.md (default: naive)",
    )
    what.add_argument(
        "--balance-coef",
        type=float,
        default=None,
        metavar="C",
        help="coefficient of the naive gate's load-balancing loss (the Switch Transformer's E * sum_e f_e P_e "
        f"over all top-k slots, no capacity, no dropped tokens), added to the MoE model's training loss "
        f"(default: {DEFAULT_BALANCE_COEF} with --gate naive; the other gates keep their own balancing)",
    )
    what.add_argument(
        "--moe-every",
        type=int,
        default=1,
        help="every N-th FFN layer is MoE: layer i (from 0) when (i + 1) %% N == 0 (default: 1, all); at most --layers",
    )
    what.add_argument(
        "--ffn-bias",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="biases in the feed-forward layers of both models, the experts' and the dense FFNs' (default: on; "
        "--no-ffn-bias drops them, as most recent MoE models do, and saves the experts' bias passes)",
    )
    what.add_argument(
        "--expert-hidden",
        type=int,
        default=None,
        help="hidden width of one expert; the dense baseline uses top_k times it at the MoE layers "
        "(default: d_ff / top_k, so both models match a dense d_ff model in FLOPs)",
    )
    size = p.add_argument_group("model size")
    size.add_argument("--d-model", type=int, default=128, help="residual width (default: 128)")
    size.add_argument("--layers", type=int, default=4, help="transformer blocks (default: 4)")
    size.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    size.add_argument("--d-ff", type=int, default=None, help="hidden width of dense FFN layers (default: 4 d_model)")
    size.add_argument(
        "--seq-len",
        type=int,
        default=32,
        help="context length in bytes (default: 32); at most the validation split's length less one",
    )
    run = p.add_argument_group("how long and how")
    run.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps per model (default: {DEFAULT_STEPS} unless --time-budget is given)",
    )
    run.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="training seconds per model, measured around its optimizer steps (the last step may end past it); "
        "with --steps, whichever ends first. Evaluation, checkpoints and the start are not counted, so with "
        "--model both the run takes a little over twice this",
    )
    run.add_argument("--batch", type=int, default=128, help="sequences per step (per rank under torchrun; default 128)")
    run.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of AdamW (default: 3e-3)")
    run.add_argument("--warmup", type=int, default=50, help="linear warm-up steps (default: 50)")
    run.add_argument(
        "--min-lr-ratio", type=float, default=0.1, help="the cosine decay ends at this fraction of --lr (default: 0.1)"
    )
    run.add_argument(
        "--weight-decay",
        type=float,
        default=0.1,
        help="AdamW weight decay of matrices, >= 0 with --lr times it below 1 (default 0.1)",
    )
    run.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip, 0 for none (default: 1.0)")
    run.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="fp32, or bf16 autocast with fp32 weights (default: fp32)",
    )
    run.add_argument(
        "--device",
        default="auto",
        help="auto (the GPU when there is one, else the CPU; cuda:LOCAL_RANK under torchrun), cpu, "
        "cuda or cuda:N (default: auto)",
    )
    run.add_argument(
        "--schedule",
        choices=["interleaved", "sequential"],
        default="interleaved",
        help="with --model both: take turns step by step, the model with less training time first, "
        "so both see the same machine load (interleaved, default), or train one after the other",
    )
    run.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help=f"CPU threads of torch in each process (default: {DEFAULT_THREADS}; 0 leaves torch's choice, one per "
        "core). One thread keeps the step time steady: fastmoe's CPU routing and permutation kernels are "
        "single-threaded, and on a machine that runs other work too, torch's threads made the tokens/s swing "
        "several-fold and evaluation take 4x longer (docs/training.md)",
    )
    run.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the weights and of the batch order, 0 to 2**63 - 1 (default: 0; rank r of a torchrun job "
        "draws its batches with seed + r)",
    )
    par = p.add_argument_group("parallelism (under torchrun)")
    par.add_argument(
        "--parallel",
        choices=["ddp", "fsdp2"],
        default="ddp",
        help="ddp (default): the MoE model expert-parallel over every process with fastmoe's "
        "DistributedGroupedDataParallel (the dense model under torch DDP); "
        "fsdp2: PyTorch's stack, a ('dp', 'ep') DeviceMesh whose 'ep' dimension holds the experts as DTensors, "
        "fully_shard (FSDP2) for the rest; in one process fsdp2 trains the plain model. Both write the same "
        "fastmoe.checkpoint folders (through torch.distributed.checkpoint), which resume with either --parallel "
        "and with another number of processes (docs/training.md)",
    )
    par.add_argument(
        "--ep-size",
        type=int,
        default=None,
        metavar="N",
        help="with --parallel fsdp2: the size of the mesh's 'ep' dimension, the processes that share one MoE "
        "layer's experts; the 'dp' dimension is the number of processes / N (default: every process)",
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="a text file or a folder of text files (default: Debian's fortunes corpus in "
        "/usr/share/games/fortunes, installed by make system-deps)",
    )
    data.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="share of the corpus held out for validation, in 4 KiB blocks (default: 0.05)",
    )
    out = p.add_argument_group("evaluation, logging and checkpoints")
    out.add_argument("--out", default="runs/fastmoe-train", help="output folder (default: runs/fastmoe-train)")
    out.add_argument(
        "--resume",
        action="store_true",
        help="continue each model from its checkpoint in --out (same model and data flags; the number of processes "
        "may differ, the experts are then resharded); a finished run is kept; an error when --out holds no "
        "checkpoint",
    )
    out.add_argument("--eval-every", type=int, default=50, help="validate every N steps (default: 50)")
    out.add_argument(
        "--eval-tokens",
        type=int,
        default=16384,
        help="validation tokens per evaluation, fixed windows (default: 16384)",
    )
    out.add_argument(
        "--log-every",
        type=int,
        default=10,
        help="update the bar's loss, tokens/s and load-balance statistics every N steps (default 10)",
    )
    out.add_argument(
        "--ckpt-every",
        type=int,
        default=100,
        help="write a checkpoint every N steps, 0 for the end only (default: 100)",
    )
    out.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEP",
        help="leave each model after this step with a checkpoint, as an interrupted run would (the "
        "learning-rate schedule still follows --steps); --resume continues it",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bars (logs and the summary stay)")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every flag's range, and the combinations the model cannot take, as usage errors (exit code 2) naming the
    flag and its value. What needs the corpus is checked by :func:`check_corpus_fits` once it is read."""
    for name in ("lr", "weight_decay", "grad_clip", "min_lr_ratio", "val_fraction", "balance_coef", "time_budget"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            p.error(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    positive = [
        "experts",
        "top_k",
        "moe_every",
        "d_model",
        "layers",
        "heads",
        "seq_len",
        "batch",
        "eval_tokens",
        "log_every",
    ]
    for name in positive + ["steps", "expert_hidden", "d_ff", "stop_after", "ep_size"]:
        value = getattr(args, name)
        if (name in positive or value is not None) and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("warmup", "eval_every", "ckpt_every", "threads"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.time_budget is not None and not args.time_budget > 0:
        p.error(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if not args.weight_decay >= 0:
        p.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.lr * args.weight_decay >= 1:
        # AdamW multiplies the weights by 1 - lr * weight_decay every step: at 1 or more that zeroes or flips them.
        p.error(
            f"--weight-decay times --lr must be below 1 (AdamW scales the weights by 1 - lr * weight_decay each "
            f"step), got --weight-decay {args.weight_decay} with --lr {args.lr}"
        )
    if not args.grad_clip >= 0:
        p.error(f"--grad-clip must be >= 0 (0 turns clipping off), got {args.grad_clip}")
    if not 0 <= args.seed < 2**63:
        p.error(f"--seed must be in [0, 2**63), got {args.seed}")
    if not 0 <= args.min_lr_ratio <= 1:
        p.error(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.top_k > args.experts:
        p.error(f"--top-k must be at most --experts={args.experts}, got {args.top_k}")
    if args.gate in GATE_TOP_K and args.top_k != GATE_TOP_K[args.gate]:
        k = GATE_TOP_K[args.gate]
        p.error(
            f"--gate {args.gate} routes each token to {k} expert{'s' if k > 1 else ''}: --top-k must be {k}, "
            f"got {args.top_k}"
        )
    if args.model != "dense" and args.moe_every > args.layers:
        p.error(
            f"--moe-every {args.moe_every} leaves no MoE layer among --layers {args.layers} (layer i is an MoE "
            f"layer when (i + 1) % N == 0): --moe-every must be at most {args.layers}"
        )
    if args.balance_coef is not None:
        if not args.balance_coef >= 0:
            p.error(f"--balance-coef must be >= 0, got {args.balance_coef}")
        if args.gate != "naive":
            p.error(f"--balance-coef applies to --gate naive; the {args.gate} gate has its own balancing")
    if args.d_model % args.heads:
        p.error(f"--d-model must be divisible by --heads={args.heads}, got {args.d_model}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.ep_size is not None:
        if args.parallel != "fsdp2":
            p.error(
                f"--ep-size applies to --parallel fsdp2, got --ep-size {args.ep_size} with --parallel {args.parallel} "
                "(whose experts are spread over every process)"
            )
        if world_size % args.ep_size:
            p.error(f"--ep-size must divide the {world_size} process(es) of this job, got {args.ep_size}")
        if args.model != "dense" and args.experts % args.ep_size:
            p.error(f"--experts must be divisible by --ep-size {args.ep_size}, got {args.experts}")
    ep_size = expert_parallel_size(args, world_size)
    if args.model != "dense" and args.experts % ep_size:
        p.error(f"--experts must be divisible by the {ep_size} processes of this torchrun job, got {args.experts}")
    check_device(p, args.device)
    if args.model != "dense":
        # Whatever else the model or the chosen gate refuses (a gate's own limits on k or the expert count), as a
        # usage error; the checks above name the common cases in terms of the flags.
        config = model_config(args, moe=True)
        try:
            check_config(config)
            gate_factory(config)(config.d_model, config.num_experts, 1, config.top_k)
        except (ValueError, TypeError) as error:
            p.error(f"--gate {args.gate} with --experts {args.experts} and --top-k {args.top_k}: {error}")


def expert_parallel_size(args, world_size: int) -> int:
    """The processes that share one MoE layer's experts: ``--ep-size`` (fsdp2), else every process."""
    return args.ep_size if args.parallel == "fsdp2" and args.ep_size is not None else world_size


def check_device(p: argparse.ArgumentParser, value: str) -> None:
    """``--device``: auto, cpu, cuda or cuda:N, where CUDA is only accepted when torch sees the device."""
    if value == "auto":
        return
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        p.error(f"--device must be auto, cpu, cuda or cuda:N, got {value!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error(f"--device {value}: torch sees no CUDA device (use --device cpu or auto)")
        count = torch.cuda.device_count()
        # Under torchrun each rank takes cuda:LOCAL_RANK whatever the index, so only one process checks it.
        if device.index is not None and device.index >= count and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            p.error(f"--device {value}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def check_corpus_fits(p: argparse.ArgumentParser, args: argparse.Namespace, corpus: Corpus) -> None:
    """``--seq-len`` against the corpus: a training window takes seq_len + 1 bytes of the training split (and
    its random start needs one more), a validation window seq_len + 1 bytes of the validation split."""
    limit = min(corpus.train.numel() - 2, corpus.val.numel() - 1)
    if args.seq_len > limit:
        p.error(
            f"--seq-len {args.seq_len} is longer than the corpus allows: {corpus.source} splits into "
            f"{corpus.train.numel():,} training and {corpus.val.numel():,} validation bytes (--val-fraction "
            f"{args.val_fraction}), so --seq-len can be at most {limit:,}"
        )


def setup_distributed(device_arg: str, parallel: str = "ddp", ep_size: int | None = None):
    """``(Distributed, device)``: the device and, under torchrun (WORLD_SIZE > 1), the process group, and with
    ``parallel="fsdp2"`` the ("dp", "ep") DeviceMesh of shape ``(W / ep_size, ep_size)`` (``ep_size`` None: W)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        if device_arg == "auto":
            return Distributed(parallel=parallel), torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(device_arg)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"fastmoe-train: --device {device_arg} was asked for, but torch sees no CUDA device")
        return Distributed(parallel=parallel), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_arg != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    dist = Distributed(
        rank=torch.distributed.get_rank(),
        world_size=world_size,
        group=torch.distributed.group.WORLD,
        parallel=parallel,
    )
    if parallel == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        ep = ep_size or world_size
        dist.mesh = init_device_mesh(device.type, (world_size // ep, ep), mesh_dim_names=("dp", "ep"))
        dist.world_mesh = init_device_mesh(device.type, (world_size,))
    return dist, device


def build_model(config: ModelConfig, dist: Distributed, device: torch.device) -> tuple[GPT, torch.nn.Module]:
    """``(model, wrapped)``: the model, and what the loop calls (a data-parallel wrapper under torchrun)."""
    if dist.fsdp2 and dist.world_size > 1:
        model = build_fsdp2_model(config, dist, device)
        return model, model
    if dist.world_size == 1:
        model = GPT(config).to(device)
        return model, model
    if not config.moe:
        model = GPT(config).to(device)
        ids = [device.index] if device.type == "cuda" else None
        return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    # Expert parallelism: each rank holds num_experts / W experts of every MoE layer; the tokens travel to their
    # experts through the all-to-all inside FMoE, and DistributedGroupedDataParallel averages the gradients of
    # everything but the experts over the data-parallel ranks.
    model = GPT(config, world_size=dist.world_size, moe_group=dist.group).to(device)
    return model, fastmoe.DistributedGroupedDataParallel(model)


def build_fsdp2_model(config: ModelConfig, dist: Distributed, device: torch.device) -> GPT:
    """The model on PyTorch's stack (``--parallel fsdp2``), in place:

    1. the MoE layers take ``dist.mesh["ep"]``: each holds ``num_experts / ep`` experts, DTensors of the whole
       layer's shape sharded over the experts (docs/distributed.md, 'DeviceMesh and DTensor experts');
    2. each MoE layer's experts go under ``fully_shard`` over ``dist.mesh["dp"]`` (the ranks holding the same
       experts), each block and then the whole model under ``fully_shard`` over every rank;
    3. every FSDP unit sums the gradients (divide factor 1; sums, not scaled sums, which gloo lacks). The loop
       scales the loss by 1 / W, so each gradient is that of the mean over every rank's tokens: the experts'
       already hold the sum over the 'ep' ranks, which FSDP2's own averaging over 'dp' would not account for
       (and torch 2.11 divides twice over a one-rank 'dp', docs/distributed.md).
    """
    from torch.distributed.fsdp import fully_shard

    ep_mesh = dist.mesh["ep"]
    if config.moe:
        model = GPT(config, world_size=ep_mesh.size(), moe_group=ep_mesh).to(device)
    else:
        model = GPT(config).to(device)
    units = []
    for layer in model.moe_layers():
        fully_shard(layer.experts, mesh=dist.mesh["dp"])
        units.append(layer.experts)
    for block in model.blocks:
        fully_shard(block, mesh=dist.world_mesh)
        units.append(block)
    fully_shard(model, mesh=dist.world_mesh)
    for unit in [*units, model]:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return model


def model_config(args, moe: bool) -> ModelConfig:
    d_ff = args.d_ff or 4 * args.d_model
    return ModelConfig(
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        seq_len=args.seq_len,
        d_ff=d_ff,
        moe=moe,
        moe_every=args.moe_every,
        num_experts=args.experts,
        top_k=args.top_k,
        expert_hidden=args.expert_hidden or max(1, d_ff // args.top_k),
        gate=args.gate,
        balance_coef=balance_coef(args),
        ffn_bias=args.ffn_bias,
    )


def balance_coef(args) -> float:
    if args.balance_coef is not None:
        return args.balance_coef
    return DEFAULT_BALANCE_COEF if args.gate == "naive" else 0.0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.steps is None and args.time_budget is None:
        args.steps = DEFAULT_STEPS
    # The thread count belongs to the run: a caller in the same process (a test, a notebook) gets its own back.
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(parser, args, sys.argv[1:] if argv is None else argv)
    finally:
        torch.set_num_threads(threads)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    """Trains and compares the models that the checked ``args`` (parsed from ``argv``) ask for; returns the exit
    code."""
    try:
        corpus = load_corpus(args.data, args.val_fraction)
    except CorpusError as error:
        raise SystemExit(f"fastmoe-train: {error}") from error
    check_corpus_fits(parser, args, corpus)
    out_dir = Path(args.out)
    names = ["moe", "dense"] if args.model == "both" else [args.model]
    resume = resume_plan(out_dir, names) if args.resume else dict.fromkeys(names, False)
    dist, device = setup_distributed(args.device, args.parallel, args.ep_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    loop_cfg = LoopConfig(
        steps=args.steps,
        time_budget=args.time_budget,
        batch_size=args.batch,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        precision=args.precision,
        eval_every=args.eval_every,
        eval_tokens=args.eval_tokens,
        log_every=args.log_every,
        ckpt_every=args.ckpt_every,
        stop_after=args.stop_after,
        seed=args.seed,
        progress=not args.no_progress,
    )
    if dist.is_main:
        print(
            f"fastmoe-train: {', '.join(names)} on {device} (x{dist.world_size}), {torch.get_num_threads()} CPU "
            f"threads, corpus {corpus.source}: {corpus.train.numel():,} train / {corpus.val.numel():,} validation "
            f"bytes; {args.batch} x {args.seq_len} tokens per step per rank{parallel_note(dist)}",
            flush=True,
        )
    trainers = []
    for position, name in enumerate(names):
        config = model_config(args, moe=name == "moe")
        torch.manual_seed(args.seed)  # both models start from the same RNG state, and resume reproduces it
        model, wrapped = build_model(config, dist, device)
        if dist.is_main:
            print(f"{name}: {describe(config)}", flush=True)
        try:
            run_dir = out_dir / name
            trainer = Trainer(name, model, wrapped, corpus, loop_cfg, device, run_dir, resume[name], dist, position)
        except checkpointing.ResumeError as error:
            raise SystemExit(f"fastmoe-train: --resume: {error}") from error
        trainers.append(trainer)
    results = (run_interleaved if args.schedule == "interleaved" else run_sequential)(trainers)
    if dist.is_main:
        header = (
            f"fastmoe-train {' '.join(argv)} | device {device} x{dist.world_size}, "
            f"{torch.get_num_threads()} threads | {time.strftime('%Y-%m-%d')}"
        )
        print(write_summary(results, out_dir, header))
        if args.stop_after is None:
            path = plot(results, out_dir / "val_loss.png", describe(model_config(args, True)))
            if path is not None:
                print(f"plot: {path}")
    if dist.world_size > 1:
        torch.distributed.destroy_process_group()
    return 0


def parallel_note(dist: Distributed) -> str:
    if not dist.fsdp2:
        return ""
    if dist.mesh is None:
        return "; --parallel fsdp2 in one process: the plain model, fastmoe.checkpoint checkpoints"
    dp, ep = dist.mesh.shape
    return f"; --parallel fsdp2: FSDP2 over a (dp={dp}, ep={ep}) DeviceMesh, fastmoe.checkpoint checkpoints"


def resume_plan(out_dir: Path, names: list[str]) -> dict[str, bool]:
    """Which models ``--resume`` continues: those with a checkpoint in ``out_dir/<model>``. A model without one
    (an interrupted ``--schedule sequential`` run that had not reached it) starts from step 0, which is said;
    with no checkpoint at all there is nothing to resume, and that is an error naming the folder."""
    plan = {name: checkpointing.has_checkpoint(out_dir / name) for name in names}
    if not any(plan.values()):
        folders = " or ".join(str(out_dir / name / checkpointing.CHECKPOINT_DIR) for name in names)
        raise SystemExit(
            f"fastmoe-train: --resume: {out_dir} holds no checkpoint to resume (none in {folders}); leave out "
            "--resume to start a new run there"
        )
    for name, found in plan.items():
        if not found and int(os.environ.get("RANK", "0")) == 0:
            print(f"fastmoe-train: --resume: {name} has no checkpoint in {out_dir / name}; it starts from step 0")
    return plan


def describe(config: ModelConfig) -> str:
    text = f"{config.n_layers} layers, d_model {config.d_model}, seq {config.seq_len}"
    if config.moe:
        balance = f" + balance loss {config.balance_coef:g}" if config.balance_coef > 0 else ""
        return (
            f"{text}, MoE every {config.moe_every}: {config.num_experts} experts x {config.expert_hidden} "
            f"top-{config.top_k} ({config.gate} gate{balance})"
        )
    return f"{text}, dense FFN {config.top_k * config.expert_hidden} at the MoE positions, {config.d_ff} elsewhere"
