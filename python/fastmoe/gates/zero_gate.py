import torch

from fastmoe import _checks
from fastmoe.gates.base_gate import BaseGate


class ZeroGate(BaseGate):
    """FastMoE's ZeroGate: every token to global expert 0 with score ``1 / k`` in the input's dtype, as ``[T, k]``
    (FastMoE returned ``[T * k]`` ids and ``[T, 1, k]`` scores). For tests and baselines; no parameters, no loss."""

    def __init__(self, d_model: int, num_expert: int, world_size: int = 1, top_k: int = 2):
        super().__init__(num_expert, world_size)
        self.d_model = _checks.positive_int("d_model", d_model)
        self.top_k = _checks.positive_int("top_k", top_k)

    def forward(self, inp):
        x = self._tokens(inp, None)
        topk_idx = torch.zeros(x.shape[0], self.top_k, dtype=torch.int64, device=x.device)
        return topk_idx, torch.full((x.shape[0], self.top_k), 1.0 / self.top_k, dtype=x.dtype, device=x.device)
