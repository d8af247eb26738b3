import torch
from torch import nn

from fastmoe import _checks
from fastmoe.gates.base_gate import BaseGate, no_tokens


class NaiveGate(BaseGate):
    """FastMoE's NaiveGate (arXiv 2103.13262; ``torch.ops.fastmoe.naive_gate``): softmax over the top-k logits of
    ``self.gate = nn.Linear(d_model, E)``; optional Switch-style balance loss over every slot (``balance_coef``,
    ``"balance"``) and ST-MoE's router z-loss (``z_loss_coef``, ``"z"``), as docs/gates.md writes them."""

    def __init__(self, d_model: int, num_expert: int, world_size: int = 1, top_k: int = 2, gate_bias: bool = True,
                 z_loss_coef: float = 0.0, balance_coef: float = 0.0):  # fmt: skip
        super().__init__(num_expert, world_size)
        self.d_model = _checks.positive_int("d_model", d_model)
        self.top_k = _checks.top_k_in_range(top_k, self.tot_expert)
        self.z_loss_coef = _checks.typed("z_loss_coef", z_loss_coef)
        self.balance_coef = _checks.typed("balance_coef", balance_coef)
        NaiveGate._route(self, no_tokens(self.tot_expert))
        self.gate = nn.Linear(d_model, self.tot_expert, bias=gate_bias)

    def _route(self, logits):
        return torch.ops.fastmoe.naive_gate(logits, self.top_k, self.balance_coef, self.z_loss_coef)

    def forward(self, inp, return_all_scores: bool = False):
        """``inp [..., d_model]`` -> ``(topk_idx [T, k] int64, topk_score [T, k])`` (+ ``logits [T, E]``)."""
        logits = self._logits(inp)
        topk_idx, topk_score = self._record(self._route(logits))
        return (topk_idx, topk_score, logits) if return_all_scores else (topk_idx, topk_score)
