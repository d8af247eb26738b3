import torch

from fastmoe import _checks
from fastmoe.gates.base_gate import BaseGate


class ZeroGate(BaseGate):
    """FastMoE's ZeroGate: every token goes to global expert 0 (for tests and baselines).

    ``ZeroGate(d_model, num_expert, world_size=1, top_k=2)``; ``forward(inp [..., d_model])`` returns fastmoe's
    gate contract, ``topk_idx [T, k]`` int64 all 0 and ``topk_score [T, k]`` all ``1 / k`` in the input's dtype,
    so a layer's output is expert 0's output. FastMoE's ZeroGate returned flattened ids ``[T * k]`` and scores
    ``[T, 1, k]`` instead. No parameters, no loss, no host sync.
    """

    def __init__(self, d_model: int, num_expert: int, world_size: int = 1, top_k: int = 2):
        super().__init__(num_expert, world_size)
        self.d_model = _checks.positive_int("d_model", d_model)
        self.top_k = _checks.positive_int("top_k", top_k)

    def forward(self, inp):
        self.reset_stats()
        x = _checks.token_matrix("inp", inp, self.d_model)
        num_tokens = x.shape[0]
        topk_idx = torch.zeros(num_tokens, self.top_k, dtype=torch.int64, device=x.device)
        topk_score = torch.full((num_tokens, self.top_k), 1.0 / self.top_k, dtype=x.dtype, device=x.device)
        return topk_idx, topk_score
