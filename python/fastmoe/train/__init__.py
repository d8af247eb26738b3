"""The end-to-end training program of fastmoe: an MoE GPT against its dense baseline at the same active FLOPs.

``fastmoe-train`` (console script) and ``python -m fastmoe.train`` run :func:`main`; ``--help`` lists the flags.
Modules: ``data`` (corpus, split, sampler), ``model`` (the GPT), ``loop`` (one model's training),
``checkpointing`` (atomic save and bitwise resume), ``report`` (summary table and plot), ``cli`` (the flags).
"""

from fastmoe.train.cli import build_parser, main

__all__ = ["build_parser", "main"]
