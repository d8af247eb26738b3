from torch import nn

from fastmoe import _checks, ops
from fastmoe.gates.base_gate import BaseGate


class NaiveGate(BaseGate):
    """FastMoE's NaiveGate: a linear layer gives ``logits [T, E]``, the top-k logits are kept and softmaxed
    over those k only: ``score = softmax(topk(x W^T + b))``.

    Runs as one fused op (``torch.ops.fastmoe.route_topk`` with ``score_fn="topk_softmax"``). It has no balance
    loss.
    """

    def __init__(self, d_model: int, num_expert: int, world_size: int = 1, top_k: int = 2, gate_bias: bool = True):
        super().__init__(num_expert, world_size)
        self.d_model = _checks.positive_int("d_model", d_model)
        self.top_k = _checks.top_k_in_range(top_k, self.tot_expert)
        self.gate = nn.Linear(d_model, self.tot_expert, bias=gate_bias)

    def forward(self, inp, return_all_scores: bool = False):
        """``inp [T, d_model]`` -> ``(topk_idx [T, k] int64, topk_score [T, k])`` (+ ``logits [T, E]``)."""
        x = _checks.token_matrix("inp", inp, self.d_model, like=self.gate.weight)
        logits = self.gate(x)
        topk_idx, topk_score = ops.route_topk(logits, self.top_k, "topk_softmax")
        if return_all_scores:
            return topk_idx, topk_score, logits
        return topk_idx, topk_score
