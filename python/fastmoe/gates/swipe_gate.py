import torch

from fastmoe.gates.naive_gate import NaiveGate


class SwipeGate(NaiveGate):
    """A balanced assignment after FastMoE's SwipeGate (arXiv 2103.13262), per expert on the device
    (``torch.ops.fastmoe.swipe_gate``): in training each expert takes at most ``ceil(T * k / E)`` assignments, given
    greedily by preference and softmax probability (a slot without room is -1, counted in ``num_dropped``); eval is
    NaiveGate's top-k. Scores: softmax over the assigned logits. Optional ``"z"`` (docs/gates.md)."""

    def _route(self, logits):
        return torch.ops.fastmoe.swipe_gate(logits, self.top_k, self.training, self.z_loss_coef)
