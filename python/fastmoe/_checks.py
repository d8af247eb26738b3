"""Argument checks shared by the front ends: each error names the argument and the value it got."""

import torch


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def top_k_in_range(top_k, num_experts_total: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts_total:
        raise ValueError(f"top_k must be an int in [1, num_expert * world_size = {num_experts_total}], got {top_k!r}")
    return top_k


def dense_tensor(name: str, value, optional: bool = False):
    """Checks ``value`` is a dense (strided, not quantized or nested) torch.Tensor, or None when ``optional``.

    The ops' own checks name the argument for every wrong shape, dtype and device, but a non-tensor or a sparse,
    quantized or nested tensor fails in torch's dispatcher first, with a message that does not name it."""
    if value is None and optional:
        return value
    if not isinstance(value, torch.Tensor):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    if value.is_nested or value.layout != torch.strided or value.is_quantized:
        kind = "nested" if value.is_nested else "quantized" if value.is_quantized else str(value.layout)
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {kind} tensor")
    return value


def token_matrix(name: str, x, d_model: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """Checks ``x [..., d_model]`` is a floating tensor (with the dtype and device of ``like``, a parameter of
    the module it enters) and returns it viewed as ``[tokens, d_model]``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != d_model:
        raise ValueError(f"{name} must have shape [..., d_model={d_model}], got {tuple(x.shape)}")
    if like is not None:
        if x.device != like.device:
            raise ValueError(f"{name} is on device {x.device} but the layer's parameters are on {like.device}")
        if x.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the layer's parameters are {like.dtype}")
    return x.reshape(-1, d_model)


def first_parameter(module: torch.nn.Module) -> torch.Tensor | None:
    return next(module.parameters(), None)
