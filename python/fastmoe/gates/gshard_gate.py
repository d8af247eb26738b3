import torch

from fastmoe import _checks
from fastmoe.gates.base_gate import no_tokens, top_k_or_topk
from fastmoe.gates.naive_gate import NaiveGate


class CapacityMixin:
    """For gates with a ``capacity`` pair (training factor, eval factor), or None for no limit."""

    capacity: tuple[float, float] | None

    def capacity_factor(self) -> float | None:
        """The capacity factor of the current mode (``capacity[0]`` in training, ``capacity[1]`` in eval)."""
        return None if self.capacity is None else self.capacity[0 if self.training else 1]


class GShardGate(CapacityMixin, NaiveGate):
    """GShard's top-2 gate (Lepikhin et al. 2020, arXiv 2006.16668; ``torch.ops.fastmoe.gshard_gate``): softmax over
    the two largest logits, random routing of the second expert in training, at most ``ceil(capacity_factor * T * 2
    / E)`` assignments per expert (``capacity = (train, eval)`` factors, None: no limit; drops count in
    ``num_dropped``), loss ``"balance" = aux_loss_coef * E^2 * mean_e(f_e m_e)`` with the global E, optional ``"z"``
    (docs/gates.md). ``top_k`` (or FastMoE's spelling ``topk``; both only if equal) must be 2."""

    def __init__(self, d_model: int, num_expert: int, world_size: int = 1, top_k: int | None = None,
                 capacity=(1.2, 2.4), random_routing: bool = True, gate_bias: bool = True, aux_loss_coef: float = 1.0,
                 z_loss_coef: float = 0.0, topk: int | None = None):  # fmt: skip
        top_k = top_k_or_topk(type(self).__name__, top_k, topk, default=2)
        if top_k != 2 or isinstance(top_k, bool):
            raise ValueError(f"GShardGate routes each token to 2 experts: top_k must be 2, got {top_k!r}")
        super().__init__(d_model, num_expert, world_size, top_k, gate_bias=gate_bias, z_loss_coef=z_loss_coef)
        self.capacity = None if capacity is None else _checks.capacity_pair("capacity", capacity)
        self.random_routing = _checks.typed("random_routing", random_routing, bool)
        self.aux_loss_coef = _checks.typed("aux_loss_coef", aux_loss_coef)
        GShardGate._route(self, no_tokens(self.tot_expert))

    def _route(self, logits):
        return self._gshard(logits, self.capacity_factor())

    def _gshard(self, logits, capacity_factor):
        args = (self.training, capacity_factor, self.random_routing, self.aux_loss_coef, self.z_loss_coef)
        return torch.ops.fastmoe.gshard_gate(logits, *args)
