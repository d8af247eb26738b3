"""Deterministic mode: bitwise-reproducible training on one machine.

``fastmoe.use_deterministic(True)`` sets a switch in the C++ library that every op reads; the ops also honour
``torch.use_deterministic_algorithms(True)``, so either one is enough. In that mode each op takes a path whose
result does not depend on thread or block scheduling (on CUDA the grouped GEMMs run fastmoe's tiled kernel,
never ``torch._grouped_mm``), and an op without such a path raises. docs/reliability.md lists every op.

Run-to-run reproducibility also needs the same seeds, inputs, machine, thread count and library versions; the
torch ops around fastmoe's (optimizer, loss, user expert modules) are torch's responsibility, which
``torch.use_deterministic_algorithms(True)`` covers.
"""

from fastmoe import _C

__all__ = ["use_deterministic", "is_deterministic", "deterministic_flag"]


def use_deterministic(enabled: bool = True) -> bool:
    """Turns fastmoe's deterministic mode on or off; returns the previous setting of fastmoe's own switch."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    previous = bool(_C.deterministic_flag())
    _C.set_deterministic(enabled)
    return previous


def deterministic_flag() -> bool:
    """fastmoe's own switch (set by :func:`use_deterministic`)."""
    return bool(_C.deterministic_flag())


def is_deterministic() -> bool:
    """What the ops read: fastmoe's switch or ``torch.are_deterministic_algorithms_enabled()``."""
    return bool(_C.deterministic())
