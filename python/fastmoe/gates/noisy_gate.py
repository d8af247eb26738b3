import torch
from torch import nn

from fastmoe import _checks, debug
from fastmoe.gates.base_gate import BaseGate, no_tokens


class NoisyGate(BaseGate):
    """Noisy top-k gating (Shazeer et al. 2017, arXiv 1701.06538; ``torch.ops.fastmoe.noisy_gate``): softmax over the
    k largest of ``H = x @ w_gate + randn * (softplus(x @ w_noise) + noise_epsilon)`` in training, of ``x @ w_gate``
    in eval; loss ``"balance" = w_importance * cv^2(importance) + w_load * cv^2(load)``, optional ``"z"``
    (docs/gates.md). Parameters ``w_gate``, ``w_noise`` ``[d_model, E]``, zero-initialised as in the paper."""

    def __init__(self, d_model: int, num_expert: int, world_size: int = 1, top_k: int = 2,
                 noise_epsilon: float = 1e-2, w_importance: float = 1.0, w_load: float = 1.0,
                 z_loss_coef: float = 0.0):  # fmt: skip
        super().__init__(num_expert, world_size)
        self.d_model = _checks.positive_int("d_model", d_model)
        self.top_k = _checks.top_k_in_range(top_k, self.tot_expert)
        self.noise_epsilon = _checks.typed("noise_epsilon", noise_epsilon)
        self.w_importance = _checks.typed("w_importance", w_importance)
        self.w_load = _checks.typed("w_load", w_load)
        self.z_loss_coef = _checks.typed("z_loss_coef", z_loss_coef)
        self._route(no_tokens(self.tot_expert), None)
        self.w_gate = nn.Parameter(torch.zeros(d_model, self.tot_expert))
        self.w_noise = nn.Parameter(torch.zeros(d_model, self.tot_expert))

    def _route(self, clean, noise):
        args = (self.top_k, self.noise_epsilon, self.w_importance, self.w_load, self.z_loss_coef)
        return torch.ops.fastmoe.noisy_gate(clean, noise, *args)

    def forward(self, inp):
        x = self._tokens(inp, self.w_gate)
        clean = x @ self.w_gate
        debug.check_finite(self, "gate logits", clean)
        return self._record(self._route(clean, x @ self.w_noise if self.training else None))
