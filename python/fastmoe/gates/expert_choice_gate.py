import math

import torch

from fastmoe.gates.base_gate import loss_dtype, positive_float
from fastmoe.gates.naive_gate import NaiveGate


class ExpertChoiceGate(NaiveGate):
    """Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing",
    arXiv 2202.09368): the experts pick the tokens.

    For ``logits = x W^T + b`` ``[T, E]`` and ``S = softmax(logits)`` over the E global experts:

    - each expert e takes the ``C = min(T, ceil(capacity_factor * T * k / E))`` tokens with the largest
      ``S[:, e]`` (ties to the lower token id), so every expert processes exactly C tokens and the experts per
      token average ``capacity_factor * k``;
    - the result is written in the layer's ``[T, k']`` interface: slot j of token t holds its j-th expert by
      score (ties to the lower id), ``topk_score[t, j] = S[t, e]`` (the paper's gating weight, not
      renormalised), and -1 / 0 for empty slots (a token no expert chose gets only -1 slots and output 0);
    - ``k' = max_experts_per_token``. ``None`` (default) means k' = E: nothing is cut, which is the paper's
      uncapped routing but sizes the layer's dispatch buffers for ``T * E`` rows. A smaller k' caps the experts
      per token (the paper's "capped" variant): a token chosen by more than k' experts keeps the k' with the
      highest scores, and the assignments cut this way are counted in ``num_dropped``;
    - no balance loss (balanced by construction); optional router z-loss ``"z"``.

    The layer uses ``gate.slots_per_token`` (= k') as the width of the routing. Expert choice looks at every
    token of the batch at once, so it is not causal (use it where the whole sequence is known). Defaults:
    ``capacity_factor=1.0`` (with ``top_k=2``: the paper's EC-CF2), ``max_experts_per_token=None``,
    ``gate_bias=True``, ``z_loss_coef=0.0``. No host sync.
    """

    def __init__(
        self,
        d_model: int,
        num_expert: int,
        world_size: int = 1,
        top_k: int = 2,
        capacity_factor: float = 1.0,
        max_experts_per_token: int | None = None,
        gate_bias: bool = True,
        z_loss_coef: float = 0.0,
    ):
        super().__init__(d_model, num_expert, world_size, top_k, gate_bias=gate_bias, z_loss_coef=z_loss_coef)
        self.capacity_factor = positive_float("capacity_factor", capacity_factor)
        if max_experts_per_token is None:
            self.slots_per_token = self.tot_expert
        elif (
            isinstance(max_experts_per_token, bool)
            or not isinstance(max_experts_per_token, int)
            or not 1 <= max_experts_per_token <= self.tot_expert
        ):
            raise ValueError(
                f"max_experts_per_token must be None or an int in [1, num_expert * world_size = {self.tot_expert}], "
                f"got {max_experts_per_token!r}"
            )
        else:
            self.slots_per_token = max_experts_per_token
        self.max_experts_per_token = max_experts_per_token

    def tokens_per_expert(self, num_tokens: int) -> int:
        """``C = min(T, ceil(capacity_factor * T * top_k / E))``, a Python int from the shapes."""
        return min(num_tokens, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.tot_expert))

    def forward(self, inp, return_all_scores: bool = False):
        """``inp [..., d_model]`` -> ``(topk_idx [T, k'] int64 (-1 = empty), topk_score [T, k'])``.

        Walkthrough: 1. logits and the softmax over experts; 2. each expert's top-C tokens; 3. each token's
        chosen experts sorted by score into k' slots.
        """
        self.reset_stats()
        _, logits = self._logits(inp)
        num_tokens, num_experts = logits.shape
        probs = torch.softmax(logits.to(loss_dtype(logits)), dim=-1)
        ranked = probs.detach()

        capacity = self.tokens_per_expert(num_tokens)
        picked = torch.sort(ranked.t(), dim=1, descending=True, stable=True).indices[:, :capacity]  # [E, C]
        chosen = torch.zeros(num_experts, num_tokens, dtype=torch.bool, device=logits.device)
        chosen = chosen.scatter(1, picked, True).t()  # [T, E]

        key = torch.where(chosen, ranked, torch.full_like(ranked, -1.0))
        slot_expert = torch.sort(key, dim=1, descending=True, stable=True).indices[:, : self.slots_per_token]
        filled = chosen.gather(1, slot_expert)
        topk_idx = torch.where(filled, slot_expert, torch.full_like(slot_expert, -1))
        score = probs.gather(1, slot_expert)
        topk_score = torch.where(filled, score, torch.zeros_like(score)).to(logits.dtype)
        self.num_dropped = chosen.sum() - filled.sum()
        self._add_z_loss(logits)
        if return_all_scores:
            return topk_idx, topk_score, logits
        return topk_idx, topk_score
