"""The training loop of one model: AdamW, warm-up then cosine learning rate, validation at intervals, a tqdm
bar with loss, tokens/s and load-balance statistics, atomic checkpoints and resume. Under torchrun the model is
data-parallel in one of two ways (``Distributed.parallel``): ``ddp``, fastmoe's DistributedGroupedDataParallel (torch
DDP for the dense model), or ``fsdp2``, a DeviceMesh with DTensor experts under FSDP2; both keep fastmoe.checkpoint
folders."""

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import fastmoe.distributed
from fastmoe import balance
from fastmoe.train import checkpointing
from fastmoe.train.data import Corpus, WindowSampler, validation_windows
from fastmoe.train.model import GPT, parameter_counts


@dataclass
class LoopConfig:
    steps: int | None = None  # stop after this many optimizer steps (None: only the time budget)
    time_budget: float | None = None  # stop once this many seconds of training (evaluation excluded) have run
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "fp32"
    eval_every: int = 50
    eval_tokens: int = 16384
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end
    stop_after: int | None = None  # leave after this step as an interrupted run would (checkpoint, no final eval)
    seed: int = 0
    progress: bool = True


@dataclass
class Distributed:
    """The process's place in a torchrun job (world_size 1 without one) and how the job is parallel: ``parallel``
    is ``"ddp"`` or ``"fsdp2"``; with ``fsdp2`` under torchrun, ``mesh`` is the ("dp", "ep") DeviceMesh and
    ``world_mesh`` the 1-D mesh of every rank (both None in one process, which trains the plain model)."""

    rank: int = 0
    world_size: int = 1
    group: object = None
    parallel: str = "ddp"
    mesh: object = None
    world_mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp2(self) -> bool:
        return self.parallel == "fsdp2"


@dataclass
class RunResult:
    name: str
    steps: int
    train_time: float
    tokens: int
    final_val_loss: float
    final_train_loss: float
    params_total: int
    params_active: int
    history: list = field(default_factory=list)  # [{"step", "time", "tokens", "val_loss"}]
    balance: dict = field(default_factory=dict)  # fastmoe.balance.collect keys, over every rank's tokens
    replicas_equal: bool | None = None  # under torchrun: every rank ends with the same replicated parameters

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_time if self.train_time > 0 else float("nan")


def learning_rate(cfg: LoopConfig, step: int, train_time: float) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay to ``min_lr_ratio * lr`` over the rest of the
    run, whose progress is ``(step - warmup) / (steps - warmup)`` or ``train_time / time_budget`` (the larger,
    when both are set)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = 0.0
    if cfg.steps:
        progress = max(progress, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    if cfg.time_budget:
        progress = max(progress, train_time / cfg.time_budget)
    progress = min(progress, 1.0)
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * ratio


def make_optimizer(model: torch.nn.Module, cfg: LoopConfig, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only. On the CPU and on CUDA it is torch's fused implementation
    (one kernel over all parameters, the same update as the default multi-tensor one): the step costs time in
    proportion to the parameter count, which is 5.4x larger for the MoE model at the defaults (all experts are
    updated every step), and the fused step is 4x faster there (18 -> 4 ms on one CPU thread). ``fused=False``
    takes torch's multi-tensor (foreach) implementation instead, for comparison (tools/profile_train_step.py)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device = next(model.parameters()).device
    if not fused:
        implementation = {"foreach": True}
    else:
        implementation = {"fused": True} if device.type in ("cpu", "cuda") else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), **implementation)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int, device, precision: str, dist: Distributed) -> float:
    """Mean next-byte cross-entropy (nats) over the fixed validation windows (averaged over ranks)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, windows.shape[0], batch_size):
        chunk = windows[start : start + batch_size].to(device)
        with autocast(device, precision):
            logits = model(chunk[:, :-1])
        total += lm_loss(logits, chunk[:, 1:]).double() * chunk.shape[0]
    model.train(was_training)
    if dist.world_size > 1:
        torch.distributed.all_reduce(total, group=None)
        total /= dist.world_size
    return float(total) / windows.shape[0]


@contextlib.contextmanager
def _global_balance_records(model, dist: Distributed):
    """Within it, every MoE layer's ``balance_record`` counts the tokens of every rank, so that
    ``balance.collect`` reports the whole expert-parallel step rather than this rank's share: the token, slot,
    expert and drop counts are summed over the ranks and the gate's loss terms averaged (each rank's is a mean
    over its own tokens). One all-reduce for all layers; the layers' own records come back on exit."""
    layers = [layer for _, layer in balance.moe_layers(model) if layer.balance_record is not None]
    if dist.world_size == 1 or not layers:
        yield
        return
    records = [layer.balance_record for layer in layers]
    device = records[0].expert_counts.device
    parts = []
    for record in records:
        dropped = record.num_dropped if record.num_dropped is not None else torch.zeros((), device=device)
        parts += [
            torch.tensor([record.num_tokens, record.num_slots], dtype=torch.float64, device=device),
            record.expert_counts.to(device=device, dtype=torch.float64),
            dropped.to(device=device, dtype=torch.float64).reshape(1),
            *(loss.to(device=device, dtype=torch.float64).sum().reshape(1) for loss in record.losses.values()),
        ]
    flat = torch.cat(parts)
    torch.distributed.all_reduce(flat, group=dist.group)
    values, start = flat.tolist(), 0  # float64 holds counts exactly up to 2**53
    for layer, record in zip(layers, records, strict=True):
        num_experts = record.expert_counts.numel()
        num_tokens, num_slots = (int(round(v)) for v in values[start : start + 2])
        counts = values[start + 2 : start + 2 + num_experts]
        dropped = values[start + 2 + num_experts]
        losses = values[start + 3 + num_experts : start + 3 + num_experts + len(record.losses)]
        start += 3 + num_experts + len(record.losses)
        layer.balance_record = balance.BalanceRecord(
            num_tokens=num_tokens,
            num_slots=num_slots,
            expert_counts=torch.tensor([round(c) for c in counts], dtype=torch.int64),
            num_dropped=None if record.num_dropped is None else torch.tensor(round(dropped), dtype=torch.int64),
            losses={name: torch.tensor(v / dist.world_size) for name, v in zip(record.losses, losses, strict=True)},
        )
    try:
        yield
    finally:
        for layer, record in zip(layers, records, strict=True):
            layer.balance_record = record


def replica_mismatches(model: GPT, dist: Distributed) -> list[str]:
    """The names of the replicated parameters (all but the experts) whose value on some rank differs bitwise
    from rank 0's. Gradient averaging keeps the replicas equal, so a name here means a parameter whose gradient
    was not averaged. One broadcast per parameter: for the end of a run, not for every step."""
    experts = {id(p) for layer in model.moe_layers() for p in layer.experts.parameters()}
    names, differs = [], []
    for name, param in model.named_parameters():
        if id(param) in experts:
            continue
        reference = param.detach().clone()
        torch.distributed.broadcast(reference, src=0, group=dist.group)
        names.append(name)
        differs.append(0.0 if torch.equal(reference, param.detach()) else 1.0)
    flags = torch.tensor(differs, dtype=torch.float64, device=next(model.parameters()).device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=dist.group)
    return [name for name, flag in zip(names, flags.tolist(), strict=True) if flag]


def trim_log(path: Path, step: int, history: list) -> int:
    """Keeps the records of ``path`` (log.jsonl) that the checkpoint of ``step`` covers: every record before
    ``step``, its training record, and its evaluation only when ``history`` ends with it (a run stopped after
    the final evaluation but before the checkpoint that followed evaluates again). Returns how many records it
    dropped (a torn last line counts)."""
    if not path.exists():
        return 0
    evaluated_at_step = bool(history) and history[-1]["step"] == step
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            keep = record["step"] < step or (
                record["step"] == step and (record["event"] != "eval" or evaluated_at_step)
            )
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)
    return dropped


def _balance_postfix(model) -> dict:
    stats = balance.collect(model)  # one host sync for every MoE layer
    if not stats:
        return {}
    return {
        "max/mean": f"{stats['moe/all/max_over_mean']:.2f}",
        "cv": f"{stats['moe/all/load_cv']:.2f}",
        "drop": f"{stats['moe/all/drop_rate']:.3f}",
    }


def _done(cfg: LoopConfig, step: int, train_time: float) -> bool:
    if cfg.steps is not None and step >= cfg.steps:
        return True
    return cfg.time_budget is not None and train_time >= cfg.time_budget


class Trainer:
    """Trains one model a step at a time, so that two trainers can take turns (see :func:`run_interleaved`).

    Each trainer keeps its own torch RNG state and swaps it in for its steps, so its results do not depend on
    what else runs in the process. Writes ``run_dir/checkpoint/`` (see :mod:`fastmoe.train.checkpointing`),
    ``run_dir/config.json`` and ``run_dir/log.jsonl``; ``ddp_model`` is ``model`` or its data-parallel wrapper.
    With ``resume`` it continues from the checkpoint in ``run_dir`` (an error when there is none, see
    :class:`checkpointing.ResumeError`) and keeps the log up to the resumed step; without, it removes what a
    previous run left in ``run_dir``.
    """

    def __init__(
        self,
        name: str,
        model: GPT,
        ddp_model: torch.nn.Module,
        corpus: Corpus,
        cfg: LoopConfig,
        device: torch.device,
        run_dir: Path,
        resume: bool,
        dist: Distributed | None = None,
        bar_position: int = 0,
    ):
        self.name, self.model, self.ddp_model, self.cfg, self.device = name, model, ddp_model, cfg, device
        self.dist = dist or Distributed()
        run_dir.mkdir(parents=True, exist_ok=True)
        seq_len = model.config.seq_len
        self.optimizer = make_optimizer(model, cfg)
        self.sampler = WindowSampler(corpus.train, cfg.batch_size, seq_len, seed=cfg.seed + self.dist.rank)
        self.val = validation_windows(corpus.val, seq_len, cfg.eval_tokens)
        self.run_dir = run_dir
        self.log_path = run_dir / "log.jsonl"
        self.identity = {
            **model.config.to_dict(),
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "data": corpus.source,
            "world_size": self.dist.world_size,
        }
        self.tokens_per_step = cfg.batch_size * seq_len * self.dist.world_size
        self.step, self.train_time, self.tokens, self.history = 0, 0.0, 0, []
        self.rng = checkpointing.rng_state()  # the caller seeded torch for this model just before
        self.last_loss = float("nan")
        self.stopped = False
        self.saved = None  # (step, evaluations) of the newest checkpoint, so that finish() does not repeat it
        if resume:
            self._resume()
        elif self.dist.is_main:
            removed = checkpointing.remove(run_dir)
            if removed:
                listed = ", ".join(p.name for p in removed)
                self._write(f"{name}: a new run in {run_dir} (without --resume): removed the previous {listed}")
        if not self.history:
            self.validate()
        steps_bar = cfg.steps is not None
        self.bar = tqdm(
            total=cfg.steps if steps_bar else int(math.ceil(cfg.time_budget)),
            initial=self.step if steps_bar else int(self.train_time),
            desc=f"{name:5s}",
            unit="step",
            # With a time budget the bar counts trained seconds, so tqdm's rate would read "s/s": leave it out.
            bar_format=None if steps_bar else "{l_bar}{bar}| {n}/{total} s trained [{elapsed}<{remaining}{postfix}]",
            disable=not (cfg.progress and self.dist.is_main),
            dynamic_ncols=True,
            leave=True,
            position=bar_position,
        )
        self.postfix = {"val": f"{self.history[-1]['val_loss']:.3f}"}
        self.window_tokens, self.window_time = 0, 0.0

    def _resume(self) -> None:
        state, error = None, None
        try:
            state = checkpointing.load(
                self.run_dir,
                model=self.model,
                optimizer=self.optimizer,
                sampler=self.sampler,
                config=self.identity,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                parallel=self.dist.parallel,
            )
        except checkpointing.ResumeError as exc:
            error = exc
        if self.dist.world_size > 1:
            # A rank whose own part failed (its RNG state, its file of the earlier format) must stop the others
            # too: they would wait for it in the first collective of the run.
            messages = [None] * self.dist.world_size
            torch.distributed.all_gather_object(messages, None if error is None else str(error), group=self.dist.group)
            failed = [f"rank {rank}: {message}" for rank, message in enumerate(messages) if message is not None]
            if failed and error is None:
                error = checkpointing.ResumeError("; ".join(failed))
        if error is not None:
            raise error
        self.step, self.train_time, self.tokens = state["step"], state["train_time"], state["tokens"]
        self.history, self.rng = state["history"], state["rng"]
        self.saved = (self.step, len(self.history))
        message = f"{self.name}: resumed from {state['where']} at step {self.step} ({self.train_time:.1f} s trained)"
        saved_by = state["saved_world_size"]
        if saved_by != self.dist.world_size:
            resharded = (
                "the model and optimizer state are resharded by DCP" if self.dist.fsdp2 else "the experts are resharded"
            )
            message += (
                f"; it was saved by {saved_by} process(es), this run has {self.dist.world_size}: {resharded}, and "
                "the data order and random state restart from --seed and the step"
            )
        if self.dist.is_main:
            dropped = trim_log(self.log_path, self.step, self.history)
            if dropped:
                message += f"; {self.log_path} keeps its records up to step {self.step} ({dropped} later dropped)"
        self._write(message)

    def _write(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message)

    def log(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self.log_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def save(self) -> None:
        if self.saved == (self.step, len(self.history)):
            return
        with self._own_rng():
            checkpointing.save(
                self.run_dir,
                model=self.model,
                optimizer=self.optimizer,
                sampler=self.sampler,
                extra={
                    "step": self.step,
                    "train_time": self.train_time,
                    "tokens": self.tokens,
                    "history": self.history,
                    "config": self.identity,
                    "world_size": self.dist.world_size,
                },
                is_main=self.dist.is_main,
            )
        self.saved = (self.step, len(self.history))

    def validate(self) -> float:
        with self._own_rng():  # evaluation draws no random numbers today; if a gate ever does, they stay ours
            val_loss = evaluate(
                self.ddp_model, self.val, self.cfg.batch_size, self.device, self.cfg.precision, self.dist
            )
        point = {
            "step": self.step,
            "time": self.train_time,
            "tokens": self.tokens,
            "val_loss": val_loss,
        }
        self.history.append(point)
        self.log({"event": "eval", **point})
        return val_loss

    @contextlib.contextmanager
    def _own_rng(self):
        checkpointing.set_rng_state(self.rng)
        try:
            yield
        finally:
            self.rng = checkpointing.rng_state()

    @property
    def done(self) -> bool:
        return self.stopped or _done(self.cfg, self.step, self.train_time)

    def train_step(self) -> None:
        cfg, model = self.cfg, self.model
        lr = learning_rate(cfg, self.step, self.train_time)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self._own_rng():
            inputs, targets = self.sampler.next_batch()
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            start = time.perf_counter()
            with autocast(self.device, cfg.precision):
                logits = self.ddp_model(inputs)
            loss = lm_loss(logits, targets)
            aux = model.balance_loss()
            objective = loss if aux is None else loss + aux
            if self.dist.fsdp2 and self.dist.world_size > 1:
                # FSDP2 sums the gradients over the ranks (divide factor 1, see cli.build_model) and the experts'
                # already hold the sum over the "ep" ranks: scaled by 1/W, every gradient is that of the mean over
                # every rank's tokens, as with the data-parallel average of the ddp path.
                objective = objective / self.dist.world_size
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if hasattr(self.ddp_model, "allreduce_params"):  # FastMoE's DistributedGroupedDataParallel convention
                self.ddp_model.allreduce_params()
            if cfg.grad_clip > 0:
                # expert-parallel: the norm over every rank's experts, the same scale on every rank
                clip = getattr(self.ddp_model, "clip_grad_norm_", None)
                if clip is not None:
                    clip(cfg.grad_clip)
                elif self.dist.fsdp2:  # DTensor parameters: their norm over every shard
                    fastmoe.distributed.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                else:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.last_loss = loss.item()  # the one host sync of a step, so the step time below is real
            elapsed = time.perf_counter() - start
            if self.dist.world_size > 1:
                # Every rank must see the same training time: it sets the learning rate, the end of a
                # --time-budget run and which model takes the next turn, and ranks that disagree on any of
                # those call different collectives (or train replicas apart). The slowest rank's time counts.
                elapsed = _max_over_ranks(elapsed, self.device)
        self.train_time += elapsed
        self.step += 1
        self.tokens += self.tokens_per_step
        self.window_tokens += self.tokens_per_step
        self.window_time += elapsed
        if not math.isfinite(self.last_loss):
            raise FloatingPointError(
                f"{self.name}: the training loss is {self.last_loss} at step {self.step}; lower --lr"
            )
        if self.step % cfg.log_every == 0:
            tokens_per_s = self.window_tokens / self.window_time
            self.postfix.update(loss=f"{self.last_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_s:,.0f}")
            self.postfix.update(_balance_postfix(model))
            self.log(
                {
                    "event": "train",
                    "step": self.step,
                    "time": self.train_time,
                    "loss": self.last_loss,
                    "lr": lr,
                    "tokens_per_s": tokens_per_s,
                }
            )
            self.window_tokens, self.window_time = 0, 0.0
        if cfg.eval_every and self.step % cfg.eval_every == 0 and not self.done:
            self.postfix["val"] = f"{self.validate():.3f}"
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(
            (self.step if cfg.steps is not None else min(int(self.train_time), self.bar.total)) - self.bar.n
        )
        if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
            self.save()
        if cfg.stop_after is not None and self.step >= cfg.stop_after:
            self.stopped = True

    def finish(self) -> RunResult:
        """Final validation (unless interrupted by ``stop_after``), a last checkpoint, and the result."""
        if not self.stopped and self.history[-1]["step"] != self.step:
            self.postfix["val"] = f"{self.validate():.3f}"
            self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.close()
        self.save()
        total, active = parameter_counts(self.model)
        stats = {}
        if self.model.moe_layers() and self.step > 0:
            with _global_balance_records(self.model, self.dist):
                stats = balance.collect(self.model)
        replicas_equal = None
        if self.dist.world_size > 1 and not self.dist.fsdp2:  # FSDP2 shards every parameter: no replicas
            mismatches = replica_mismatches(self.model, self.dist)
            replicas_equal = not mismatches
            if mismatches:
                self._write(
                    f"{self.name}: WARNING: the ranks' copies of {', '.join(mismatches)} differ at the end: their "
                    "gradients were not averaged over the ranks"
                )
        return RunResult(
            name=self.name,
            steps=self.step,
            train_time=self.train_time,
            tokens=self.tokens,
            final_val_loss=self.history[-1]["val_loss"],
            final_train_loss=self.last_loss,
            params_total=total,
            params_active=active,
            history=self.history,
            balance=stats,
            replicas_equal=replicas_equal,
        )


def _max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def run_sequential(trainers: list[Trainer]) -> list[RunResult]:
    """Each model trains to its end before the next starts."""
    results = []
    for trainer in trainers:
        while not trainer.done:
            trainer.train_step()
        results.append(trainer.finish())
    return results


def run_interleaved(trainers: list[Trainer]) -> list[RunResult]:
    """The models take turns, one step at a time, always the one with the least training time so far, so that
    they see the same machine (other load, clock boosts, thermal state) at the same point of their training time,
    which is what an equal-wall-time comparison needs on a shared machine. Results do not depend on the order:
    every trainer has its own data sampler and RNG state."""
    while any(not t.done for t in trainers):
        min(trainers, key=lambda t: (t.done, t.train_time)).train_step()
    return [t.finish() for t in trainers]
