import math

import torch
from torch import nn

from fastmoe import _checks, debug
from fastmoe.gates.base_gate import BaseGate, loss_dtype, non_negative_float, positive_float


class SigmoidGate(BaseGate):
    """DeepSeek-V3's gate (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", arXiv 2412.19437, §2.1.2):
    sigmoid affinities, group-limited top-k and auxiliary-loss-free balancing by a per-expert bias.

    For ``logits = x W^T (+ b)`` ``[T, E]`` over the E global experts:

    - affinities ``s = sigmoid(logits)`` (fp32 or wider);
    - selection scores ``s_sel = s + expert_bias`` (``expert_bias [E]`` is a buffer, not a parameter, and only
      steers the selection: it never enters the weights and carries no gradient);
    - group-limited routing (``n_groups > 1``): the experts form ``n_groups`` contiguous groups of
      ``E / n_groups``; a group's score is the sum of its top ``min(2, E / n_groups)`` selection scores; each
      token keeps its ``topk_groups`` best groups (ties to the lower group) and picks within them;
    - ``topk_idx`` = the k largest ``s_sel`` among the kept groups (ties to the lower id);
    - ``topk_score = routed_scaling_factor * s[idx] / sum_j s[idx_j]`` (the unbiased affinities, normalised
      over the k when ``normalize``, else ``routed_scaling_factor * s[idx]``);
    - balancing: after each forward in training mode, under ``torch.no_grad``,
      ``expert_bias[e] += bias_update_rate * sign(mean_load - load_e)``, with ``load_e`` the number of this
      forward's assignments to e and ``mean_load = T * k / E``. Nothing is updated in eval. The load is this
      rank's; under data parallelism keep the bias in sync yourself (DDP's ``broadcast_buffers`` copies rank 0's
      bias) and note that activation checkpointing, which re-runs the forward, updates it twice;
    - optional complementary sequence-wise loss ``"balance"`` (``aux_loss_coef > 0``, DeepSeek-V3 eq. 17-20,
      with the whole batch as one sequence): ``aux_loss_coef * sum_e f_e * P_e``,
      ``f_e = E / (k T) * (number of tokens routed to e)``, ``P_e = mean_t s[t, e] / sum_j s[t, j]``.

    ``expert_bias`` stays fp32 when the module is cast (``.to(torch.bfloat16)``), so updates of 1e-3 are not
    rounded away. Defaults: ``n_groups=1``, ``topk_groups=1`` (no group limit), ``normalize=True``,
    ``routed_scaling_factor=1.0`` (DeepSeek-V3 uses 2.5 with E=256, k=8, 8 groups, 4 kept),
    ``bias_update_rate=1e-3`` (the paper's gamma), ``gate_bias=False``, ``aux_loss_coef=0.0``. No host sync.
    """

    def __init__(
        self,
        d_model: int,
        num_expert: int,
        world_size: int = 1,
        top_k: int = 2,
        n_groups: int = 1,
        topk_groups: int = 1,
        normalize: bool = True,
        routed_scaling_factor: float = 1.0,
        bias_update_rate: float = 1e-3,
        gate_bias: bool = False,
        aux_loss_coef: float = 0.0,
    ):
        super().__init__(num_expert, world_size)
        self.d_model = _checks.positive_int("d_model", d_model)
        num_experts = self.tot_expert
        self.top_k = _checks.top_k_in_range(top_k, num_experts)
        self.n_groups = _checks.positive_int("n_groups", n_groups)
        if num_experts % n_groups != 0:
            raise ValueError(f"n_groups must divide num_expert * world_size = {num_experts}, got n_groups={n_groups!r}")
        self.topk_groups = _checks.positive_int("topk_groups", topk_groups)
        if topk_groups > n_groups:
            raise ValueError(f"topk_groups must be in [1, n_groups = {n_groups}], got {topk_groups!r}")
        if n_groups > 1 and top_k > topk_groups * (num_experts // n_groups):
            raise ValueError(
                f"top_k must be at most topk_groups * experts per group = {topk_groups * (num_experts // n_groups)}, "
                f"got top_k={top_k!r}"
            )
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {normalize!r}")
        self.normalize = normalize
        self.routed_scaling_factor = positive_float("routed_scaling_factor", routed_scaling_factor)
        self.bias_update_rate = non_negative_float("bias_update_rate", bias_update_rate)
        self.aux_loss_coef = non_negative_float("aux_loss_coef", aux_loss_coef)
        self.gate = nn.Linear(d_model, num_experts, bias=gate_bias)
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # Module casts convert every floating buffer; the bias keeps fp32 (only its device follows).
        bias = self.expert_bias
        super()._apply(fn, recurse)
        moved = self.expert_bias
        if moved.dtype != torch.float32:
            self.expert_bias = bias.to(device=moved.device, dtype=torch.float32)
        return self

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores [T, E]`` (selection scores, no gradient) -> ``topk_idx [T, k]`` with the group limit."""
        num_tokens, num_experts = scores.shape
        if self.n_groups > 1 and self.topk_groups < self.n_groups:
            group_size = num_experts // self.n_groups
            grouped = scores.view(num_tokens, self.n_groups, group_size)
            group_score = grouped.topk(min(2, group_size), dim=-1).values.sum(-1)  # [T, n_groups]
            kept = torch.sort(group_score, dim=1, descending=True, stable=True).indices[:, : self.topk_groups]
            keep_group = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, kept, True)
            keep_expert = keep_group.repeat_interleave(group_size, dim=1)
            scores = scores.masked_fill(~keep_expert, -math.inf)
        return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : self.top_k]

    def expert_load(self, topk_idx: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """``[E]`` number of assignments per expert in ``topk_idx [T, k]``, on the device."""
        load = torch.zeros(self.tot_expert, dtype=dtype, device=topk_idx.device)
        return load.scatter_add(0, topk_idx.reshape(-1), torch.ones(topk_idx.numel(), dtype=dtype, device=load.device))

    def forward(self, inp):
        """``inp [..., d_model]`` -> ``(topk_idx [T, k] int64, topk_score [T, k])``.

        Walkthrough: 1. affinities; 2. biased, group-limited selection; 3. weights from the unbiased
        affinities; 4. the optional loss; 5. the bias update (training).
        """
        self.reset_stats()
        x = _checks.token_matrix("inp", inp, self.d_model, like=self.gate.weight)
        logits = self.gate(x)
        debug.check_finite(self, "gate logits", logits)
        num_tokens, num_experts = logits.shape
        affinity = torch.sigmoid(logits.to(loss_dtype(logits)))

        topk_idx = self.select(affinity.detach() + self.expert_bias)
        weight = affinity.gather(1, topk_idx)
        if self.normalize:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        topk_score = (weight * self.routed_scaling_factor).to(logits.dtype)

        if self.aux_loss_coef > 0:
            load = self.expert_load(topk_idx, affinity.dtype)
            fraction = load * (num_experts / (self.top_k * max(num_tokens, 1)))
            share = affinity / (affinity.sum(dim=-1, keepdim=True) + 1e-20)
            mean_share = share.sum(0) / max(num_tokens, 1)
            self.add_loss("balance", self.aux_loss_coef * (fraction * mean_share).sum())

        if self.training and self.bias_update_rate > 0:
            with torch.no_grad():
                load = self.expert_load(topk_idx)
                mean_load = num_tokens * self.top_k / num_experts
                self.expert_bias.add_(self.bias_update_rate * torch.sign(mean_load - load))
        return topk_idx, topk_score
