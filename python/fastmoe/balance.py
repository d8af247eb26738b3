"""Load-balance statistics of MoE layers, for logging.

Each :class:`fastmoe.FMoE` forward keeps a :class:`BalanceRecord` of device tensors (the plan's expert counts,
the gate's capacity-drop count and loss terms); nothing is read on the host in the forward. The reads happen
here, once per call, for every layer together:

- ``layer.balance_stats()`` -> a dict of Python numbers for one layer (see :func:`summarize`);
- ``collect(model)`` -> a flat ``{"moe/layer0/drop_rate": 0.01, ...}`` dict over every MoE layer of a model,
  ready for ``tqdm.set_postfix(**stats)`` or a TensorBoard loop;
- ``log_balance(model, writer.add_scalar, step)`` calls ``callback(key, value, step)`` for each entry.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn


class BalanceRecord(NamedTuple):
    """What one MoE forward leaves for the statistics (device tensors, never read in the forward)."""

    num_tokens: int  # T
    num_slots: int  # T * k (k = slots per token of the routing)
    expert_counts: torch.Tensor  # [E] int64: assignments each expert processed (after any capacity drop)
    num_dropped: torch.Tensor | None  # [] int64: assignments the gate dropped for capacity, None if it reports none
    losses: dict[str, torch.Tensor]  # the gate's loss terms (detached scalars)


# Per-layer scalar statistics, in the order collect() writes them.
SCALAR_KEYS = ("num_tokens", "drop_rate", "unrouted_rate", "load_cv", "max_over_mean", "max_load", "loss")


def summarize(record: BalanceRecord, values: list[float]) -> dict:
    """The statistics of one record, given ``values`` = its tensors read on the host (see :func:`_flatten`).

    Returns a dict with:

    - ``expert_counts``: list of ints, assignments processed per (global) expert;
    - ``num_tokens``, ``num_slots`` (T, T * k), ``routed`` (sum of the counts);
    - ``dropped`` and ``drop_rate = dropped / (T * k)``: assignments the gate dropped for capacity (0 for gates
      without a capacity);
    - ``unrouted_rate = (T * k - routed) / (T * k)``: every empty slot, whatever the reason (capacity, GShard's
      random routing, expert choice's empty slots);
    - ``load_cv = std(counts) / mean(counts)`` (population std), ``max_load``, ``max_over_mean =
      max(counts) / mean(counts)``; with nothing routed the load counts as even (0 and 1.0);
    - ``losses``: the gate's loss terms by name, and ``loss`` their sum (0.0 when there is none).
    """
    num_experts = record.expert_counts.numel()
    counts = [int(round(v)) for v in values[:num_experts]]
    dropped = int(round(values[num_experts]))
    losses = {name: values[num_experts + 1 + i] for i, name in enumerate(record.losses)}
    routed = sum(counts)
    slots = record.num_slots
    mean = routed / num_experts
    if routed > 0:
        variance = sum((c - mean) ** 2 for c in counts) / num_experts
        load_cv = math.sqrt(variance) / mean
        max_over_mean = max(counts) / mean
    else:
        load_cv, max_over_mean = 0.0, 1.0
    return {
        "expert_counts": counts,
        "num_tokens": record.num_tokens,
        "num_slots": slots,
        "routed": routed,
        "dropped": dropped,
        "drop_rate": dropped / slots if slots else 0.0,
        "unrouted_rate": (slots - routed) / slots if slots else 0.0,
        "load_cv": load_cv,
        "max_load": max(counts) if counts else 0,
        "max_over_mean": max_over_mean,
        "losses": losses,
        "loss": float(sum(losses.values())),
    }


def _flatten(record: BalanceRecord, device) -> torch.Tensor:
    """``[counts..., dropped, losses...]`` as one float64 vector on ``device``."""
    counts = record.expert_counts.to(device=device, dtype=torch.float64)
    if record.num_dropped is None:
        dropped = torch.zeros(1, dtype=torch.float64, device=device)
    else:
        dropped = record.num_dropped.to(device=device, dtype=torch.float64).reshape(1)
    losses = [loss.to(device=device, dtype=torch.float64).sum().reshape(1) for loss in record.losses.values()]
    return torch.cat([counts, dropped] + losses)


def read_records(records: list[BalanceRecord]) -> list[dict]:
    """The :func:`summarize` dicts of ``records``, read from the device in one transfer (one host sync)."""
    if not records:
        return []
    device = records[0].expert_counts.device
    flat = [_flatten(record, device) for record in records]
    values = torch.cat(flat).tolist()  # the one host read
    out, start = [], 0
    for record, part in zip(records, flat, strict=True):
        out.append(summarize(record, values[start : start + part.numel()]))
        start += part.numel()
    return out


def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every MoE layer in ``model`` (modules with ``balance_record``), in module order."""
    return [(name, module) for name, module in model.named_modules() if hasattr(module, "balance_record")]


def collect(model: nn.Module, prefix: str = "moe", include_counts: bool = False, use_names: bool = False) -> dict:
    """A flat ``{key: float}`` of the balance statistics of the last forward of every MoE layer of ``model``.

    Keys are ``f"{prefix}/layer{i}/{stat}"`` with ``i`` the layer's position among the MoE layers of the model
    (or its module name with ``use_names=True``) and ``stat`` one of ``num_tokens``, ``drop_rate``,
    ``unrouted_rate``, ``load_cv``, ``max_over_mean``, ``max_load``, ``loss`` and ``loss/<term>`` per loss term,
    plus ``expert_count/<e>`` per expert with ``include_counts``. Over all layers: ``f"{prefix}/all/drop_rate"``
    (total dropped / total slots), ``.../max_over_mean`` and ``.../load_cv`` (the worst layer) and
    ``.../loss`` (the sum). Layers that have not run are skipped; a model without any gives ``{}``.
    One host sync for the whole model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    named = [
        (name if use_names else f"layer{i}", module.balance_record)
        for i, (name, module) in enumerate(moe_layers(model))
        if module.balance_record is not None
    ]
    stats = read_records([record for _, record in named])
    out: dict[str, float] = {}
    for (label, _), layer in zip(named, stats, strict=True):
        base = f"{prefix}/{label}"
        for key in SCALAR_KEYS:
            out[f"{base}/{key}"] = float(layer[key])
        for name, value in layer["losses"].items():
            out[f"{base}/loss/{name}"] = float(value)
        if include_counts:
            for e, count in enumerate(layer["expert_counts"]):
                out[f"{base}/expert_count/{e}"] = float(count)
    if stats:
        slots = sum(layer["num_slots"] for layer in stats)
        out[f"{prefix}/all/drop_rate"] = sum(layer["dropped"] for layer in stats) / slots if slots else 0.0
        out[f"{prefix}/all/max_over_mean"] = max(layer["max_over_mean"] for layer in stats)
        out[f"{prefix}/all/load_cv"] = max(layer["load_cv"] for layer in stats)
        out[f"{prefix}/all/loss"] = float(sum(layer["loss"] for layer in stats))
    return out


def log_balance(model: nn.Module, callback: Callable, step: int | None = None, **collect_kwargs) -> dict:
    """Calls ``callback(key, value, step)`` (``callback(key, value)`` when ``step`` is None) for every entry of
    :func:`collect` and returns the dict. ``log_balance(model, writer.add_scalar, global_step)`` logs to
    TensorBoard; for tqdm use ``bar.set_postfix(collect(model))``."""
    if not callable(callback):
        raise TypeError(f"callback must be callable, got {callback!r}")
    stats = collect(model, **collect_kwargs)
    for key, value in stats.items():
        if step is None:
            callback(key, value)
        else:
            callback(key, value, step)
    return stats
