"""A GPT-style decoder whose chosen feed-forward layers are ``fastmoe.FMoETransformerMLP``, and its dense twin.

Both models share everything but the FFN at the MoE positions: there the MoE model has ``num_experts`` experts
of width ``expert_hidden`` with top-``k`` routing, and the dense baseline one FFN of width
``top_k * expert_hidden``, so both spend the same FFN FLOPs per token (the gate adds ``d_model * E`` more).
"""

import functools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fastmoe
from fastmoe import _rng, gates

GATES = {
    "naive": gates.NaiveGate,
    "noisy": gates.NoisyGate,
    "gshard": gates.GShardGate,
    "switch": gates.SwitchGate,
    "swipe": gates.SwipeGate,
    "sigmoid": gates.SigmoidGate,
}


@dataclass
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 32
    d_ff: int = 512  # hidden width of the dense FFN layers (the non-MoE layers of both models)
    moe: bool = True  # False: the dense baseline
    moe_every: int = 1  # layer i (from 0) is an MoE layer when (i + 1) % moe_every == 0
    num_experts: int = 16  # total, over every rank of the expert-parallel group
    top_k: int = 2
    expert_hidden: int = 256  # hidden width of one expert; the dense baseline uses top_k * expert_hidden there
    gate: str = "naive"
    balance_coef: float = 0.0  # the naive gate's Switch-style load-balancing loss coefficient (0: none)
    ffn_bias: bool = True  # biases in every feed-forward layer (experts and dense FFNs) of both models

    def is_moe_layer(self, index: int) -> bool:
        return (index + 1) % self.moe_every == 0

    def to_dict(self) -> dict:
        return asdict(self)


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_hidden, bias=bias)
        self.fc2 = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got d_model={d_model}, n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, width // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, width))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, moe_layer: bool, world_size: int = 1, moe_group=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config.d_model, config.n_heads)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.is_moe = moe_layer and config.moe
        if self.is_moe:
            kwargs = {"world_size": world_size}
            if moe_group is not None:
                kwargs["moe_group"] = moe_group
            self.ffn = fastmoe.FMoETransformerMLP(
                num_expert=config.num_experts // world_size,
                d_model=config.d_model,
                d_hidden=config.expert_hidden,
                top_k=config.top_k,
                gate=gate_factory(config),
                bias=config.ffn_bias,
                **kwargs,
            )
        elif moe_layer:
            self.ffn = DenseFFN(config.d_model, config.top_k * config.expert_hidden, config.ffn_bias)
        else:
            self.ffn = DenseFFN(config.d_model, config.d_ff, config.ffn_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class GPT(nn.Module):
    """Byte-level decoder: token and learned position embeddings, pre-norm blocks, a final norm and an output
    head tied to the token embedding."""

    def __init__(self, config: ModelConfig, world_size: int = 1, moe_group=None):
        super().__init__()
        check_config(config, world_size)
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = nn.Parameter(torch.zeros(config.seq_len, config.d_model))
        self.blocks = nn.ModuleList(
            [Block(config, config.is_moe_layer(i), world_size, moe_group) for i in range(config.n_layers)]
        )
        self.norm = nn.LayerNorm(config.d_model)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        # GPT-2's scaling of the residual projections by 1/sqrt(2 * layers).
        scale = 0.02 / math.sqrt(2 * self.config.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=scale)
            ffn = block.ffn
            if isinstance(ffn, DenseFFN):
                nn.init.normal_(ffn.fc2.weight, std=scale)
            else:
                # Per global expert, from its own stream (fastmoe._rng): expert-parallel ranks must not repeat
                # each other's experts, and the draws must not depend on the number of ranks.
                # The experts of a layer over a DeviceMesh are DTensors: fill this rank's shard (under no_grad,
                # to_local() is the shard itself).
                h4toh = ffn.experts.h4toh
                with torch.no_grad():
                    weight = h4toh.weight.to_local() if hasattr(h4toh.weight, "to_local") else h4toh.weight
                    _rng.fill_per_expert_(
                        weight, h4toh.rank * h4toh.num_expert, lambda w, gen: w.normal_(0.0, scale, generator=gen)
                    )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [batch, seq]`` -> logits ``[batch, seq, vocab]``."""
        seq = tokens.shape[1]
        if seq > self.config.seq_len:
            raise ValueError(f"tokens has {seq} positions, more than seq_len={self.config.seq_len}")
        x = self.embed(tokens) + self.pos[:seq]
        for block in self.blocks:
            x = block(x)
        return F.linear(self.norm(x), self.embed.weight)

    def moe_layers(self) -> list[nn.Module]:
        return [block.ffn for block in self.blocks if block.is_moe]

    def balance_loss(self) -> torch.Tensor | None:
        """The sum of the gates' balance losses of the last forward (None for the dense model)."""
        losses = [layer.get_loss() for layer in self.moe_layers()]
        return sum(losses) if losses else None


def gate_factory(config: ModelConfig):
    """The gate class of ``config.gate``, with the naive gate's balance-loss coefficient bound to it."""
    if config.gate == "naive" and config.balance_coef > 0:
        return functools.partial(gates.NaiveGate, balance_coef=config.balance_coef)
    return GATES[config.gate]


def check_config(config: ModelConfig, world_size: int = 1) -> None:
    for name in ("d_model", "n_layers", "n_heads", "seq_len", "d_ff", "moe_every", "num_experts", "top_k"):
        value = getattr(config, name)
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if config.expert_hidden < 1:
        raise ValueError(f"expert_hidden must be >= 1, got {config.expert_hidden}")
    if config.top_k > config.num_experts:
        raise ValueError(f"top_k must be at most num_experts={config.num_experts}, got {config.top_k}")
    if config.gate not in GATES:
        raise ValueError(f"gate must be one of {sorted(GATES)}, got {config.gate!r}")
    if not config.balance_coef >= 0:
        raise ValueError(f"balance_coef must be >= 0, got {config.balance_coef}")
    if config.balance_coef > 0 and config.gate != "naive":
        raise ValueError(
            f"balance_coef applies to the naive gate; the {config.gate} gate has its own balancing, got "
            f"balance_coef={config.balance_coef}"
        )
    if config.gate == "switch" and config.top_k != 1:
        raise ValueError(f"the switch gate routes to one expert: top_k must be 1, got {config.top_k}")
    if config.num_experts % world_size != 0:
        raise ValueError(
            f"num_experts must be divisible by the number of ranks {world_size}, got num_experts={config.num_experts}"
        )
    if config.moe and not any(config.is_moe_layer(i) for i in range(config.n_layers)):
        raise ValueError(f"moe_every={config.moe_every} leaves no MoE layer among n_layers={config.n_layers}")


def parameter_counts(model: GPT) -> tuple[int, int]:
    """``(total, active)`` over the whole model (experts of every rank included): every parameter, and the
    parameters one token uses, where each MoE layer's experts count ``top_k / num_experts`` of their size and the
    gates count fully. A DTensor parameter (DeviceMesh experts, anything under FSDP2) counts its global size; the
    plain experts of an expert-parallel layer are this rank's, so they count ``world_size`` times."""
    total = sum(p.numel() for p in model.parameters())
    active = total
    for layer in model.moe_layers():
        counted = sum(p.numel() for p in layer.experts.parameters())
        dtensors = all(hasattr(p, "to_local") for p in layer.experts.parameters())
        everywhere = counted if dtensors else counted * layer.world_size
        total += everywhere - counted
        active += everywhere * layer.top_k // layer.num_experts_total - counted
    return total, active
