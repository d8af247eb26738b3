"""Python entry points of the registered ops (``torch.ops.fastmoe``), with shapes documented.

Every function is a direct call of the C++ op, so gradients come from the C++ autograd functions. See
docs/ops.md for the full contract.
"""

from typing import NamedTuple

import torch

from fastmoe._checks import dense_tensor

_ops = torch.ops.fastmoe


class Plan(NamedTuple):
    """The routing plan of ``topk_idx [T, k]``; see :func:`make_plan`."""

    expert_counts: torch.Tensor  # [E] int64
    expert_offsets: torch.Tensor  # [E + 1] int64
    sorted_pair: torch.Tensor  # [T * k] int64, -1 at the tail
    pair_pos: torch.Tensor  # [T, k] int64, -1 for dropped slots

    def first_rows(self, n: int) -> "Plan":
        """The plan cut to its first ``n`` sorted rows, ``n`` >= the routed pairs (which come first):
        :func:`permute` then gives ``[n, d]`` and :func:`unpermute_combine` takes ``[n, d]``, with no zero tail."""
        return self._replace(sorted_pair=self.sorted_pair[:n])


def route_topk(logits: torch.Tensor, k: int, score_fn: str = "topk_softmax"):
    """``logits [T, E]`` -> ``(topk_idx [T, k] int64, topk_score [T, k])``.

    ``score_fn="topk_softmax"`` softmaxes the k selected logits (FastMoE's NaiveGate); ``"softmax_topk"``
    softmaxes all E logits and keeps the top k probabilities. Ties go to the lower expert id.
    """
    return _ops.route_topk(dense_tensor("logits", logits), k, score_fn)


def make_plan(topk_idx: torch.Tensor, num_experts: int) -> Plan:
    """Counts, offsets and the stable expert-ordered permutation of the (token, slot) pairs.

    ``topk_idx [T, k]`` holds expert ids in ``[0, num_experts)`` or -1 for a dropped slot.
    """
    return Plan(*_ops.make_plan(dense_tensor("topk_idx", topk_idx), num_experts))


def capacity_limit(topk_idx: torch.Tensor, topk_score: torch.Tensor, expert_capacity: torch.Tensor):
    """Keeps at most ``expert_capacity[e]`` assignments per expert, the highest-scored (ties: lower
    ``token * k + slot`` first); the others become -1.

    ``topk_idx [T, k]`` int64 (-1 = already dropped), ``topk_score [T, k]``, ``expert_capacity [E]`` int64.
    Returns ``(kept_idx [T, k], num_dropped)`` where ``num_dropped`` is a 0-dim int64 tensor on the same device
    (not read on the host). Deterministic; not differentiable.
    """
    return _ops.capacity_limit(
        dense_tensor("topk_idx", topk_idx),
        dense_tensor("topk_score", topk_score),
        dense_tensor("expert_capacity", expert_capacity),
    )


def balance_loss(logits: torch.Tensor, expert_counts: torch.Tensor, num_pairs: int, coef: float) -> torch.Tensor:
    """The gates' load-balancing term ``coef * E * sum_e f_e P_e``: ``f_e = expert_counts[e] / num_pairs`` (the
    share of the routed pairs on expert e), ``P_e`` the mean over the tokens of ``softmax(logits[t])_e``.

    ``logits [T, E]`` float, ``expert_counts [E]`` int64. Returns a 0-dim tensor (float32, or float64 for float64
    logits). Differentiable with respect to the logits; one deterministic kernel each way on CUDA.
    """
    return _ops.balance_loss(
        dense_tensor("logits", logits), dense_tensor("expert_counts", expert_counts), num_pairs, coef
    )


def balance_loss_backward(
    grad: torch.Tensor, logits: torch.Tensor, expert_counts: torch.Tensor, num_pairs: int, coef: float
) -> torch.Tensor:
    """The gradient of :func:`balance_loss` for the logits, ``[T, E]`` in their dtype, for ``grad`` (0-dim)."""
    return _ops.balance_loss_backward(
        dense_tensor("grad", grad),
        dense_tensor("logits", logits),
        dense_tensor("expert_counts", expert_counts),
        num_pairs,
        coef,
    )


def swiglu(h: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU of gated experts: ``h [..., 2 * hidden]`` holds ``[gate | up]``; returns ``silu(gate) * up``
    ``[..., hidden]`` in h's dtype, computed in fp32 (fp64 for fp64) and rounded once. Differentiable (also twice);
    the backward recomputes the sigmoid from ``h``, the only tensor saved. One elementwise kernel each way on CUDA.

    ``scale`` (h's leading shape, any float dtype) multiplies each row before the rounding and is differentiable
    too: an MoE layer applies its routing scores there (``TokenDispatch.row_scores``, then ``give(..., scored=True)``)
    so that the combine's backward no longer reads the experts' output."""
    return _ops.swiglu(dense_tensor("h", h), dense_tensor("scale", scale, optional=True))


def swiglu_backward(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`swiglu` for ``h``, ``[..., 2 * hidden]``, for ``grad [..., hidden]``."""
    return _ops.swiglu_backward(dense_tensor("grad", grad), dense_tensor("h", h))


def swiglu_scaled_backward(grad: torch.Tensor, h: torch.Tensor, scale: torch.Tensor):
    """The gradients of ``swiglu(h, scale)``: ``(grad_h [..., 2 * hidden], grad_scale [...])``, the latter each
    row's sum of ``grad * silu(gate) * up`` in the scale's dtype."""
    return _ops.swiglu_scaled_backward(dense_tensor("grad", grad), dense_tensor("h", h), dense_tensor("scale", scale))


def gelu_backward_bias(grad: torch.Tensor, h: torch.Tensor, expert_offsets: torch.Tensor):
    """GELU's gradient (erf form) for ``h [N, hidden]``, an expert layer's first GEMM output whose rows are grouped by
    ``expert_offsets [E + 1]``, with that GEMM's bias gradient: ``(grad_h [N, hidden], grad_bias [E, hidden])``, the
    latter each expert's column sums of ``grad_h``. On CUDA one kernel that sums ``grad_h`` as it writes it, with the
    bits of ``torch.ops.aten.gelu_backward`` and of :func:`grouped_linear`'s bias gradient. Not differentiable."""
    return _ops.gelu_backward_bias(
        dense_tensor("grad", grad), dense_tensor("h", h), dense_tensor("expert_offsets", expert_offsets)
    )


def permute(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """``x [T, d]`` -> ``[T * k, d]`` rows in plan order (zero rows at the tail for dropped slots)."""
    plan = _plan(plan)
    return _ops.permute(dense_tensor("x", x), plan.sorted_pair, plan.pair_pos)


def unpermute_combine(y_sorted: torch.Tensor, plan: Plan, topk_score: torch.Tensor | None = None):
    """``y_sorted [T * k, d]`` -> ``[T, d]``: each token's slots summed, weighted by ``topk_score [T, k]``."""
    plan = _plan(plan)
    topk_score = dense_tensor("topk_score", topk_score, optional=True)
    return _ops.unpermute_combine(dense_tensor("y_sorted", y_sorted), plan.sorted_pair, plan.pair_pos, topk_score)


def grouped_linear(x: torch.Tensor, expert_offsets: torch.Tensor, weight: torch.Tensor, bias=None):
    """``x [N, in]`` rows grouped by expert (``expert_offsets [E + 1]``) times ``weight [E, out, in]`` (+ bias)."""
    return _ops.grouped_linear(
        dense_tensor("x", x),
        dense_tensor("expert_offsets", expert_offsets),
        dense_tensor("weight", weight),
        dense_tensor("bias", bias, optional=True),
    )


def _plan(plan) -> Plan:
    """A :class:`Plan` (or any 4-tuple in its order) with dense tensors for the fields the ops read."""
    if not isinstance(plan, tuple) or len(plan) != 4:
        raise TypeError(f"plan must be the Plan returned by make_plan, got {type(plan).__name__}")
    plan = Plan(*plan)
    dense_tensor("plan.sorted_pair", plan.sorted_pair)
    dense_tensor("plan.pair_pos", plan.pair_pos)
    return plan


def counts_to_offsets(expert_counts: torch.Tensor) -> torch.Tensor:
    """``[E]`` counts -> ``[E + 1]`` exclusive prefix sum, on the counts' device (no host sync)."""
    dense_tensor("expert_counts", expert_counts)
    if expert_counts.dim() != 1:
        raise ValueError(f"expert_counts must be 1-D [num_experts], got shape {tuple(expert_counts.shape)}")
    if expert_counts.dtype != torch.int64:
        raise ValueError(f"expert_counts must be int64, got {expert_counts.dtype}")
    zero = expert_counts.new_zeros(1)
    return torch.cat([zero, torch.cumsum(expert_counts, 0)])


# ------------------------------------------------------------------------------------------ expert parallelism


def group_name(group=None) -> str:
    """The name torch.distributed registered ``group`` under (``None``: the default group); the exchange ops
    find the group by this name in C++."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "expert parallelism needs torch.distributed: call torch.distributed.init_process_group first "
            f"(group={group!r})"
        )
    if group is None:
        group = dist.group.WORLD
    return group.group_name


def ep_route(topk_idx: torch.Tensor, num_local: int, world: int):
    """Where this rank's tokens go over ``world`` ranks of ``num_local`` experts each: ``topk_idx [T, k]`` ->
    ``(token_ranks [T, world], dest_counts [world * (num_local + 1)])``; ``token_ranks[t, p]`` is ``p`` when one
    of token ``t``'s slots goes to rank ``p`` (else -1), and ``dest_counts`` holds per rank the slots for each of
    its local experts, then the number of tokens sent to it. Deterministic, no host sync."""
    return _ops.ep_route(topk_idx, num_local, world)


def exchange_counts(
    counts: torch.Tensor,
    group=None,
    row_dtype: torch.dtype | None = None,
    row_width: int | None = None,
    chunks: int | None = None,
) -> torch.Tensor:
    """``counts [W * E_local]`` int64 (rows this rank sends to each global expert) -> ``[W * E_local]``, entry
    ``s * E_local + e`` = rows rank ``s`` sends to this rank's local expert ``e``. A collective over ``group``.

    ``row_dtype``, ``row_width`` and ``chunks`` (how many chunks the counts describe) say what the row exchanges
    after this one will move. They travel with the counts, so ranks that disagree on them raise ``RuntimeError``
    on every rank, naming both values, instead of exchanging rows of different sizes (docs/distributed.md)."""
    return _ops.exchange_counts(counts, group_name(group), row_dtype, row_width, chunks)


def exchange(x: torch.Tensor, send_splits, recv_splits, group=None, out_rows: int | None = None) -> torch.Tensor:
    """All-to-all of rows: rows ``[0, sum(send_splits))`` of ``x`` go out, ``send_splits[p]`` to rank ``p``;
    ``recv_splits[p]`` rows come in from each rank ``p``, stacked in rank order, then zero rows up to
    ``out_rows``. Differentiable (the backward is the reverse exchange). A collective over ``group``."""
    return _ops.exchange(x, list(send_splits), list(recv_splits), group_name(group), out_rows)


def replicate_experts(weight: torch.Tensor, experts, num_local: int, group=None) -> torch.Tensor:
    """Hot-expert replication's copies: ``weight [num_local, ...]`` holds this rank's experts; returns the weights
    of the global experts ``experts`` (ascending ids, expert ``g`` owned by rank ``g // num_local`` of ``group``)
    on every rank, ``[len(experts), ...]``. ``group`` may be a process group or its name. A collective;
    differentiable: each copy's gradient is summed back into its owner's weight (docs/distributed.md)."""
    name = group if isinstance(group, str) else group_name(group)
    return _ops.replicate_experts(weight, list(experts), num_local, name)


def plan_replication(
    load: torch.Tensor, num_local: int, slot_cost: float, row_cost: float, expert_cost: float, max_experts: int
) -> list:
    """The replication policy (csrc/ref/replication.h) on ``load [W, W * num_local]``, the slots each rank routes
    to each global expert, with its costs in seconds (a slot row through an expert, a row moved and back, an
    expert's weights over one link and back): the experts to copy, ascending."""
    return _ops.plan_replication(load, num_local, slot_cost, row_cost, expert_cost, max_experts)
