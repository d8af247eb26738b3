import torch

from fastmoe import _checks, debug
from fastmoe.gates.base_gate import no_tokens, top_k_or_topk
from fastmoe.gates.gshard_gate import CapacityMixin
from fastmoe.gates.naive_gate import NaiveGate


class SwitchGate(CapacityMixin, NaiveGate):
    """The Switch Transformer's top-1 gate (Fedus et al. 2021, arXiv 2101.03961): in training the router (not the
    experts) sees ``x * U[1 - switch_eps, 1 + switch_eps]`` (``torch.ops.fastmoe.switch_jitter``); then
    ``torch.ops.fastmoe.switch_gate``: top-1 of ``softmax(logits)``, capacity as GShardGate's, loss ``"balance" =
    aux_loss_coef * E * sum_e f_e P_e``, optional ``"z"`` (docs/gates.md). ``top_k`` (or ``topk``) must be 1."""

    def __init__(self, d_model: int, num_expert: int, world_size: int = 1, top_k: int | None = None,
                 switch_eps: float = 0.1, capacity=(1.2, 2.4), gate_bias: bool = True, aux_loss_coef: float = 1e-2,
                 z_loss_coef: float = 0.0, topk: int | None = None):  # fmt: skip
        top_k = top_k_or_topk(type(self).__name__, top_k, topk, default=1)
        if top_k != 1 or isinstance(top_k, bool):
            raise ValueError(f"SwitchGate routes each token to 1 expert: top_k must be 1, got {top_k!r}")
        super().__init__(d_model, num_expert, world_size, top_k, gate_bias=gate_bias, z_loss_coef=z_loss_coef)
        self.switch_eps = _checks.typed("switch_eps", switch_eps)
        self.capacity = None if capacity is None else _checks.capacity_pair("capacity", capacity)
        self.aux_loss_coef = _checks.typed("aux_loss_coef", aux_loss_coef)
        torch.ops.fastmoe.switch_jitter(no_tokens(d_model), self.switch_eps)
        SwitchGate._route(self, no_tokens(self.tot_expert))

    def _logits(self, inp):
        x = self._tokens(inp, self.gate.weight)
        if self.training and self.switch_eps > 0:
            x = torch.ops.fastmoe.switch_jitter(x, self.switch_eps)
        logits = self.gate(x)
        debug.check_finite(self, "gate logits", logits)
        return logits

    def _route(self, logits):
        return torch.ops.fastmoe.switch_gate(logits, self.capacity_factor(), self.aux_loss_coef, self.z_loss_coef)
