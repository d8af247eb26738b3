"""FastMoE's ``fmoefy`` name (``fmoe.megatron.fmoefy``), on top of :func:`fastmoe.moefy`.

FastMoE's ``fmoefy`` turned the MLPs of a Megatron-LM model into MoE layers. fastmoe has no Megatron-LM adapter:
for a Megatron-LM model ``fmoefy`` raises ``NotImplementedError`` saying what to do instead. For any other model
(Hugging Face Llama, Qwen2, GPT-2, ...) it is :func:`fastmoe.moefy` with FastMoE's argument names
(docs/integrations.md has the table). With ``fastmoe.compat.install_fmoe_alias()``, ``fmoe.megatron`` is this
module.
"""

import torch.distributed as dist
from torch import nn

from fastmoe.integrations.transformers import _layer_kwargs, _positive_int, _upcycle

__all__ = ["fmoefy", "is_megatron_model"]

_PORTING = "docs/porting-from-fastmoe.md (section 'Megatron-LM today')"

# FastMoE's other fmoe.megatron names, which fastmoe does not have.
_FASTMOE_MEGATRON_NAMES = (
    "DistributedDataParallel",
    "MegatronMLP",
    "add_balance_log",
    "add_fmoe_args",
    "generate_megatron_gate_hook",
    "get_balance_profile",
    "load_checkpoint",
    "patch_forward_step",
    "patch_loss_func_v2_5",
    "patch_model_provider",
    "reset_gate_hook",
    "save_checkpoint",
)


def __getattr__(name: str):
    if name in _FASTMOE_MEGATRON_NAMES:
        raise AttributeError(
            f"fastmoe has no counterpart of FastMoE's fmoe.megatron.{name}: fastmoe has no Megatron-LM adapter; "
            f"{_PORTING} shows what to do instead"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_megatron_model(model: nn.Module) -> bool:
    """Whether ``model`` is (or wraps) a Megatron-LM model, decided without importing megatron: a submodule whose
    class comes from a ``megatron`` package (``megatron.core``, ``megatron.model``, ``megatron.legacy``), or the
    layout FastMoE's ``fmoefy`` walked (a ``language_model`` with an ``embedding`` and a ``transformer`` or an
    ``encoder``)."""
    for module in model.modules():
        if type(module).__module__.split(".")[0] == "megatron":
            return True
        language_model = getattr(module, "language_model", None)
        if isinstance(language_model, nn.Module):
            children = dict(language_model.named_children())
            if "embedding" in children and ("transformer" in children or "encoder" in children):
                return True
    return False


def fmoefy(
    model: nn.Module,
    fmoe_num_experts: int | None = None,
    distributed_experts: bool = True,
    hidden_hidden_size: int | None = None,
    top_k: int | None = None,
    gate=None,
    megatron_version: str | None = None,
    *,
    num_experts: int | None = None,
    moe_group=None,
    layers=None,
    every: int = 1,
    noise: float = 0.0,
    **layer_kwargs,
) -> nn.Module:
    """FastMoE's ``fmoefy(model, fmoe_num_experts, distributed_experts, hidden_hidden_size, top_k, gate,
    megatron_version)``.

    A Megatron-LM model (:func:`is_megatron_model`), or any ``megatron_version``, raises ``NotImplementedError``.
    Any other model goes to :func:`fastmoe.moefy`, and its FFN blocks become MoE layers whose experts are copies
    of the dense FFN:

    - ``fmoe_num_experts`` (older FastMoE: ``num_experts``): experts per rank, moefy's ``num_expert``. Required
      (FastMoE read it from Megatron's ``--num-experts``).
    - ``distributed_experts=True`` (FastMoE's default): the experts are spread over ``moe_group`` (default: the
      default process group, FastMoE used the data-parallel group) when torch.distributed is initialised, so the
      global count is ``fmoe_num_experts * world_size``; without torch.distributed, ``world_size`` is 1.
      ``False``: every rank holds all ``fmoe_num_experts`` experts (``world_size=1``, ``expert_dp_comm="dp"``).
    - ``hidden_hidden_size``: the experts' hidden width. The experts are copies of the dense FFN, so it must be
      ``None`` or the FFN's own width; anything else raises ``ValueError``.
    - ``top_k``: ``None`` is FastMoE's default, 2.
    - ``gate``: a gate class, ``None`` for NaiveGate (FastMoE's ``--balance-strategy naive``).
    - ``layers``, ``every``, ``noise`` and ``layer_kwargs`` (``gate_bias``, ``ep_chunks``, ...): as in moefy.

    Returns ``model``, changed in place, as FastMoE's did.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got model of type {type(model).__name__}")
    if megatron_version is not None or is_megatron_model(model):
        why = f"megatron_version={megatron_version!r}" if megatron_version is not None else "it is a Megatron-LM model"
        raise NotImplementedError(
            f"fmoefy cannot convert this model ({why}): fastmoe has no Megatron-LM adapter. Replace the MLP modules "
            f"with fastmoe.FMoETransformerMLP yourself as {_PORTING} shows, or use fastmoe.moefy, which upcycles "
            f"the FFN blocks of Hugging Face-style models (docs/integrations.md)"
        )
    if fmoe_num_experts is not None and num_experts is not None and fmoe_num_experts != num_experts:
        raise ValueError(
            f"fmoe_num_experts and num_experts are one argument under two names, got fmoe_num_experts="
            f"{fmoe_num_experts!r} and num_experts={num_experts!r}"
        )
    count = fmoe_num_experts if fmoe_num_experts is not None else num_experts
    if count is None:
        raise ValueError(
            "fmoe_num_experts is required outside Megatron-LM (FastMoE read it from --num-experts), got "
            "fmoe_num_experts=None"
        )
    if not isinstance(distributed_experts, bool):
        raise TypeError(f"distributed_experts must be a bool, got distributed_experts={distributed_experts!r}")
    if hidden_hidden_size is not None:
        if isinstance(hidden_hidden_size, bool) or not isinstance(hidden_hidden_size, int) or hidden_hidden_size < 1:
            raise ValueError(f"hidden_hidden_size must be a positive int or None, got {hidden_hidden_size!r}")
    world_size = 1
    if distributed_experts:
        if moe_group is not None or (dist.is_available() and dist.is_initialized()):
            world_size = dist.get_world_size(moe_group)
    elif moe_group is not None:
        raise ValueError(
            f"moe_group is the group the experts are spread over, but distributed_experts=False keeps every expert "
            f"on every rank; got moe_group={moe_group!r}"
        )
    top_k = 2 if top_k is None else top_k
    _positive_int("fmoe_num_experts", count)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= count * world_size:
        raise ValueError(
            f"top_k must be an int in [1, fmoe_num_experts * world_size = {count * world_size}], got top_k={top_k!r}"
        )
    _positive_int("every", every)
    layer_kwargs.setdefault("expert_dp_comm", "none" if distributed_experts else "dp")
    kwargs = _layer_kwargs(top_k, gate, world_size, moe_group if world_size > 1 else None, layer_kwargs)
    return _upcycle(model, count, layers, every, noise, kwargs, expect_d_hidden=hidden_hidden_size)
