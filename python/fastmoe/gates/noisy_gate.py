import torch
import torch.nn.functional as F
from torch import nn

from fastmoe import _checks, debug, ops
from fastmoe.gates.base_gate import BaseGate, loss_dtype, non_negative_float, positive_float, router_z_loss

# Keeps cv^2 finite when every entry is 0 (Shazeer et al.'s reference code uses the same epsilon).
_CV_EPS = 1e-10


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation of ``values [E]``: ``var / (mean^2 + 1e-10)`` with the population
    variance, so one expert gives 0 (on the tensor's device) and all-zero values give 0, never NaN."""
    return values.var(correction=0) / (values.mean().square() + _CV_EPS)


class NoisyGate(BaseGate):
    """Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", arXiv 1701.06538).

    For ``x [T, d_model]`` and E = ``num_expert * world_size`` global experts:

    - ``clean = x @ w_gate`` and ``noise_std = softplus(x @ w_noise) + noise_epsilon`` (``[T, E]``);
    - training: ``H = clean + randn_like(clean) * noise_std``; eval: ``H = clean`` (no noise);
    - ``topk_idx`` = the k largest entries of ``H`` per token (ties to the lower id), ``topk_score =
      softmax`` over those k values (the paper's ``Softmax(KeepTopK(H, k))``), both ``[T, k]``;
    - ``importance_e = sum_t G[t, e]`` (G the dense gates, zero outside the top k);
    - ``load_e = sum_t P(t, e)`` in training, with the smooth estimator
      ``P(t, e) = Phi((clean[t, e] - kth_excluding(H[t], k, e)) / noise_std[t, e])`` (``kth_excluding`` is the
      k-th largest of ``H[t]`` without entry e: the (k+1)-th largest if e is in the top k, else the k-th);
      in eval (no noise, so no estimator, and nothing to divide by) and when ``k == E``, ``load_e`` is the
      number of tokens routed to e;
    - loss ``"balance"`` = ``w_importance * cv^2(importance) + w_load * cv^2(load)``, with
      ``cv^2(v) = var(v) / (mean(v)^2 + 1e-10)`` (population variance, as in the authors' code);
    - optional router z-loss ``"z"`` = ``z_loss_coef * mean_t logsumexp(H[t])^2`` on the logits the softmax
      sees.

    Defaults: ``noise_epsilon=1e-2`` (a floor on the noise std, so the estimator never divides by zero),
    ``w_importance = w_load = 1.0`` (FastMoE's unweighted sum; the paper tunes both, e.g. 0.1), no z-loss.
    Parameters ``w_gate [d_model, E]`` and ``w_noise [d_model, E]``, zero-initialised as in the paper (so a fresh
    gate routes on noise alone in training). Unlike FastMoE's NoisyGate, the indices are ``[T, k]`` (FastMoE
    flattened them) and eval never divides by a zero noise. No host sync.
    """

    def __init__(
        self,
        d_model: int,
        num_expert: int,
        world_size: int = 1,
        top_k: int = 2,
        noise_epsilon: float = 1e-2,
        w_importance: float = 1.0,
        w_load: float = 1.0,
        z_loss_coef: float = 0.0,
    ):
        super().__init__(num_expert, world_size)
        self.d_model = _checks.positive_int("d_model", d_model)
        self.top_k = _checks.top_k_in_range(top_k, self.tot_expert)
        self.noise_epsilon = positive_float("noise_epsilon", noise_epsilon)
        self.w_importance = non_negative_float("w_importance", w_importance)
        self.w_load = non_negative_float("w_load", w_load)
        self.z_loss_coef = non_negative_float("z_loss_coef", z_loss_coef)
        self.w_gate = nn.Parameter(torch.zeros(d_model, self.tot_expert))
        self.w_noise = nn.Parameter(torch.zeros(d_model, self.tot_expert))

    def forward(self, inp):
        """``inp [..., d_model]`` -> ``(topk_idx [T, k] int64, topk_score [T, k])``.

        Walkthrough: 1. clean and (training) noisy logits; 2. top-k and softmax over the k; 3. importance and
        load; 4. the cv^2 loss (and the z-loss).
        """
        self.reset_stats()
        x = _checks.token_matrix("inp", inp, self.d_model, like=self.w_gate)
        num_tokens, num_experts, k = x.shape[0], self.tot_expert, self.top_k

        clean = x @ self.w_gate
        noisy = self.training
        if noisy:
            noise_std = F.softplus(x @ self.w_noise) + self.noise_epsilon
            logits = clean + torch.randn_like(clean) * noise_std
        else:
            logits = clean

        debug.check_finite(self, "gate logits", logits)
        topk_idx, topk_score = ops.route_topk(logits, k, "topk_softmax")

        ldt = loss_dtype(logits)
        gates = torch.zeros(num_tokens, num_experts, dtype=ldt, device=x.device)
        gates = gates.scatter(1, topk_idx, topk_score.to(ldt))
        importance = gates.sum(0)
        if noisy and k < num_experts:
            top_values = torch.topk(logits.to(ldt), k + 1, dim=1).values  # [T, k+1]
            in_topk = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=x.device)
            in_topk = in_topk.scatter(1, topk_idx, True)
            threshold = torch.where(in_topk, top_values[:, k : k + 1], top_values[:, k - 1 : k])
            prob_in_topk = torch.special.ndtr((clean.to(ldt) - threshold) / noise_std.to(ldt))
            load = prob_in_topk.sum(0)
        else:
            load = torch.zeros(num_experts, dtype=ldt, device=x.device)
            load = load.scatter_add(0, topk_idx.reshape(-1), torch.ones(topk_idx.numel(), dtype=ldt, device=x.device))

        self.add_loss("balance", self.w_importance * cv_squared(importance) + self.w_load * cv_squared(load))
        if self.z_loss_coef > 0:
            self.add_loss("z", self.z_loss_coef * router_z_loss(logits))
        return topk_idx, topk_score
