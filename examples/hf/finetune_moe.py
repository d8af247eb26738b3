"""Fine-tune small Hugging Face MoE models on fastmoe, on the fortunes corpus read as bytes.

Both models are built in code with random weights (nothing is downloaded) and trained with AdamW on windows of
the corpus that ``fastmoe-train`` uses (``fastmoe.train.data``: Debian's fortunes, byte-level, vocabulary 256):

- ``mixtral``: a ``MixtralForCausalLM`` whose experts run on fastmoe through transformers' experts interface
  (``fastmoe.use_fastmoe``); the routing rule, the aux loss and the state dict stay transformers' own. After training,
  the step time of the same model on transformers' own experts (``fastmoe.restore_hf``) and on fastmoe is measured
  on the same batch.
- ``llama``: a dense ``LlamaForCausalLM``, trained for ``--dense-steps``, then upcycled with ``fastmoe.moefy``
  (every FFN becomes a fastmoe MoE layer whose experts are noisy copies of it, with a new router) and fine-tuned.

    python examples/hf/finetune_moe.py [--model both|mixtral|llama] [--steps 200] [--device auto] [--seed 0]

Prints the loss every ``--log-every`` steps and exits non-zero when a model's training loss did not fall.
docs/integrations.md describes both integrations.
"""

import argparse
import functools
import math
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import fastmoe
from fastmoe.gates import NaiveGate
from fastmoe.train.data import VOCAB_SIZE, CorpusError, WindowSampler, load_corpus, validation_windows

try:
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
except ImportError as error:  # the hf extra: pip install --no-build-isolation ".[hf]"
    sys.exit(f"this example needs Hugging Face transformers >= 5 (pip install 'transformers>=5,<6'): {error}")

HF_EXPERTS = ("grouped_mm", "eager", "batched_mm")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="both", choices=["both", "mixtral", "llama"], help="default: both")
    parser.add_argument("--steps", type=int, default=200, help="training steps per model (default 200)")
    parser.add_argument(
        "--dense-steps", type=int, default=None, help="llama: dense steps before moefy (default: half of --steps)"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1")
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "bf16"], help="bf16: autocast (default: bf16 on cuda)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--d-ffn", type=int, default=256, help="width of an expert (and of llama's dense FFN)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.01, help="llama: moefy's relative noise on the copies")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=None, help="default: a tenth of --steps")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="validation tokens for the eval loss")
    parser.add_argument(
        "--hf-experts", default="grouped_mm", choices=HF_EXPERTS, help="mixtral: transformers' experts implementation "
        "timed against fastmoe (default grouped_mm, transformers' default)"
    )  # fmt: skip
    parser.add_argument("--time-steps", type=int, default=10, help="mixtral: timed steps per implementation (0: skip)")
    parser.add_argument("--data", default=None, help="a text file or folder instead of the fortunes corpus")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "seq_len", "d_model", "d_ffn", "layers", "heads", "experts", "top_k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("dense_steps", "log_every", "time_steps"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "log_every" else 0):
            parser.error(f"--{name.replace('_', '-')} must be >= {1 if name == 'log_every' else 0}, got {value}")
    if args.top_k > args.experts:
        parser.error(f"--top-k must be <= --experts = {args.experts}, got {args.top_k}")
    if args.d_model % args.heads or (args.d_model // args.heads) % 2:
        parser.error(f"--d-model must be a multiple of 2 * --heads = {2 * args.heads}, got {args.d_model}")
    if args.noise < 0:
        parser.error(f"--noise must be >= 0, got {args.noise}")
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.dense_steps is None:
        args.dense_steps = args.steps // 2
    if args.log_every is None:
        args.log_every = max(1, args.steps // 10)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here (use --device cpu or auto)")
    if args.precision == "auto":
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    return args


class Run:
    """What both models share: the corpus windows, the device, autocast and the training loop."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        corpus = load_corpus(args.data)
        self.corpus = corpus
        self.val = validation_windows(corpus.val, args.seq_len, args.eval_tokens).to(self.device)

    def autocast(self):
        if self.args.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def sampler(self, seed_offset: int) -> WindowSampler:
        return WindowSampler(self.corpus.train, self.args.batch, self.args.seq_len, self.args.seed + seed_offset)

    def next_batch(self, sampler: WindowSampler):
        inputs, targets = sampler.next_batch()
        return inputs.to(self.device), targets.to(self.device)

    def cross_entropy(self, model, inputs, targets, **kwargs):
        """(next-token cross-entropy, the model's output)."""
        with self.autocast():
            out = model(input_ids=inputs, **kwargs)
        logits = out.logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)), out

    @torch.no_grad()
    def eval_loss(self, model) -> float:
        was_training = model.training
        model.eval()
        loss = self.cross_entropy(model, self.val[:, :-1], self.val[:, 1:])[0].item()
        model.train(was_training)
        return loss

    def train(self, name: str, model, steps: int, total_loss, sampler) -> list:
        """``steps`` AdamW steps of ``total_loss(model, inputs, targets) -> (loss to minimise, cross-entropy)``;
        returns the cross-entropy of every step."""
        args = self.args
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        model.train()
        losses = []
        start = time.perf_counter()
        for step in range(1, steps + 1):
            inputs, targets = self.next_batch(sampler)
            loss, ce = total_loss(model, inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(ce.item())
            if step % args.log_every == 0 or step == steps:
                recent = losses[-args.log_every :]
                elapsed = time.perf_counter() - start
                print(
                    f"[{name}] step {step:4d}/{steps}  loss {losses[-1]:.3f}  (mean of the last {len(recent)}: "
                    f"{statistics.fmean(recent):.3f})  {elapsed:6.1f}s",
                    flush=True,
                )
        return losses

    def report_fall(self, name: str, losses: list) -> bool:
        window = max(1, min(20, len(losses) // 5))
        first, last = statistics.fmean(losses[:window]), statistics.fmean(losses[-window:])
        fell = last < first
        print(
            f"[{name}] training loss, mean of the first {window} steps {first:.3f} -> of the last {window} steps "
            f"{last:.3f}: {'fell' if fell else 'DID NOT FALL'}",
            flush=True,
        )
        return fell


def count(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"


def model_shape(args) -> dict:
    """The config fields both models share: the same width, depth and attention."""
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.d_model,
        intermediate_size=args.d_ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2),
        max_position_embeddings=args.seq_len,
    )


def run_mixtral(run: Run) -> bool:
    args = run.args
    torch.manual_seed(args.seed)
    config = MixtralConfig(
        **model_shape(args),
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        experts_implementation=args.hf_experts,
    )
    model = MixtralForCausalLM(config).to(run.device)
    fastmoe.use_fastmoe(model)  # the experts now run on fastmoe; weights, routing and aux loss unchanged
    print(
        f"[mixtral] MixtralForCausalLM, {args.layers} layers x {args.experts} experts (top-{args.top_k}), "
        f"d_model {args.d_model}, expert width {args.d_ffn}, {count(model)}; experts implementation "
        f"{model.config._experts_implementation!r}",
        flush=True,
    )

    def total_loss(model, inputs, targets):
        ce, out = run.cross_entropy(model, inputs, targets, output_router_logits=True)
        return ce + model.config.router_aux_loss_coef * out.aux_loss.float(), ce

    before = run.eval_loss(model)
    losses = run.train("mixtral", model, args.steps, total_loss, run.sampler(0))
    after = run.eval_loss(model)
    print(f"[mixtral] validation loss {before:.3f} -> {after:.3f}", flush=True)
    fell = run.report_fall("mixtral", losses)
    if args.time_steps:
        compare_step_time(run, model, total_loss)
    return fell


def compare_step_time(run: Run, model, total_loss) -> None:
    """The same model, weights and batch on transformers' experts (restore_hf) and on fastmoe (use_fastmoe):
    the loss of each on one batch, then the median time of a training step (forward, loss, backward, AdamW step),
    the two implementations taking turns step by step."""
    args, device = run.args, run.device
    hf_name = args.hf_experts
    inputs, targets = run.next_batch(run.sampler(1))
    switch = {hf_name: fastmoe.restore_hf, "fastmoe": fastmoe.use_fastmoe}
    with torch.no_grad():
        loss = {}
        for impl, to in switch.items():
            to(model)
            loss[impl] = total_loss(model, inputs, targets)[0].item()
    print(
        f"[mixtral] the same batch on both: loss {loss[hf_name]:.6f} ({hf_name}), {loss['fastmoe']:.6f} (fastmoe)",
        flush=True,
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def step():
        loss = total_loss(model, inputs, targets)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    times = {impl: [] for impl in switch}
    for to in switch.values():  # warm-up: allocator, kernels, the optimizer's state
        to(model)
        for _ in range(2):
            step()
    for _ in range(args.time_steps):
        for impl, to in switch.items():
            to(model)
            times[impl].append(timed())
    hf_ms, ours = statistics.median(times[hf_name]), statistics.median(times["fastmoe"])
    tokens = args.batch * args.seq_len
    print(
        f"[mixtral] training step, median of {args.time_steps}, batch {args.batch} x {args.seq_len} = {tokens} tokens, "
        f"{device}, {args.precision}:",
        flush=True,
    )
    print(f"[mixtral]   transformers ({hf_name}): {hf_ms:8.2f} ms", flush=True)
    print(f"[mixtral]   fastmoe:{' ' * (len(hf_name) + 9)}{ours:8.2f} ms", flush=True)
    verdict = "fastmoe faster" if hf_ms > ours else "fastmoe slower"
    print(f"[mixtral]   ratio {hf_name} / fastmoe = {hf_ms / ours:.2f}x ({verdict})", flush=True)
    if device.type == "cpu":
        print(
            "[mixtral]   (on the CPU, and at this size, the times are informative only: fastmoe's speed is the GPU's "
            "grouped GEMM; run with --device cuda on a GPU machine)",
            flush=True,
        )


def run_llama(run: Run) -> bool:
    args = run.args
    torch.manual_seed(args.seed)
    config = LlamaConfig(**model_shape(args))
    model = LlamaForCausalLM(config).to(run.device)
    print(
        f"[llama] LlamaForCausalLM, {args.layers} layers, d_model {args.d_model}, FFN width {args.d_ffn}, "
        f"{count(model)}",
        flush=True,
    )

    def dense_loss(model, inputs, targets):
        ce = run.cross_entropy(model, inputs, targets)[0]
        return ce, ce

    sampler = run.sampler(2)
    if args.dense_steps:
        print(f"[llama] {args.dense_steps} dense steps first", flush=True)
        run.train("llama-dense", model, args.dense_steps, dense_loss, sampler)
    dense = run.eval_loss(model)

    # Every FFN becomes a fastmoe MoE layer of noisy copies of it, with a new router and a balance loss.
    fastmoe.moefy(
        model,
        num_expert=args.experts,
        top_k=args.top_k,
        gate=functools.partial(NaiveGate, balance_coef=0.01),
        noise=args.noise,
    )
    moe_layers = [m for m in model.modules() if isinstance(m, fastmoe.FMoE)]
    upcycled = run.eval_loss(model)
    print(
        f"[llama] moefy: {len(moe_layers)} FFNs -> {type(moe_layers[0]).__name__} x {args.experts} experts "
        f"(top-{args.top_k}, noise {args.noise}), {count(model)}; validation loss dense {dense:.3f}, "
        f"upcycled {upcycled:.3f}",
        flush=True,
    )

    def moe_loss(model, inputs, targets):
        ce = run.cross_entropy(model, inputs, targets)[0]
        return ce + sum(layer.get_loss() for layer in moe_layers), ce

    losses = run.train("llama-moe", model, args.steps, moe_loss, sampler)
    after = run.eval_loss(model)
    print(f"[llama] validation loss {upcycled:.3f} (upcycled) -> {after:.3f} (fine-tuned)", flush=True)
    return run.report_fall("llama-moe", losses)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run = Run(args)
    except CorpusError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"fastmoe {fastmoe.__version__}, torch {torch.__version__}, device {run.device}, {args.precision}; corpus "
        f"{run.corpus.source} ({run.corpus.num_bytes / 1e6:.1f} MB, byte-level, vocabulary {VOCAB_SIZE}, "
        f"uniform loss {math.log(VOCAB_SIZE):.3f}); batch {args.batch} x {args.seq_len}, AdamW lr {args.lr}",
        flush=True,
    )
    start = time.perf_counter()
    results = {}
    if args.model in ("both", "mixtral"):
        results["mixtral"] = run_mixtral(run)
    if args.model in ("both", "llama"):
        results["llama"] = run_llama(run)
    failed = [name for name, fell in results.items() if not fell]
    print(f"done in {time.perf_counter() - start:.1f}s", flush=True)
    if failed:
        print(f"FAILED: the training loss did not fall for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
