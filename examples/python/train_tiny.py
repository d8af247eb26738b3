"""Train a tiny character-level language model whose feed-forward blocks are fastmoe MoE layers.

Runs on the CPU in well under a minute on the embedded corpus below, printing the loss as it goes, and exits
non-zero if the loss did not fall: the smallest complete example. The full training program with a dense
baseline, plots and checkpoints is `python -m fastmoe.train` (`make demo`); CI runs this one with --steps 15.

    python examples/python/train_tiny.py [--steps 200] [--experts 4] [--top-k 2] [--device cpu]
"""

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastmoe

CORPUS = """\
A mixture of experts layer keeps many feed forward networks and sends every token to a few of them.
A small gate looks at the token and scores each expert; the best k experts process the token, and their
outputs are added together, weighted by the scores. Because each token visits only k experts, the model
can hold many more parameters than it spends compute on. The experts see different tokens, so they learn
different things, and the gate learns which expert suits which token. Training keeps the load balanced so
that no expert is starved and none is flooded. The same idea scales from one processor to many machines,
where the experts are spread across devices and tokens travel to the experts that own them.
"""


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, num_expert: int, top_k: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.moe = fastmoe.FMoETransformerMLP(num_expert=num_expert, d_model=d_model, d_hidden=2 * d_model, top_k=top_k)

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=causal_mask, need_weights=False)[0]
        return x + self.moe(self.norm2(x))


class TinyMoELM(nn.Module):
    def __init__(self, vocab: int, d_model: int, n_layers: int, context: int, num_expert: int, top_k: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(context, d_model))
        self.blocks = nn.ModuleList([Block(d_model, 4, num_expert, top_k) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        mask = torch.triu(torch.full((seq, seq), float("-inf"), device=tokens.device), diagonal=1)
        x = self.embed(tokens) + self.pos[:seq]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))

    def balance_loss(self) -> torch.Tensor:
        return sum(block.moe.get_loss() for block in self.blocks)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--context", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for name in ("steps", "experts", "top_k", "d_model", "layers", "context", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    chars = sorted(set(CORPUS))
    data = torch.tensor([chars.index(c) for c in CORPUS], device=device)
    model = TinyMoELM(len(chars), args.d_model, args.layers, args.context, args.experts, args.top_k).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"fastmoe demo: {args.layers} layers x {args.experts} experts (top-{args.top_k}), d_model={args.d_model}, "
        f"{params / 1e3:.1f}k parameters, corpus of {len(CORPUS)} chars / vocab {len(chars)}, device {device}"
    )

    def batch():
        starts = torch.randint(0, data.numel() - args.context - 1, (args.batch,), device=device)
        offsets = torch.arange(args.context + 1, device=device)
        window = data[starts[:, None] + offsets]
        return window[:, :-1], window[:, 1:]

    log_every = max(1, args.steps // 10)
    first = last = None
    start = time.time()
    for step in range(1, args.steps + 1):
        inputs, targets = batch()
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        total = loss + model.balance_loss()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if step % log_every == 0 or step == args.steps:
            print(
                f"step {step:4d}/{args.steps}  loss {last:.3f}  (uniform would be {math.log(len(chars)):.3f})  "
                f"{time.time() - start:.1f}s",
                flush=True,
            )
    print(f"loss {first:.3f} -> {last:.3f} in {args.steps} steps, {time.time() - start:.1f}s")
    if not last < first:
        print("FAILED: the loss did not decrease", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
