import torch

from fastmoe import _checks
from fastmoe.gates.base_gate import no_tokens
from fastmoe.gates.naive_gate import NaiveGate


class ExpertChoiceGate(NaiveGate):
    """Expert-choice routing (Zhou et al. 2022, arXiv 2202.09368; ``torch.ops.fastmoe.expert_choice_gate``): each
    expert takes its ``min(T, ceil(capacity_factor * T * k / E))`` tokens of largest softmax probability, written in
    ``slots_per_token = max_experts_per_token`` slots (None: E; cut choices count in ``num_dropped``). Optional
    ``"z"``. It sees the whole batch, so it is not causal (docs/gates.md)."""

    def __init__(self, d_model: int, num_expert: int, world_size: int = 1, top_k: int = 2,
                 capacity_factor: float = 1.0, max_experts_per_token: int | None = None, gate_bias: bool = True,
                 z_loss_coef: float = 0.0):  # fmt: skip
        super().__init__(d_model, num_expert, world_size, top_k, gate_bias=gate_bias, z_loss_coef=z_loss_coef)
        self.capacity_factor = _checks.typed("capacity_factor", capacity_factor)
        cap = max_experts_per_token
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= self.tot_expert):
            raise ValueError(
                f"max_experts_per_token must be None or an int in [1, num_expert * world_size = {self.tot_expert}], "
                f"got {max_experts_per_token!r}"
            )
        self.max_experts_per_token = max_experts_per_token
        self.slots_per_token = self.tot_expert if cap is None else cap
        ExpertChoiceGate._route(self, no_tokens(self.tot_expert))

    def _route(self, logits):
        args = (self.top_k, self.capacity_factor, self.slots_per_token, self.z_loss_coef)
        return torch.ops.fastmoe.expert_choice_gate(logits, *args)
