import torch
from torch import nn

from fastmoe import _checks, debug


class BaseGate(nn.Module):
    """Common state of every gate: the named loss terms (``"balance"``, ``"z"``) and the capacity-drop count
    (``num_dropped``, [] int64 on the device) of the last forward. ``num_expert`` is per rank; the gate routes over
    ``tot_expert = num_expert * world_size`` experts. fastmoe's gates compute logits and call their op of
    csrc/ops/gates.cpp, as the C++ gates do; a gate of your own needs only ``forward(x) -> (topk_idx, topk_score)``.
    """

    def __init__(self, num_expert: int, world_size: int):
        super().__init__()
        self.num_expert = _checks.positive_int("num_expert", num_expert)
        self.world_size = _checks.positive_int("world_size", world_size)
        self.tot_expert = num_expert * world_size
        self._losses: dict[str, torch.Tensor] = {}
        self.num_dropped: torch.Tensor | None = None

    def reset_stats(self) -> None:
        """Forgets the losses and the drop count of the previous forward (each forward starts with this)."""
        _checks.set_plain(self, _losses={}, num_dropped=None)

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
        terms = list(self.get_losses(clear=clear).values())
        return sum(terms[1:], terms[0]) if terms else None

    @property
    def loss(self):
        """The summed loss of the last forward without clearing it (FastMoE's ``gate.loss``)."""
        return self.get_loss(clear=False)

    @property
    def has_loss(self) -> bool:
        return bool(self._losses)

    def _tokens(self, inp, like):
        """``inp [..., d_model]`` checked and viewed as ``[T, d_model]``; a forward starts here."""
        self.reset_stats()
        return _checks.token_matrix("inp", inp, self.d_model, like=like)

    def _logits(self, inp):
        """``self.gate(inp)``, for the gates whose logits come from the linear layer ``self.gate``."""
        logits = self.gate(self._tokens(inp, self.gate.weight))
        debug.check_finite(self, "gate logits", logits)
        return logits

    def _record(self, routing):
        """Keeps what a gate op returned (0-dim terms; ``[0]`` means none) and returns ``(topk_idx, topk_score)``."""
        topk_idx, topk_score, balance, z_loss, num_dropped = routing
        losses = {name: term for name, term in (("balance", balance), ("z", z_loss)) if term.dim() == 0}
        _checks.set_plain(self, _losses=losses, num_dropped=num_dropped if num_dropped.dim() == 0 else None)
        return topk_idx, topk_score


def no_tokens(width: int) -> torch.Tensor:
    """Logits of 0 tokens: a gate runs its op on them at construction, so the op checks the options."""
    return torch.empty(0, width)


def top_k_or_topk(gate: str, top_k, topk, default: int):
    """``top_k`` of a gate that also takes FastMoE's spelling ``topk``; both only if they agree (FMoE passes its
    ``top_k`` as the fourth positional argument, so ``functools.partial(GShardGate, topk=2)`` gets both)."""
    if topk is None:
        return default if top_k is None else top_k
    if top_k is None or (top_k == topk and type(top_k) is type(topk)):
        return topk
    raise ValueError(f"{gate} got top_k={top_k!r} and topk={topk!r}: topk is FastMoE's spelling of top_k, give one")
