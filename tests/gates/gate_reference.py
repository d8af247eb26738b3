"""Plain-PyTorch transcriptions of the gates' papers, for tests/gates (no fastmoe op or gate code is used).

Each function takes the gate's parameters and, for the random parts, the random draws, and returns
``(topk_idx [T, k], topk_score [T, k], losses)``. Selections are written as per-token / per-expert Python
loops over sorted keys so the tie rules are explicit (ties to the lower id); scores and losses are torch
expressions of the papers' formulas, so autograd gives the reference gradients.
"""

import math

import torch


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def ranked(values, ids):
    """``ids`` sorted by descending value, ties to the lower id (values are Python floats)."""
    return sorted(ids, key=lambda i: (-values[i], i))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE: mean over tokens of log(sum_e exp(logit))^2."""
    return (torch.log(torch.exp(logits).sum(dim=-1)) ** 2).mean()


def cv2(v: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation with the population variance (Shazeer et al.'s code), eps 1e-10."""
    mean = v.mean()
    return ((v - mean) ** 2).mean() / (mean**2 + 1e-10)


def topk_rows(values: torch.Tensor, k: int) -> torch.Tensor:
    """``[T, k]`` ids of the k largest entries per row, ties to the lower id."""
    rows = values.detach().tolist()
    out = [ranked(row, range(len(row)))[:k] for row in rows]
    return torch.tensor(out, dtype=torch.int64).reshape(len(rows), k)


def capacity_limit(topk_idx: torch.Tensor, topk_score: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each expert keeps its ``capacity`` highest-scored (token, slot) pairs, ties to the lower pair index."""
    num_tokens, k = topk_idx.shape
    idx = topk_idx.tolist()
    score = topk_score.detach().tolist()
    by_expert = {}
    for t in range(num_tokens):
        for j in range(k):
            if idx[t][j] >= 0:
                by_expert.setdefault(idx[t][j], []).append((-score[t][j], t * k + j))
    kept = [[-1] * k for _ in range(num_tokens)]
    for e, pairs in by_expert.items():
        for _, pair in sorted(pairs)[:capacity]:
            kept[pair // k][pair % k] = e
    return torch.tensor(kept, dtype=torch.int64).reshape(num_tokens, k)


def noisy_gate(x, w_gate, w_noise, k, noise=None, noise_epsilon=1e-2, w_importance=1.0, w_load=1.0):
    """Shazeer et al. 2017, eq. 3-5 and 8-10 (``noise`` = the StandardNormal() draws, None in eval)."""
    num_tokens, num_experts = x.shape[0], w_gate.shape[1]
    clean = x @ w_gate
    std = torch.log1p(torch.exp(x @ w_noise)) + noise_epsilon
    h = clean if noise is None else clean + noise * std
    idx = topk_rows(h, k)
    in_topk = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    for t in range(num_tokens):
        in_topk[t, idx[t]] = True
    gates = softmax_rows(torch.where(in_topk, h, torch.full_like(h, -math.inf)))  # Softmax(KeepTopK(H, k))
    score = torch.gather(gates, 1, idx)
    importance = gates.sum(0)
    if noise is not None and k < num_experts:
        normal = torch.distributions.Normal(torch.zeros((), dtype=x.dtype), torch.ones((), dtype=x.dtype))
        columns = []
        for e in range(num_experts):
            others = torch.cat([h[:, :e], h[:, e + 1 :]], dim=1)
            kth_excluding = torch.sort(others, dim=1, descending=True).values[:, k - 1]
            columns.append(normal.cdf((clean[:, e] - kth_excluding) / std[:, e]))
        load = torch.stack(columns, dim=1).sum(0)
    else:
        load = in_topk.to(x.dtype).sum(0)
    loss = w_importance * cv2(importance) + w_load * cv2(load)
    return idx, score, {"balance": loss}, h


def gshard_gate(x, weight, bias, uniform=None, capacity=None, aux_loss_coef=1.0):
    """GShard Algorithm 1: top-2 of softmax, normalised g1/g2, random routing ``2 g2 > u``, capacity, and the
    aux loss E^2 * mean_e(f_e m_e) with the global E."""
    logits = x @ weight.t() + (0 if bias is None else bias)
    num_tokens, num_experts = logits.shape
    p = softmax_rows(logits)
    idx = topk_rows(logits, 2)
    p1, p2 = p.gather(1, idx[:, :1]), p.gather(1, idx[:, 1:])
    score = torch.cat([p1 / (p1 + p2), p2 / (p1 + p2)], dim=1)
    f = torch.zeros(num_experts, dtype=x.dtype)
    for t in range(num_tokens):
        f[idx[t, 0]] += 1.0 / num_tokens
    m = p.mean(0)
    loss = aux_loss_coef * num_experts**2 * (f * m).mean()
    if uniform is not None:
        idx = idx.clone()
        for t in range(num_tokens):
            if not 2 * score[t, 1].item() > uniform[t].item():
                idx[t, 1] = -1
    if capacity is not None:
        idx = capacity_limit(idx, score, capacity)
    score = torch.where(idx >= 0, score, torch.zeros_like(score))
    return idx, score, {"balance": loss}, logits


def naive_balance_loss(logits, idx, coef):
    """The Switch Transformer's loss over every top-k slot: coef * E * sum_e f_e P_e, f_e = share of the T*k
    slots on expert e, P_e = mean_t softmax(logits)[t, e]."""
    num_tokens, num_experts = logits.shape
    f = torch.zeros(num_experts, dtype=logits.dtype)
    for e in idx.flatten().tolist():
        f[e] += 1.0 / idx.numel()
    return coef * num_experts * (f * softmax_rows(logits).mean(0)).sum()


def switch_gate(x, weight, bias, jitter=None, capacity=None, aux_loss_coef=1e-2):
    """Switch Transformer: x * jitter (training), top-1 of softmax, score p, capacity, alpha * E * sum f P."""
    if jitter is not None:
        x = x * jitter
    logits = x @ weight.t() + (0 if bias is None else bias)
    num_tokens, num_experts = logits.shape
    p = softmax_rows(logits)
    idx = topk_rows(logits, 1)
    score = p.gather(1, idx)
    f = torch.zeros(num_experts, dtype=x.dtype)
    for t in range(num_tokens):
        f[idx[t, 0]] += 1.0 / num_tokens
    loss = aux_loss_coef * num_experts * (f * p.mean(0)).sum()
    if capacity is not None:
        idx = capacity_limit(idx, score, capacity)
    score = torch.where(idx >= 0, score, torch.zeros_like(score))
    return idx, score, {"balance": loss}, logits


def swipe_assign(logits, k, capacity):
    """The documented greedy: round r, every unfilled token proposes its r-th expert by logit; each expert
    accepts by descending softmax probability (ties: lower token) while it has room."""
    num_tokens, num_experts = logits.shape
    rows = logits.detach().tolist()
    probs = softmax_rows(logits.detach()).tolist()
    preference = [ranked(row, range(num_experts)) for row in rows]
    remaining = [capacity] * num_experts
    assigned = [[] for _ in range(num_tokens)]
    for r in range(num_experts):
        proposals = {}
        for t in range(num_tokens):
            if len(assigned[t]) < k:
                proposals.setdefault(preference[t][r], []).append(t)
        for e, tokens in proposals.items():
            for t in sorted(tokens, key=lambda t, e=e: (-probs[t][e], t))[: remaining[e]]:
                assigned[t].append(e)
                remaining[e] -= 1
    idx = torch.tensor([a + [-1] * (k - len(a)) for a in assigned], dtype=torch.int64).reshape(num_tokens, k)
    return idx


def swipe_gate(x, weight, bias, k, training=True):
    logits = x @ weight.t() + (0 if bias is None else bias)
    num_tokens, num_experts = logits.shape
    if training:
        idx = swipe_assign(logits, k, math.ceil(num_tokens * k / num_experts))
    else:
        idx = topk_rows(logits, k)
    chosen = logits.gather(1, idx.clamp(min=0))
    chosen = torch.where(idx >= 0, chosen, torch.full_like(chosen, -math.inf))
    score = torch.where(idx >= 0, softmax_rows(chosen), torch.zeros_like(chosen))
    return idx, score, {}, logits


def expert_choice_gate(x, weight, bias, k, capacity_factor=1.0, max_experts_per_token=None):
    """Zhou et al. 2022: S = softmax(X W); each expert takes its top-C tokens; written as [T, k'] slots."""
    logits = x @ weight.t() + (0 if bias is None else bias)
    num_tokens, num_experts = logits.shape
    s = softmax_rows(logits)
    capacity = min(num_tokens, math.ceil(capacity_factor * num_tokens * k / num_experts))
    columns = s.detach().t().tolist()
    chosen_by = [[] for _ in range(num_tokens)]
    for e in range(num_experts):
        for t in ranked(columns[e], range(num_tokens))[:capacity]:
            chosen_by[t].append(e)
    width = num_experts if max_experts_per_token is None else max_experts_per_token
    rows = s.detach().tolist()
    idx = []
    for t in range(num_tokens):
        experts = ranked(rows[t], chosen_by[t])[:width]
        idx.append(experts + [-1] * (width - len(experts)))
    idx = torch.tensor(idx, dtype=torch.int64).reshape(num_tokens, width)
    score = torch.where(idx >= 0, s.gather(1, idx.clamp(min=0)), torch.zeros(idx.shape, dtype=s.dtype))
    return idx, score, {}, logits


def sigmoid_gate(
    x,
    weight,
    bias,
    expert_bias,
    k,
    n_groups=1,
    topk_groups=1,
    normalize=True,
    routed_scaling_factor=1.0,
    aux_loss_coef=0.0,
):
    """DeepSeek-V3 eq. 12-16 (+ node-limited-style group routing, + eq. 17-20 over the batch)."""
    logits = x @ weight.t() + (0 if bias is None else bias)
    num_tokens, num_experts = logits.shape
    s = 1 / (1 + torch.exp(-logits))
    select = (s.detach() + expert_bias.to(s.dtype)).tolist()
    size = num_experts // n_groups
    idx = []
    for t in range(num_tokens):
        row = select[t]
        allowed = list(range(num_experts))
        if n_groups > 1:
            group_score = [sum(sorted(row[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(n_groups)]
            groups = ranked(group_score, range(n_groups))[:topk_groups]
            allowed = [e for e in allowed if e // size in groups]
        idx.append(ranked(row, allowed)[:k])
    idx = torch.tensor(idx, dtype=torch.int64).reshape(num_tokens, k)
    w = s.gather(1, idx)
    if normalize:
        w = w / w.sum(dim=1, keepdim=True)
    score = routed_scaling_factor * w
    losses = {}
    if aux_loss_coef > 0:
        f = torch.zeros(num_experts, dtype=x.dtype)
        for t in range(num_tokens):
            for e in idx[t].tolist():
                f[e] += num_experts / (k * num_tokens)
        p = (s / s.sum(dim=1, keepdim=True)).mean(0)
        losses["balance"] = aux_loss_coef * (f * p).sum()
    load = torch.zeros(num_experts)
    for e in idx.reshape(-1).tolist():
        load[e] += 1
    return idx, score, losses, logits, load
