import torch
from torch import nn

from fastmoe import _checks
from fastmoe.gates.base_gate import BaseGate, no_tokens


class SigmoidGate(BaseGate):
    """DeepSeek-V3's gate (DeepSeek-AI 2024, arXiv 2412.19437, §2.1.2; ``torch.ops.fastmoe.sigmoid_gate``): the k
    largest ``sigmoid(logits) + expert_bias`` within each token's ``topk_groups`` best of ``n_groups`` groups, scored
    by the unbiased affinities (normalised, scaled); optional loss ``"balance"``. ``expert_bias [E]`` is an fp32
    buffer that moves by ``bias_update_rate * sign(T k / E - load_e)`` after each training forward (this rank's load;
    activation checkpointing, which re-runs the forward, updates it twice). docs/gates.md has the details."""

    def __init__(self, d_model: int, num_expert: int, world_size: int = 1, top_k: int = 2, n_groups: int = 1,
                 topk_groups: int = 1, normalize: bool = True, routed_scaling_factor: float = 1.0,
                 bias_update_rate: float = 1e-3, gate_bias: bool = False, aux_loss_coef: float = 0.0):  # fmt: skip
        super().__init__(num_expert, world_size)
        self.d_model = _checks.positive_int("d_model", d_model)
        self.top_k = _checks.top_k_in_range(top_k, self.tot_expert)
        self.n_groups = _checks.positive_int("n_groups", n_groups)
        self.topk_groups = _checks.positive_int("topk_groups", topk_groups)
        self.normalize = _checks.typed("normalize", normalize, bool)
        self.routed_scaling_factor = _checks.typed("routed_scaling_factor", routed_scaling_factor)
        self.bias_update_rate = _checks.typed("bias_update_rate", bias_update_rate)
        self.aux_loss_coef = _checks.typed("aux_loss_coef", aux_loss_coef)
        self._route(no_tokens(self.tot_expert), torch.zeros(self.tot_expert))
        self.gate = nn.Linear(d_model, self.tot_expert, bias=gate_bias)
        self.register_buffer("expert_bias", torch.zeros(self.tot_expert, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # Module casts convert every floating buffer; the bias keeps fp32 (only its device follows).
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if self.expert_bias.dtype != torch.float32:
            self.expert_bias = bias.to(device=self.expert_bias.device, dtype=torch.float32)
        return self

    def _route(self, logits, expert_bias):
        args = (self.top_k, self.n_groups, self.topk_groups, self.normalize, self.routed_scaling_factor)
        return torch.ops.fastmoe.sigmoid_gate(logits, expert_bias, *args, self.aux_loss_coef, self.training,
                                              self.bias_update_rate)  # fmt: skip

    def forward(self, inp):
        """``inp [..., d_model]`` -> ``(topk_idx [T, k] int64, topk_score [T, k])``."""
        *routing, bias_update = self._route(self._logits(inp), self.expert_bias)
        if bias_update.numel():  # a training forward: the op's update, outside autograd
            with torch.no_grad():
                self.expert_bias.add_(bias_update)
        return self._record(routing)
