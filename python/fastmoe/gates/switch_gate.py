import math

import torch

from fastmoe import _checks, debug, ops
from fastmoe.gates.base_gate import capacity_pair, loss_dtype, non_negative_float, top_k_or_topk
from fastmoe.gates.gshard_gate import CapacityMixin, drop_by_capacity, load_balance_term
from fastmoe.gates.naive_gate import NaiveGate


class SwitchGate(CapacityMixin, NaiveGate):
    """The Switch Transformer's top-1 gate (Fedus et al. 2021, "Switch Transformers", arXiv 2101.03961).

    For ``x [T, d_model]`` and E global experts:

    - training: multiplicative jitter on the router input, ``x' = x * U[1 - switch_eps, 1 + switch_eps]``
      (one draw per element, ``torch.empty_like(x).uniform_(...)``); eval: ``x' = x``. FastMoE added the noise
      to the logits instead, which is not the paper's method. The jitter only enters the router, not the experts;
    - ``logits = x' W^T + b``, ``p = softmax(logits)`` over all E (in fp32 or wider: the paper's selective
      precision);
    - ``topk_idx = argmax_e p`` (ties to the lower id), ``topk_score = p[t, topk_idx]`` (not renormalised);
    - capacity ``C = ceil(capacity_factor * T / E)`` per expert (``capacity[0]`` in training, ``capacity[1]``
      in eval, ``None`` for no limit) through ``fastmoe.ops.capacity_limit``: an over-full expert keeps its
      highest-scored tokens; a dropped token gets index -1 and score 0 (its output is 0, so a residual around
      the layer passes it through); ``num_dropped`` keeps the count on the device;
    - loss ``"balance"`` = ``aux_loss_coef * E * sum_e f_e * P_e``, with ``f_e`` the fraction of tokens whose
      choice is e (before capacity) and ``P_e = mean_t p[t, e]``; 1 * ``aux_loss_coef`` when uniform;
    - optional router z-loss ``"z"`` = ``z_loss_coef * mean_t logsumexp(logits[t])^2``.

    Defaults: ``switch_eps=0.1`` (FastMoE's value; the paper used 1e-2), ``capacity=(1.2, 2.4)`` (FastMoE's),
    ``aux_loss_coef=1e-2`` (the paper's alpha), ``z_loss_coef=0.0``. ``top_k`` (or FastMoE's spelling ``topk``;
    both only if equal) must be 1. No host sync.
    """

    def __init__(
        self,
        d_model: int,
        num_expert: int,
        world_size: int = 1,
        top_k: int | None = None,
        switch_eps: float = 0.1,
        capacity=(1.2, 2.4),
        gate_bias: bool = True,
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 0.0,
        topk: int | None = None,
    ):
        top_k = top_k_or_topk(type(self).__name__, top_k, topk, default=1)
        if top_k != 1 or isinstance(top_k, bool):
            raise ValueError(f"SwitchGate routes each token to 1 expert: top_k must be 1, got {top_k!r}")
        super().__init__(d_model, num_expert, world_size, top_k, gate_bias=gate_bias, z_loss_coef=z_loss_coef)
        if (
            isinstance(switch_eps, bool)
            or not isinstance(switch_eps, (int, float))
            or not math.isfinite(switch_eps)
            or not 0 <= switch_eps < 1
        ):
            raise ValueError(f"switch_eps must be a float in [0, 1), got {switch_eps!r}")
        self.switch_eps = float(switch_eps)
        self.capacity = None if capacity is None else capacity_pair("capacity", capacity)
        self.aux_loss_coef = non_negative_float("aux_loss_coef", aux_loss_coef)

    def forward(self, inp, return_all_scores: bool = False):
        """``inp [..., d_model]`` -> ``(topk_idx [T, 1] int64 (-1 = dropped), topk_score [T, 1])``.

        Walkthrough: 1. jitter (training); 2. logits, softmax, top-1; 3. the aux loss; 4. capacity.
        """
        self.reset_stats()
        x = _checks.token_matrix("inp", inp, self.d_model, like=self.gate.weight)
        if self.training and self.switch_eps > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.switch_eps, 1.0 + self.switch_eps)
        logits = self.gate(x)
        debug.check_finite(self, "gate logits", logits)
        topk_idx, topk_score = ops.route_topk(logits, 1, "softmax_topk")

        self.add_loss("balance", self.aux_loss_coef * load_balance_term(logits, topk_idx, loss_dtype(logits)))
        self._add_z_loss(logits)

        topk_idx, topk_score = drop_by_capacity(self, topk_idx, topk_score, self.capacity_factor())
        if return_all_scores:
            return topk_idx, topk_score, logits
        return topk_idx, topk_score
