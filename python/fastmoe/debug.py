"""Debug mode: catch NaN and Inf where they enter an MoE layer, instead of many steps later in the loss.

With ``fastmoe.set_debug(True)`` (or the environment variable ``FASTMOE_DEBUG=1`` at import), every gate checks
its logits, and every ``FMoE`` layer checks the gate's routing (scores finite, expert ids in range) and the
experts' outputs. The first non-finite value raises :class:`NonFiniteError` naming the layer, the tensor, how
many values are NaN and Inf, and where the first one is. Each check reads one flag on the host (one device sync
per check), so debug mode is for finding a problem, not for production runs.

Outside debug mode nothing is checked and non-finite values follow the policy of docs/reliability.md: they stay
in the rows of the tokens that produced them in the forward pass.
"""

import contextlib
import os

import torch
from torch import nn

from fastmoe import _C

__all__ = ["NonFiniteError", "set_debug", "is_debug", "name_modules", "check_finite"]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


_enabled = _env_flag("FASTMOE_DEBUG")
_C.set_debug(_enabled)  # the C++ token path (fastmoe::TokenDispatch) checks the routing and the experts' outputs


class NonFiniteError(RuntimeError):
    """A tensor checked in debug mode holds NaN or Inf."""


def set_debug(enabled: bool = True) -> bool:
    """Turns debug mode on or off and returns the previous setting."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    previous, _enabled = _enabled, enabled
    _C.set_debug(enabled)
    return previous


def is_debug() -> bool:
    return _enabled


def name_modules(model: nn.Module, prefix: str = "") -> nn.Module:
    """Records each submodule's qualified name (``blocks.3.moe``), which debug errors then show instead of the
    bare class name. Returns ``model``."""
    for name, module in model.named_modules(prefix=prefix):
        module._fastmoe_debug_name = name or type(module).__name__
    return model


def name_of(owner) -> str:
    if owner is None:
        return "fastmoe"
    cls = type(owner).__name__
    name = getattr(owner, "_fastmoe_debug_name", None)
    return f"{cls} '{name}'" if name and name != cls else cls


def check_finite(owner, what: str, tensor: torch.Tensor) -> None:
    """In debug mode, raises :class:`NonFiniteError` when ``tensor`` holds NaN or Inf; otherwise does nothing. The
    check and its message are the C++ token path's (``torch.ops.fastmoe.check_finite``), so both front ends report
    alike."""
    if not _enabled or not isinstance(tensor, torch.Tensor):
        return
    with raising_non_finite():
        torch.ops.fastmoe.check_finite(tensor, name_of(owner), what)


@contextlib.contextmanager
def raising_non_finite():
    """Turns the C++ token path's debug-mode report of NaN or Inf values (a RuntimeError carrying the message of
    :func:`check_finite`) into :class:`NonFiniteError`."""
    try:
        yield
    except RuntimeError as error:
        if _enabled and "fastmoe debug mode is on" in str(error) and not isinstance(error, NonFiniteError):
            raise NonFiniteError(str(error).split("\nException raised from")[0]) from None
        raise
