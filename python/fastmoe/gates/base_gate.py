import math

import torch
from torch import nn

from fastmoe import _checks


class BaseGate(nn.Module):
    """Common state of every gate: the balance losses and the capacity-drop count of the last forward.

    ``num_expert`` is per rank; the gate routes over ``num_expert * world_size`` global experts (``tot_expert``).

    A gate keeps its losses as named terms (``"balance"``, ``"z"``, ...): :meth:`add_loss` records one,
    :meth:`get_losses` returns them by name and :meth:`get_loss` returns their sum (``None`` when there is none),
    which is what ``FMoE.get_loss()`` adds to the training objective. A gate that limits capacity stores the
    number of assignments it dropped in ``num_dropped``, a 0-dim int64 tensor on the device that nothing in
    the forward reads on the host.
    """

    def __init__(self, num_expert: int, world_size: int):
        super().__init__()
        self.num_expert = _checks.positive_int("num_expert", num_expert)
        self.world_size = _checks.positive_int("world_size", world_size)
        self.tot_expert = num_expert * world_size
        self._losses: dict[str, torch.Tensor] = {}
        self.num_dropped: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------- losses

    def reset_stats(self) -> None:
        """Forgets the losses and the drop count of the previous forward (each forward starts with this)."""
        self._losses = {}
        self.num_dropped = None

    def set_loss(self, loss: torch.Tensor | None) -> None:
        """FastMoE's API: replaces every loss term by ``loss`` (recorded under the name ``"loss"``)."""
        self._losses = {} if loss is None else {"loss": loss}

    def add_loss(self, name: str, loss: torch.Tensor) -> None:
        """Records the loss term ``name`` of this forward (replacing a term of the same name)."""
        self._losses[name] = loss

    def get_losses(self, clear: bool = False) -> dict[str, torch.Tensor]:
        """The loss terms of the last forward by name (a copy); ``clear`` forgets them."""
        losses = dict(self._losses)
        if clear:
            self._losses = {}
        return losses

    def get_loss(self, clear: bool = True):
        """The sum of the loss terms of the last forward (None if this gate has none); ``clear`` forgets them."""
        losses = self.get_losses(clear=clear)
        if not losses:
            return None
        terms = list(losses.values())
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total

    @property
    def loss(self):
        """The summed loss of the last forward without clearing it (FastMoE's ``gate.loss``)."""
        return self.get_loss(clear=False)

    @property
    def has_loss(self) -> bool:
        return bool(self._losses)


# ----------------------------------------------------------------------------------------------- helpers


def loss_dtype(t: torch.Tensor) -> torch.dtype:
    """Losses and router probabilities are computed in at least fp32 (fp64 stays fp64)."""
    return torch.promote_types(t.dtype, torch.float32)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss without its coefficient: ``mean_t logsumexp_e(logits[t, e])^2`` (0 for 0 tokens).

    ``logits [T, E]``; computed in at least fp32, returns a 0-dim tensor with a gradient into ``logits``.
    """
    if logits.shape[0] == 0:
        return logits.sum().to(loss_dtype(logits))
    z = torch.logsumexp(logits.to(loss_dtype(logits)), dim=-1)
    return z.square().mean()


def slot_balance_term(logits: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """The Switch Transformer's load-balancing term over every routed slot: ``E * sum_e f_e * P_e``, with ``f_e``
    the fraction of the routed (token, slot) pairs of ``topk_idx [T, k]`` that go to expert e (-1 slots are not
    counted) and ``P_e`` the mean over the T tokens of the softmax probability of e (``logits [T, E]``).

    It is 1 when the routing is uniform and grows to E when one expert takes everything; the gradient reaches
    the logits through ``P_e`` only (``f`` is a count). For k = 1 it is Switch's loss; for k > 1 it counts every
    slot, so it balances the rows each expert really processes (GShard's form counts first choices only).
    Computed in at least fp32; 0 for 0 tokens."""
    dtype = loss_dtype(logits)
    num_tokens, num_experts = logits.shape
    # No boolean indexing: its output size would be read on the host, a device sync in every layer's forward.
    # A -1 slot adds 0 to expert 0 instead.
    flat = topk_idx.reshape(-1)
    is_routed = (flat >= 0).to(dtype)
    counts = torch.zeros(num_experts, dtype=dtype, device=logits.device)
    counts = counts.scatter_add(0, flat.clamp(min=0), is_routed)
    fraction = counts / counts.sum().clamp(min=1)
    mean_prob = torch.softmax(logits.to(dtype), dim=-1).sum(0) / max(num_tokens, 1)
    return num_experts * (fraction * mean_prob).sum()


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int, device) -> torch.Tensor:
    """``[E]`` int64 on ``device``, every entry ``ceil(capacity_factor * T * k / E)``.

    The count is a Python int from shapes, so no host sync happens.
    """
    capacity = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
    return torch.full((num_experts,), capacity, dtype=torch.int64, device=device)


def non_negative_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return float(value)


def top_k_or_topk(gate: str, top_k, topk, default: int):
    """The ``top_k`` of a gate that also accepts FastMoE's spelling ``topk`` (GShardGate, SwitchGate, DCGate).

    Giving both is accepted only when they agree: FMoE passes its ``top_k`` as the fourth positional argument,
    so a ``functools.partial(GShardGate, topk=2)`` handed to a layer gets both."""
    if topk is None:
        return default if top_k is None else top_k
    if top_k is None or (top_k == topk and type(top_k) is type(topk)):
        return topk
    raise ValueError(
        f"{gate} got top_k={top_k!r} and topk={topk!r}: topk is FastMoE's spelling of top_k, give one of them "
        "(or the same value to both)"
    )


def capacity_pair(name: str, value) -> tuple[float, float]:
    """``capacity`` as FastMoE takes it: ``(train_factor, eval_factor)``, or one factor for both."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a factor or a (train, eval) pair of factors, got {value!r}")
        train, evaluation = value
    else:
        train = evaluation = value
    for factor in (train, evaluation):
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"{name} factors must be finite floats > 0, got {name}={value!r}")
    return float(train), float(evaluation)
