"""What the fastmoe-train tests share: the tiny flags, a corpus that exists on any machine, the summary reader,
a single-file checkpoint of the earlier format, and the body of the two-rank replica check (module-level, so
that dist_harness can run it in spawned processes)."""

import json
import os
from pathlib import Path

import torch

from fastmoe.train import cli
from fastmoe.train.data import DEFAULT_CORPUS, WindowSampler, load_corpus
from fastmoe.train.loop import Distributed, LoopConfig, make_optimizer
from fastmoe.train.model import GPT

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--d-model",
    "32",
    "--layers",
    "2",
    "--heads",
    "2",
    "--seq-len",
    "32",
    "--batch",
    "8",
    "--experts",
    "4",
    "--top-k",
    "2",
    "--eval-tokens",
    "2048",
    "--warmup",
    "5",
    "--lr",
    "1e-2",
    "--no-progress",
]


def make_corpus(tmp_path_factory) -> Path:
    """The default corpus when it is installed, else a generated English-like text (so the tests run anywhere)."""
    if DEFAULT_CORPUS.exists():
        return DEFAULT_CORPUS
    words = "the of and to in is that it for as with was on be by this are from or an at which not have".split()
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(words), (60_000,), generator=gen).tolist()
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(" ".join(words[i] for i in picks))
    return path


def summary(out: Path) -> dict:
    return {m["name"]: m for m in json.loads((out / "summary.json").read_text())["models"]}


def subprocess_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))


def write_legacy_checkpoint(run_dir: Path, argv: list, corpus_file: Path) -> Path:
    """``run_dir/checkpoint.pt`` as fastmoe-train wrote it before its checkpoints became fastmoe.checkpoint
    folders (format 1: one torch.save'd dict), for the MoE model of ``argv`` at step 0, one process."""
    args = cli.build_parser().parse_args(argv)
    config = cli.model_config(args, moe=True)
    torch.manual_seed(args.seed)
    model = GPT(config)
    optimizer = make_optimizer(model, LoopConfig(weight_decay=args.weight_decay))
    sampler = WindowSampler(load_corpus(corpus_file).train, args.batch, args.seq_len, seed=args.seed)
    payload = {
        "format_version": 1,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sampler": sampler.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "step": 0,
        "train_time": 0.0,
        "history": [{"step": 0, "time": 0.0, "tokens": 0, "val_loss": 5.5}],
        "config": {
            **config.to_dict(),
            "batch_size": args.batch,
            "seed": args.seed,
            "data": str(corpus_file),
            "world_size": 1,
        },
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "checkpoint.pt"
    torch.save(payload, path)
    return path


def replica_check_body(rank: int, world_size: int, perturb: bool) -> list:
    """Rank ``rank`` of an expert-parallel GPT under DistributedGroupedDataParallel (which makes the replicas
    equal); with ``perturb`` rank 1 then changes its copy of the final norm's weight. Returns what
    :func:`replica_mismatches` finds."""
    import fastmoe
    from fastmoe.train.loop import replica_mismatches

    args = cli.build_parser().parse_args(["--d-model", "16", "--heads", "2", "--layers", "2", "--experts", "4"])
    group = torch.distributed.group.WORLD
    model = GPT(cli.model_config(args, moe=True), world_size=world_size, moe_group=group)
    fastmoe.DistributedGroupedDataParallel(model)
    if perturb and rank == 1:
        with torch.no_grad():
            model.norm.weight.add_(1.0)
    return replica_mismatches(model, Distributed(rank=rank, world_size=world_size, group=group))
