from torch import nn

from fastmoe import _checks, debug, ops
from fastmoe.gates.base_gate import BaseGate, non_negative_float, router_z_loss, slot_balance_term


class NaiveGate(BaseGate):
    """FastMoE's NaiveGate: a linear layer gives ``logits [T, E]``, the top-k logits are kept and softmaxed
    over those k only: ``score = softmax(topk(x W^T + b))``.

    Runs as one fused op (``torch.ops.fastmoe.route_topk`` with ``score_fn="topk_softmax"``). By default it has
    no balance loss (FastMoE's gate). With ``balance_coef > 0`` it records the Switch Transformer's
    load-balancing loss (Fedus et al. 2021, arXiv 2101.03961) over all k slots, ``balance_coef * E * sum_e f_e
    P_e`` (``f_e`` the share of the routed slots that go to expert e, ``P_e`` its mean softmax probability over
    all E logits; 1 * coef when uniform), under the name ``"balance"``: a soft pressure towards an even load,
    without a capacity and so without dropped tokens. With ``z_loss_coef > 0`` it records ST-MoE's router
    z-loss (Zoph et al. 2022, arXiv 2202.08906) ``z_loss_coef * mean_t logsumexp_e(logits[t, e])^2`` under the
    name ``"z"``.

    Parameters: ``gate.weight [E, d_model]``, ``gate.bias [E]`` (when ``gate_bias``), E = ``num_expert *
    world_size``.
    """

    def __init__(
        self,
        d_model: int,
        num_expert: int,
        world_size: int = 1,
        top_k: int = 2,
        gate_bias: bool = True,
        z_loss_coef: float = 0.0,
        balance_coef: float = 0.0,
    ):
        super().__init__(num_expert, world_size)
        self.d_model = _checks.positive_int("d_model", d_model)
        self.top_k = _checks.top_k_in_range(top_k, self.tot_expert)
        self.z_loss_coef = non_negative_float("z_loss_coef", z_loss_coef)
        self.balance_coef = non_negative_float("balance_coef", balance_coef)
        self.gate = nn.Linear(d_model, self.tot_expert, bias=gate_bias)

    def _logits(self, inp):
        """``inp [..., d_model]`` -> ``(x [T, d_model], logits [T, E])`` after the input checks."""
        x = _checks.token_matrix("inp", inp, self.d_model, like=self.gate.weight)
        logits = self.gate(x)
        debug.check_finite(self, "gate logits", logits)
        return x, logits

    def _add_z_loss(self, logits) -> None:
        if self.z_loss_coef > 0:
            self.add_loss("z", self.z_loss_coef * router_z_loss(logits))

    def forward(self, inp, return_all_scores: bool = False):
        """``inp [T, d_model]`` -> ``(topk_idx [T, k] int64, topk_score [T, k])`` (+ ``logits [T, E]``)."""
        self.reset_stats()
        _, logits = self._logits(inp)
        topk_idx, topk_score = ops.route_topk(logits, self.top_k, "topk_softmax")
        if self.balance_coef > 0:
            self.add_loss("balance", self.balance_coef * slot_balance_term(logits, topk_idx))
        self._add_z_loss(logits)
        if return_all_scores:
            return topk_idx, topk_score, logits
        return topk_idx, topk_score
