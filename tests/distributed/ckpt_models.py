"""The small model of the checkpoint tests, shared by the test modules, their worker bodies and the subprocess
that crashes in the middle of a save.

``TinyMoEModel`` has every kind of state a checkpoint must handle: replicated parameters (an embedding-like
Linear, a LayerNorm, the gates), fused experts (FMoETransformerMLP), per-expert modules (FMoE with a module per
expert) and, optionally, dropout (so a bitwise resume also needs the RNG state). ``ExpertModulesModel`` has only
replicated parameters and a module per expert.
"""

import torch
from torch import nn

import fastmoe

D_MODEL, D_HIDDEN, NUM_EXPERTS, TOP_K, NUM_TOKENS = 8, 12, 4, 2, 16


def expert_module(d_model: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_model, D_HIDDEN), nn.GELU(), nn.Linear(D_HIDDEN, d_model))


class TinyMoEModel(nn.Module):
    def __init__(self, world_size: int = 1, moe_group=None, dropout: float = 0.0):
        super().__init__()
        ep = {"world_size": world_size} if moe_group is None else {"world_size": world_size, "moe_group": moe_group}
        num_expert = NUM_EXPERTS // world_size
        self.embed = nn.Linear(D_MODEL, D_MODEL)
        self.mlp = fastmoe.FMoETransformerMLP(
            num_expert=num_expert, d_model=D_MODEL, d_hidden=D_HIDDEN, top_k=TOP_K, **ep
        )
        self.norm = nn.LayerNorm(D_MODEL)
        self.moe = fastmoe.FMoE(num_expert=num_expert, d_model=D_MODEL, top_k=TOP_K, expert=expert_module, **ep)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.dropout(self.mlp(h))
        return h + self.moe(self.norm(h))


class ExpertModulesModel(nn.Module):
    """A replicated Linear, then an FMoE layer with a module per expert (``expert=``; no fused experts)."""

    def __init__(self, world_size: int = 1, moe_group=None):
        super().__init__()
        ep = {"world_size": world_size} if moe_group is None else {"world_size": world_size, "moe_group": moe_group}
        self.embed = nn.Linear(D_MODEL, D_MODEL)
        self.moe = fastmoe.FMoE(
            num_expert=NUM_EXPERTS // world_size, d_model=D_MODEL, top_k=TOP_K, expert=expert_module, **ep
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return h + self.moe(h)


def make_model(seed: int = 0, **kwargs) -> TinyMoEModel:
    """A model with every parameter drawn from ``seed`` (expert biases too, which FMoELinear starts at zero).
    The gates start without bias and the LayerNorm near identity, so routing follows the tokens and spreads over
    every expert: no EP rank is left without rows."""
    model = TinyMoEModel(**kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.5
            if name.endswith("gate.gate.bias"):
                noise.zero_()
            elif name.startswith("norm."):
                noise = noise * 0.1 + (1.0 if name.endswith("weight") else 0.0)
            param.copy_(noise)
    return model


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """Adam with two param groups (replicated parameters, experts), so groups are resharded too."""
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    others = [p for n, p in model.named_parameters() if ".experts." not in n]
    return torch.optim.Adam([{"params": others, "lr": 1e-2}, {"params": experts, "lr": 2e-2, "weight_decay": 0.01}])


def batch(step: int, num_tokens: int = NUM_TOKENS, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x, target = (torch.randn(num_tokens, D_MODEL, generator=gen, dtype=torch.float64) for _ in range(2))
    return x.to(dtype), target.to(dtype)


def train_step(model, optimizer, step: int) -> None:
    x, target = batch(step)
    optimizer.zero_grad()
    loss = (model(x) - target).pow(2).sum()
    loss.backward()
    optimizer.step()


def crash_during_save(directory: str, tag: str) -> None:
    """The subprocess of the crash tests: resumes from the latest checkpoint, trains two steps and saves under
    ``tag`` with ``keep=1``; FASTMOE_CHECKPOINT_FAULT in its environment kills it at one point of that save."""
    torch.set_num_threads(1)
    model = make_model(seed=1, dropout=0.1)
    optimizer = make_optimizer(model)
    info = fastmoe.checkpoint.load(model, optimizer, directory)
    step = info["extra"]["step"]
    for s in range(step, step + 2):
        train_step(model, optimizer, s)
    fastmoe.checkpoint.save(model, optimizer, directory, tag=tag, extra={"step": step + 2}, keep=1)
