import torch

from fastmoe import ops
from fastmoe.gates.base_gate import capacity_pair, expert_capacity, loss_dtype, non_negative_float, top_k_or_topk
from fastmoe.gates.naive_gate import NaiveGate


class CapacityMixin:
    """For gates with a ``capacity`` pair (training factor, eval factor), or None for no limit."""

    capacity: tuple[float, float] | None

    def capacity_factor(self) -> float | None:
        """The capacity factor of the current mode (``capacity[0]`` in training, ``capacity[1]`` in eval)."""
        if self.capacity is None:
            return None
        return self.capacity[0] if self.training else self.capacity[1]


def drop_by_capacity(gate, topk_idx, topk_score, capacity_factor: float | None):
    """Applies ``fastmoe.ops.capacity_limit`` with ``ceil(capacity_factor * T * k / E)`` per expert (skipped when
    ``capacity_factor`` is None), stores the device-side drop count in ``gate.num_dropped`` and zeroes the scores
    of dropped slots. No host sync."""
    if capacity_factor is None:
        gate.num_dropped = torch.zeros((), dtype=torch.int64, device=topk_idx.device)
    else:
        num_tokens, k = topk_idx.shape
        capacity = expert_capacity(capacity_factor, num_tokens, k, gate.tot_expert, topk_idx.device)
        topk_idx, gate.num_dropped = ops.capacity_limit(topk_idx, topk_score.detach(), capacity)
    topk_score = torch.where(topk_idx >= 0, topk_score, torch.zeros_like(topk_score))
    return topk_idx, topk_score


def load_balance_term(logits: torch.Tensor, topk_idx: torch.Tensor, dtype) -> torch.Tensor:
    """``E * sum_e f_e * P_e`` in ``dtype``: ``f_e`` the fraction of the T tokens whose first choice
    (``topk_idx[:, 0]``) is e, ``P_e`` the mean softmax probability of e. It is 1 when routing is uniform; GShard's
    ``E^2 * mean_e(f_e m_e)`` and Switch's ``E * sum_e f_e P_e`` are both this term (0 for T = 0)."""
    num_tokens, num_experts = logits.shape
    first = topk_idx[:, 0]
    counts = torch.zeros(num_experts, dtype=dtype, device=topk_idx.device)
    counts = counts.scatter_add(0, first, torch.ones(num_tokens, dtype=dtype, device=topk_idx.device))
    fraction = counts / max(num_tokens, 1)
    mean_prob = torch.softmax(logits.to(dtype), dim=-1).sum(0) / max(num_tokens, 1)
    return num_experts * (fraction * mean_prob).sum()


class GShardGate(CapacityMixin, NaiveGate):
    """GShard's top-2 gate (Lepikhin et al. 2020, "GShard", arXiv 2006.16668, Algorithm 1).

    For ``logits = x W^T + b`` ``[T, E]`` and ``p = softmax(logits)`` over all E global experts:

    - experts e1, e2 = the two largest logits (ties to the lower id);
    - scores ``g1, g2 = p_e1 / (p_e1 + p_e2), p_e2 / (p_e1 + p_e2)`` (the paper's normalised weights, which is
      the softmax over the two selected logits, as in FastMoE);
    - random routing (training only, ``random_routing=True``): with ``u = torch.rand(T)`` drawn on the device in
      the loss dtype, the second expert is kept only where ``u < 2 * g2``; otherwise that slot becomes -1;
    - capacity: ``C = ceil(capacity_factor * T * 2 / E)`` per expert (``capacity[0]`` in training,
      ``capacity[1]`` in eval; ``None`` for no limit) through ``fastmoe.ops.capacity_limit``, which drops the
      lowest-scored assignments of an over-full expert; dropped slots get index -1 and score 0, and
      ``num_dropped`` keeps the count on the device;
    - loss ``"balance"`` = ``aux_loss_coef * E^2 * mean_e(f_e * m_e)`` = ``aux_loss_coef * E * sum_e f_e m_e``,
      with ``f_e`` the fraction of tokens whose first choice is e (before random routing and capacity) and
      ``m_e = mean_t p[t, e]``. E is the GLOBAL expert count (FastMoE used the local ``num_expert**2``); the
      loss is 1 when routing is uniform;
    - optional router z-loss ``"z"`` = ``z_loss_coef * mean_t logsumexp(logits[t])^2``.

    Defaults (FastMoE's): ``capacity=(1.2, 2.4)``, ``random_routing=True``, ``aux_loss_coef=1.0`` (the paper
    weights the loss in the objective; add ``k * layer.get_loss()`` yourself), ``z_loss_coef=0.0``.
    ``top_k`` (or FastMoE's spelling ``topk``; both only if equal) must be 2. No host sync.
    """

    def __init__(
        self,
        d_model: int,
        num_expert: int,
        world_size: int = 1,
        top_k: int | None = None,
        capacity=(1.2, 2.4),
        random_routing: bool = True,
        gate_bias: bool = True,
        aux_loss_coef: float = 1.0,
        z_loss_coef: float = 0.0,
        topk: int | None = None,
    ):
        top_k = top_k_or_topk(type(self).__name__, top_k, topk, default=2)
        if top_k != 2 or isinstance(top_k, bool):
            raise ValueError(f"GShardGate routes each token to 2 experts: top_k must be 2, got {top_k!r}")
        super().__init__(d_model, num_expert, world_size, top_k, gate_bias=gate_bias, z_loss_coef=z_loss_coef)
        self.capacity = None if capacity is None else capacity_pair("capacity", capacity)
        if not isinstance(random_routing, bool):
            raise TypeError(f"random_routing must be a bool, got {random_routing!r}")
        self.random_routing = random_routing
        self.aux_loss_coef = non_negative_float("aux_loss_coef", aux_loss_coef)

    def forward(self, inp, return_all_scores: bool = False):
        """``inp [..., d_model]`` -> ``(topk_idx [T, 2] int64 (-1 = dropped), topk_score [T, 2])``.

        Walkthrough: 1. logits, top-2 and normalised scores; 2. the aux loss from the undropped routing;
        3. random routing of the second expert; 4. capacity.
        """
        self.reset_stats()
        _, logits = self._logits(inp)
        num_tokens = logits.shape[0]
        topk_idx, topk_score = ops.route_topk(logits, 2, "topk_softmax")

        ldt = loss_dtype(logits)
        self.add_loss("balance", self.aux_loss_coef * load_balance_term(logits, topk_idx, ldt))
        self._add_z_loss(logits)

        if self.training and self.random_routing:
            uniform = torch.rand(num_tokens, dtype=ldt, device=logits.device)
            keep_second = uniform < 2 * topk_score[:, 1].detach().to(ldt)
            second = torch.where(keep_second, topk_idx[:, 1], torch.full_like(topk_idx[:, 1], -1))
            topk_idx = torch.stack([topk_idx[:, 0], second], dim=1)

        topk_idx, topk_score = self._limit_capacity(topk_idx, topk_score)
        if return_all_scores:
            return topk_idx, topk_score, logits
        return topk_idx, topk_score

    def _limit_capacity(self, topk_idx, topk_score):
        """Step 4: this rank's tokens against the capacity of the current mode (DCGate counts the whole group)."""
        return drop_by_capacity(self, topk_idx, topk_score, self.capacity_factor())
