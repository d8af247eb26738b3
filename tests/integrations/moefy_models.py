"""Small models with the FFN structures fastmoe.moefy converts, built without Hugging Face transformers (moefy finds
FFN blocks by structure, so these stand for Llama's and GPT-2's blocks), and the body of the expert-parallel test
(a module-level function, so the spawned ranks can unpickle it)."""

import torch
from torch import nn


class GatedFFN(nn.Module):
    """The structure of Llama's and Qwen2's MLP."""

    def __init__(self, d_model: int, d_hidden: int, bias: bool = False, act=None):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=bias)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=bias)
        self.act_fn = act if act is not None else nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Conv1D(nn.Module):
    """GPT-2's linear layer with a transposed weight ``[nx, nf]`` = ``[in, out]``."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, self.nx), self.weight).view(*x.shape[:-1], self.nf)


class TwoLayerFFN(nn.Module):
    """The structure of GPT-2's MLP."""

    def __init__(self, d_model: int, d_hidden: int, dropout: float = 0.0):
        super().__init__()
        self.c_fc = Conv1D(d_hidden, d_model)
        self.c_proj = Conv1D(d_model, d_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Layer(nn.Module):
    def __init__(self, mlp: nn.Module, d_model: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mlp = mlp

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class ToyLM(nn.Module):
    """Embedding, ``num_layers`` residual FFN layers, a head: ``forward(ids [B, S]) -> logits [B, S, vocab]``."""

    def __init__(self, num_layers=2, d_model=16, d_hidden=24, vocab=50, kind="gated", bias=False, act=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        if kind == "gated":
            self.layers = nn.ModuleList(
                Layer(GatedFFN(d_model, d_hidden, bias=bias, act=act), d_model) for _ in range(num_layers)
            )
        else:
            self.layers = nn.ModuleList(Layer(TwoLayerFFN(d_model, d_hidden), d_model) for _ in range(num_layers))
        self.head = nn.Linear(d_model, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def toy_lm(seed: int = 0, dtype=torch.float64, **kwargs) -> ToyLM:
    torch.manual_seed(seed)
    return ToyLM(**kwargs).to(dtype)


def ep_body(rank: int, world_size: int):
    """Rank ``rank`` of an expert-parallel moefy, without and with noise: the dense model upcycled with
    ``num_expert=2`` per rank must hold global experts ``2 * rank, 2 * rank + 1`` of the one-process model
    upcycled with ``2 * world_size`` experts from the same seeds, and compute what that model computes on this
    rank's tokens."""
    import fastmoe

    torch.manual_seed(1)
    ids = torch.randint(0, 50, (world_size, 3, 5))[rank]
    results = {}
    for noise in (0.0, 0.05):
        reference = toy_lm()
        dense_logits = reference(ids)
        torch.manual_seed(2)
        fastmoe.moefy(reference, num_expert=2 * world_size, noise=noise)

        model = toy_lm()
        torch.manual_seed(2)
        fastmoe.moefy(model, num_expert=2, world_size=world_size, noise=noise)

        lo, hi = 2 * rank, 2 * rank + 2
        same_weights = all(
            torch.equal(getattr(layer.mlp.experts, lin).weight, getattr(ref.mlp.experts, lin).weight[lo:hi])
            and torch.equal(layer.mlp.gate.gate.weight, ref.mlp.gate.gate.weight)
            for layer, ref in zip(model.layers, reference.layers, strict=True)
            for lin in ("htoh4", "h4toh")
        )
        logits = model(ids)
        logits.sum().backward()  # the backward crosses the ranks too
        results[noise] = {
            "same_weights": same_weights,
            "vs_one_process": float((logits - reference(ids)).abs().max()),
            "vs_dense": float((logits - dense_logits).abs().max()),
            "embed_grad_finite": bool(model.embed.weight.grad.isfinite().all()),
        }
    return results
