"""Plain PyTorch references: no fastmoe op is used here, only torch.topk, softmax, matmul and masks."""

import torch


def reference_route_topk(logits: torch.Tensor, k: int, score_fn: str = "topk_softmax"):
    """``logits [T, E]`` -> ``(topk_idx [T, k], topk_score [T, k])`` with torch.topk and softmax."""
    if score_fn == "topk_softmax":
        values, idx = torch.topk(logits, k, dim=-1)
        return idx, torch.softmax(values, dim=-1)
    if score_fn == "softmax_topk":
        probs = torch.softmax(logits, dim=-1)
        values, idx = torch.topk(probs, k, dim=-1)
        return idx, values
    raise ValueError(f"score_fn must be 'topk_softmax' or 'softmax_topk', got {score_fn!r}")


def reference_plan(topk_idx: torch.Tensor, num_experts: int):
    """The plan of ``topk_idx [T, k]`` with a stable argsort: (counts, offsets, sorted_pair, pair_pos)."""
    flat = topk_idx.reshape(-1)
    routed = flat >= 0
    counts = torch.bincount(flat[routed], minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    keys = torch.where(routed, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(keys, stable=True)
    num_routed = int(routed.sum())
    sorted_pair = torch.where(torch.arange(flat.numel()) < num_routed, order, torch.full_like(order, -1))
    pair_pos = torch.full_like(flat, -1)
    pair_pos[order[:num_routed]] = torch.arange(num_routed)
    return counts, offsets, sorted_pair, pair_pos.view_as(topk_idx)


def dense_mlp(x, w1, b1, w2, b2, activation):
    """``activation(x @ w1^T + b1) @ w2^T + b2`` for one expert (``w1 [h, d]``, ``w2 [d, h]``)."""
    h = x @ w1.t()
    if b1 is not None:
        h = h + b1
    h = activation(h)
    y = h @ w2.t()
    if b2 is not None:
        y = y + b2
    return y


def reference_moe_mlp(x, gate_weight, gate_bias, w1, b1, w2, b2, top_k, activation, score_fn="topk_softmax"):
    """A Transformer-FFN MoE built from plain ops: every expert runs on every token, and each token's output
    is the score-weighted sum over its top-k experts (masks, no gather/scatter).

    x [T, d]; gate_weight [E, d]; gate_bias [E] or None; w1 [E, h, d]; b1 [E, h]; w2 [E, d, h]; b2 [E, d].
    """
    logits = x @ gate_weight.t()
    if gate_bias is not None:
        logits = logits + gate_bias
    topk_idx, topk_score = reference_route_topk(logits, top_k, score_fn)
    num_experts = w1.shape[0]
    y = torch.zeros(x.shape[0], w2.shape[1], dtype=x.dtype, device=x.device)
    for e in range(num_experts):
        weight = (topk_score * (topk_idx == e)).sum(dim=-1, keepdim=True)  # [T, 1]
        out = dense_mlp(x, w1[e], None if b1 is None else b1[e], w2[e], None if b2 is None else b2[e], activation)
        y = y + weight * out
    return y
