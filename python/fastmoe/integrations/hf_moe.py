"""Hugging Face MoE models on fastmoe: the experts of a loaded model run on fastmoe's token path and grouped GEMM,
with the model's own router, weights and code around them (docs/integrations.md, "Hugging Face MoE models").

transformers 5 stores the experts of its MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 and the
others whose experts class carries ``@use_experts_implementation``) as 3-D parameters, ``gate_up_proj [E, 2 * I,
H]`` (or ``up_proj [E, I, H]`` without a gate) and ``down_proj [E, H, I]``, and routes their forward through its
experts interface by the name in ``config._experts_implementation``, with the router's ``top_k_index [T, k]`` and
``top_k_weights [T, k]``. fastmoe registers itself there under the name ``"fastmoe"``: the router, the shared
experts, the aux loss and the state dict stay Hugging Face's, and only the expert computation changes:

    TokenDispatch (plan, permute) -> grouped_linear(gate_up_proj) -> the module's own gate/activation
    -> grouped_linear(down_proj) -> the weighted combine

``grouped_linear`` takes ``weight [E, out, in]``, which is Hugging Face's layout, so the parameters are used as
they are: nothing is copied and nothing converted, and :func:`restore_hf` only switches the name back.

transformers is imported only when a function here is called, so ``import fastmoe`` does not need it.
"""

import torch
from torch import nn

from fastmoe import debug, ops

__all__ = [
    "IMPLEMENTATION",
    "experts_forward",
    "find_hf_experts",
    "register_experts_implementation",
    "restore_hf",
    "use_fastmoe",
]

# The name fastmoe is registered under in transformers' experts interface.
IMPLEMENTATION = "fastmoe"
# Where use_fastmoe keeps, on each experts module it switched, the implementation the module had before.
_PREVIOUS = "_fastmoe_previous_experts_implementation"
# transformers' default when a model does not name one (PreTrainedModel.get_correct_experts_implementation).
_HF_DEFAULT = "grouped_mm"
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

# The token path (fastmoe::TokenDispatch, docs/ops.md), registered when fastmoe._C loads.
_TokenDispatch = torch.classes.fastmoe.TokenDispatch


def _autocast_on(device: torch.device) -> bool:
    return torch.is_autocast_enabled(device.type)


def _expert_weights(module: nn.Module):
    """``(w_in, b_in, w_out, b_out)`` of an experts module, each weight as ``[E, out, in]`` (a transposed view for
    the modules that store ``[E, in, out]``), each bias ``[E, out]`` or None."""
    w_in = module.gate_up_proj if module.has_gate else module.up_proj
    b_in = None
    w_out, b_out = module.down_proj, None
    if module.has_bias:
        b_in = module.gate_up_proj_bias if module.has_gate else module.up_proj_bias
        b_out = module.down_proj_bias
    if module.is_transposed:
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    return w_in, b_in, w_out, b_out


def experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The ``"fastmoe"`` entry of transformers' experts interface: the forward of an experts module (``self``)
    given the router's choice. ``hidden_states [T, H]``, ``top_k_index [T, k]`` (ids at or above
    ``self.num_experts`` are the slots transformers' own expert parallelism sends elsewhere; they are dropped, as
    their weights are zero), ``top_k_weights [T, k]``; returns ``[T, H]`` in the dtype of ``hidden_states``.

    The gate between the two GEMMs is the module's own (``self._apply_gate`` on ``[gate | up]``, or
    ``self.act_fn`` without a gate), so any activation or gating a model defines is kept."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 2:
        got = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__
        raise ValueError(f"hidden_states must be [tokens, hidden], got {got}")
    if not isinstance(top_k_index, torch.Tensor) or top_k_index.dim() != 2:
        got = tuple(top_k_index.shape) if isinstance(top_k_index, torch.Tensor) else type(top_k_index).__name__
        raise ValueError(f"top_k_index must be [tokens, k], got {got}")
    if top_k_index.is_floating_point() or top_k_index.is_complex() or top_k_index.dtype == torch.bool:
        raise TypeError(f"top_k_index must hold integer expert ids, got dtype {top_k_index.dtype}")
    if not isinstance(top_k_weights, torch.Tensor) or tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        got = tuple(top_k_weights.shape) if isinstance(top_k_weights, torch.Tensor) else type(top_k_weights).__name__
        raise ValueError(f"top_k_weights must be [tokens, k] = {list(top_k_index.shape)} like top_k_index, got {got}")
    num_experts = self.num_experts
    w_in, b_in, w_out, b_out = _expert_weights(self)
    x = hidden_states
    if x.dtype != w_in.dtype and not _autocast_on(x.device):
        x = x.to(w_in.dtype)  # as transformers' grouped_mm does; under autocast the GEMMs cast
    idx = top_k_index.to(torch.int64)
    idx = torch.where(idx >= num_experts, -1, idx)
    name = debug.name_of(self) if debug.is_debug() else ""
    with debug.raising_non_finite():
        tokens = _TokenDispatch(x, idx, top_k_weights, num_experts, 1, "", 1, True, name)
        offsets = tokens.expert_offsets(0)
        h = ops.grouped_linear(tokens.rows(0), offsets, w_in, b_in)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        y = ops.grouped_linear(h, offsets, w_out, b_out)
        tokens.give(0, y)
        return tokens.combine().to(hidden_states.dtype)


def register_experts_implementation() -> str:
    """Registers :func:`experts_forward` in transformers' experts interface under ``"fastmoe"`` (once per process;
    again is harmless) and returns that name, so ``from_pretrained(..., experts_implementation="fastmoe")`` and
    ``model.set_experts_implementation("fastmoe")`` work. Raises ``ImportError`` when the installed transformers
    has no experts interface (it came with transformers 5)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as error:
        raise ImportError(
            "fastmoe runs Hugging Face MoE models through transformers' experts interface "
            "(transformers.integrations.moe.ExpertsInterface, transformers >= 5), which cannot be imported: "
            f"{error}"
        ) from error
    ExpertsInterface.register(IMPLEMENTATION, experts_forward)
    return IMPLEMENTATION


def _is_experts_module(module: nn.Module) -> bool:
    """An experts class decorated with transformers' ``use_experts_implementation``: its forward is the
    decorator's dispatcher and the decorator's flags are set on the instance."""
    forward = getattr(type(module), "forward", None)
    return (
        getattr(forward, "__wrapped__", None) is not None
        and all(hasattr(module, flag) for flag in ("has_gate", "has_bias", "is_transposed", "config"))
        and hasattr(module.config, "_experts_implementation")
    )


def _layout_problem(module: nn.Module) -> str | None:
    """Why fastmoe cannot run this experts module (None when it can)."""
    num_experts = getattr(module, "num_experts", None)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        return f"it has no positive int num_experts (got {num_experts!r})"
    names = ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]
    if module.has_bias:
        names += ["gate_up_proj_bias" if module.has_gate else "up_proj_bias", "down_proj_bias"]
    for name in names:
        tensor = getattr(module, name, None)
        if not isinstance(tensor, torch.Tensor):
            return f"its {name} is {type(tensor).__name__}, not a tensor"
        want = 3 if not name.endswith("_bias") else 2
        if tensor.dim() != want or tensor.shape[0] != num_experts:
            return f"its {name} has shape {list(tensor.shape)}, not [num_experts={num_experts}, ...] with {want} dims"
        if tensor.dtype not in _FLOAT_DTYPES:
            return f"its {name} has dtype {tensor.dtype} (fastmoe's grouped GEMM takes fp64, fp32, bf16 and fp16)"
    return None


def find_hf_experts(model: nn.Module) -> list:
    """The experts modules of ``model`` that dispatch through transformers' experts interface, in module order,
    as ``(path, module)`` pairs (``model`` itself has path ``""``). Raises ``TypeError`` naming ``model`` when it
    is not an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got model of type {type(model).__name__}")
    return [(path, module) for path, module in model.named_modules() if _is_experts_module(module)]


def _describe(module) -> str:
    kind = type(module)
    return f"{kind.__module__}.{kind.__qualname__}"


def use_fastmoe(model: nn.Module) -> nn.Module:
    """Runs the experts of a Hugging Face MoE model on fastmoe, in place, and returns ``model``.

    Every experts module that dispatches through transformers' experts interface (Mixtral, Qwen2-MoE, Qwen3-MoE,
    OLMoE, DeepSeek-V3, ...) switches its config's ``_experts_implementation`` to ``"fastmoe"``; the
    implementation it had before is kept for :func:`restore_hf`. The parameters, buffers and state dict are left
    as they are (the same tensors), the routers, shared experts and dense layers run Hugging Face's code, and
    ``output_router_logits`` and the aux loss work as before. Calling it again is harmless.

    Raises ``TypeError`` naming ``model`` for a non-module, ``ValueError`` naming the model's class when it has no
    such experts module (a transformers 4 model, a dense model), or naming the module path when an experts module
    stores its weights in a way fastmoe's grouped GEMM cannot take (quantized weights, for example); nothing is
    changed then.
    """
    experts = find_hf_experts(model)
    if not experts:
        raise ValueError(
            f"model ({_describe(model)}) has no experts module that dispatches through transformers' experts "
            "interface (a class decorated with transformers.integrations.moe.use_experts_implementation, as the MoE "
            "models of transformers >= 5 have); for a dense model see fastmoe.moefy"
        )
    for path, module in experts:
        problem = _layout_problem(module)
        if problem is not None:
            raise ValueError(f"cannot run the experts {path or '<model>'} ({_describe(module)}) on fastmoe: {problem}")
    register_experts_implementation()
    for _, module in experts:
        current = module.config._experts_implementation
        if current != IMPLEMENTATION:
            setattr(module, _PREVIOUS, current)
    # The configs are shared (every layer's experts hold the model's config), so switch each once, after every
    # module has recorded what its config had.
    for _, module in experts:
        module.config._experts_implementation_internal = IMPLEMENTATION
    return model


def restore_hf(model: nn.Module) -> nn.Module:
    """Undoes :func:`use_fastmoe`, in place, and returns ``model``: every experts module running on fastmoe goes
    back to the implementation it had before (transformers' default, ``"grouped_mm"``, for a model loaded with
    ``experts_implementation="fastmoe"``). The weights were never copied, so the state dict is the one the model
    has now, trained or not: ``save_pretrained`` writes a checkpoint that transformers loads without fastmoe.

    Raises ``TypeError`` naming ``model`` for a non-module and ``ValueError`` naming its class when none of its
    experts modules runs on fastmoe."""
    converted = [(p, m) for p, m in find_hf_experts(model) if m.config._experts_implementation == IMPLEMENTATION]
    if not converted:
        raise ValueError(
            f"model ({_describe(model)}) has no experts module running on fastmoe (call fastmoe.use_fastmoe(model) "
            "first)"
        )
    previous = [getattr(module, _PREVIOUS, _HF_DEFAULT) for _, module in converted]
    for (_, module), implementation in zip(converted, previous, strict=True):
        module.config._experts_implementation_internal = implementation
        if hasattr(module, _PREVIOUS):
            delattr(module, _PREVIOUS)
    return model
