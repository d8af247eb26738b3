"""Two plain-PyTorch MoE FFN layers with fastmoe's parameter layout, for benchmarking against, and the dense FFN
of the same FLOPs.

Both take the same parameters as ``fastmoe.FMoETransformerMLP``: ``gate_weight [E, d]``, ``gate_bias [E]``,
``w1 [E, h, d]`` (htoh4; ``[E, 2h, d]`` for SwiGLU, gate rows first, then up rows) and ``w2 [E, d, h]`` (h4toh),
and with ``bias=True`` the expert biases ``b1 [E, h or 2h]`` and ``b2 [E, d]``; top-k of the gate logits, softmax
over the k selected (NaiveGate), the activation between the two expert GEMMs. Each expert's output, bias
included, is weighted by its score.
"""

import torch
import torch.nn.functional as F


def _swiglu(h):
    """``[N, 2h]`` = ``[gate | up]`` -> ``silu(gate) * up``."""
    half = h.shape[-1] // 2
    return F.silu(h[..., :half]) * h[..., half:]


ACTIVATIONS = {"gelu": F.gelu, "swiglu": _swiglu}


def _route(x, gate_weight, gate_bias, top_k):
    logits = F.linear(x, gate_weight, gate_bias)
    values, idx = torch.topk(logits, top_k, dim=-1)
    return idx, torch.softmax(values, dim=-1)


def loop_moe(x, gate_weight, gate_bias, w1, w2, top_k, b1=None, b2=None, activation="gelu"):
    """The plain loop: for each expert, gather its tokens, run its MLP, scatter-add the weighted result."""
    act = ACTIVATIONS[activation]
    idx, score = _route(x, gate_weight, gate_bias, top_k)
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        token, slot = torch.nonzero(idx == e, as_tuple=True)
        if token.numel() == 0:
            continue
        h = act(F.linear(x[token], w1[e], None if b1 is None else b1[e]))
        out = F.linear(h, w2[e], None if b2 is None else b2[e]) * score[token, slot].unsqueeze(-1)
        y = y.index_add(0, token, out.to(y.dtype))
    return y


def grouped_mm_moe(x, gate_weight, gate_bias, w1, w2, top_k, b1=None, b2=None, activation="gelu"):
    """argsort by expert, ``torch._grouped_mm`` for both expert GEMMs (each row's bias gathered by its expert
    id), and an index_add combine."""
    idx, score = _route(x, gate_weight, gate_bias, top_k)
    num_experts = w1.shape[0]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // top_k
    counts = torch.bincount(flat, minlength=num_experts)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    x_sorted = x.index_select(0, token)
    h = torch._grouped_mm(x_sorted, w1.transpose(1, 2), offs=offs)
    if b1 is not None:
        h = h + b1[flat[order]]
    y_sorted = torch._grouped_mm(ACTIVATIONS[activation](h), w2.transpose(1, 2), offs=offs)
    if b2 is not None:
        y_sorted = y_sorted + b2[flat[order]]
    weighted = y_sorted * score.reshape(-1)[order].unsqueeze(-1).to(y_sorted.dtype)
    return torch.zeros_like(x).index_add(0, token, weighted)


def dense_ffn(x, w1, w2, activation="gelu"):
    """The dense FFN that a top-k MoE layer of experts of width h matches in FLOPs: one MLP of width k * h
    (``w1 [k*h, d]``, or ``[2*k*h, d]`` for SwiGLU; ``w2 [d, k*h]``), no bias, no routing. It is not the same
    function as the MoE layer; it measures what routing, permutes and grouped GEMMs cost on top of the same
    expert FLOPs."""
    return F.linear(ACTIVATIONS[activation](F.linear(x, w1)), w2)
