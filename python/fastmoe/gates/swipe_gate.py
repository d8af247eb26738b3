import math

import torch

from fastmoe import ops
from fastmoe.gates.base_gate import loss_dtype
from fastmoe.gates.naive_gate import NaiveGate


def balanced_assignment(logits: torch.Tensor, top_k: int, capacity: int) -> torch.Tensor:
    """Greedy capacity-bounded assignment of ``logits [T, E]`` to ``[T, k]`` int64 expert ids (-1 = no place).

    Every token ranks the experts by logit (its preference list, ties to the lower id). Then E rounds run;
    in round r every token with fewer than k experts proposes to the r-th expert of its list. Each expert
    accepts its proposals, highest ``softmax(logits)[t, e]`` first (ties to the lower token id), while it holds
    fewer than ``capacity`` tokens; the rest are rejected and those tokens move on to their next-best expert
    in round r + 1. An acceptance is never revoked. So:

    - without pressure (no expert over capacity) the result is the plain top-k in preference order;
    - a token's first choices compete before anyone's second choices, round by round;
    - slot j holds the token's j-th accepted expert, in preference order; a token keeps at most k experts,
      all distinct, and an expert never holds more than ``capacity``;
    - with ``capacity * E >= T * k`` every token gets at least one expert; a slot stays -1 only when every
      expert it has not got is full.

    Fixed shapes and a fixed number of rounds (E), all on the device: no host sync, no loop over tokens.
    Cost: E rounds of two stable sorts over T. Deterministic. Not differentiable (the result is an index).
    """
    num_tokens, num_experts = logits.shape
    device = logits.device
    ranked = logits.detach().to(loss_dtype(logits))
    preference = torch.sort(ranked, dim=1, descending=True, stable=True).indices  # [T, E]
    probs = torch.softmax(ranked, dim=1)

    assigned = torch.full((num_tokens, top_k), -1, dtype=torch.int64, device=device)
    filled = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    # remaining[E] is a sentinel "expert" with no room, where tokens that propose nothing are sorted. (Built with
    # cat, not an indexed assignment, which would copy a host scalar and synchronise on CUDA.)
    remaining = torch.cat(
        [
            torch.full((num_experts,), capacity, dtype=torch.int64, device=device),
            torch.zeros(1, dtype=torch.int64, device=device),
        ]
    )
    positions = torch.arange(num_tokens, device=device)
    ones = torch.ones(num_tokens, dtype=torch.int64, device=device)
    for r in range(num_experts):
        candidate = preference[:, r]
        active = filled < top_k
        proposed = torch.where(active, candidate, torch.full_like(candidate, num_experts))
        strength = probs.gather(1, candidate[:, None]).squeeze(1)
        # Order the proposals by expert, then by strength (descending), then by token: two stable sorts.
        by_strength = torch.sort(strength, descending=True, stable=True).indices
        order = by_strength[torch.sort(proposed[by_strength], stable=True).indices]
        sorted_expert = proposed[order]
        per_expert = torch.zeros(num_experts + 1, dtype=torch.int64, device=device).scatter_add(0, proposed, ones)
        starts = torch.cumsum(per_expert, 0) - per_expert
        rank_in_expert = positions - starts[sorted_expert]
        accepted_sorted = rank_in_expert < remaining[sorted_expert]
        accepted = torch.zeros(num_tokens, dtype=torch.bool, device=device).scatter(0, order, accepted_sorted)

        slot = filled.clamp(max=top_k - 1)[:, None]
        current = assigned.gather(1, slot).squeeze(1)
        assigned = assigned.scatter(1, slot, torch.where(accepted, candidate, current)[:, None])
        filled = filled + accepted.to(torch.int64)
        # Rejected proposals add 0 to the sentinel, so remaining[E] stays 0.
        remaining = remaining - torch.zeros_like(remaining).scatter_add(0, proposed, accepted.to(torch.int64))
    return assigned


class SwipeGate(NaiveGate):
    """A balanced-assignment gate in the spirit of FastMoE's SwipeGate (SWIPE, added in FastMoE v0.3.0; FastMoE:
    Zeng, He, Zhai et al., arXiv 2103.13262).

    FastMoE's SWIPE rebalances whole workers on the host through NCCL exchanges. This gate implements the
    per-expert version on the device (see :func:`balanced_assignment` for the exact algorithm):

    - training: ``C = ceil(T * k / E)`` per expert (E global experts); each token's choices are moved off
      experts that are full toward its next-best expert (by logit), first choices before second choices, and
      within an expert the tokens with the highest ``softmax(logits)`` win. Without pressure this is the plain
      top-k. A slot that finds no room (rare; only when k > 1) is -1 and counted in ``num_dropped``;
    - eval: the plain top-k, as FastMoE;
    - ``topk_score`` = softmax over the logits of the token's assigned experts (NaiveGate's rule restricted to
      the slots that got an expert), 0 for a -1 slot; the gradient reaches the logits through these scores;
    - no balance loss (the assignment balances); optional router z-loss ``"z"`` = ``z_loss_coef * mean_t
      logsumexp(logits[t])^2``.

    Defaults: ``gate_bias=True``, ``z_loss_coef=0.0``. No host sync (E fixed rounds); deterministic.
    """

    def forward(self, inp, return_all_scores: bool = False):
        """``inp [..., d_model]`` -> ``(topk_idx [T, k] int64, topk_score [T, k])``."""
        self.reset_stats()
        _, logits = self._logits(inp)
        num_tokens, num_experts = logits.shape
        if not self.training:
            topk_idx, topk_score = ops.route_topk(logits, self.top_k, "topk_softmax")
            self.num_dropped = torch.zeros((), dtype=torch.int64, device=logits.device)
        else:
            capacity = math.ceil(num_tokens * self.top_k / num_experts)
            topk_idx = balanced_assignment(logits, self.top_k, capacity)
            routed = topk_idx >= 0
            chosen = logits.gather(1, topk_idx.clamp(min=0)).to(loss_dtype(logits))
            chosen = torch.where(routed, chosen, torch.full_like(chosen, -math.inf))
            topk_score = torch.softmax(chosen, dim=1)
            topk_score = torch.where(routed, topk_score, torch.zeros_like(topk_score)).to(logits.dtype)
            self.num_dropped = (~routed).sum()
        self._add_z_loss(logits)
        if return_all_scores:
            return topk_idx, topk_score, logits
        return topk_idx, topk_score
