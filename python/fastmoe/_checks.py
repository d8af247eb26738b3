"""Argument checks shared by the front ends: each error names the argument and the value it got."""

import math

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


def set_plain(module: torch.nn.Module, **attrs) -> None:
    """``setattr(module, name, value)`` for each of ``attrs``. A plain attribute (not a parameter, buffer,
    submodule or class property of that name) goes straight into ``module.__dict__``, where
    ``nn.Module.__setattr__`` would put it after checking it against those kinds: layers and gates set a few on
    every forward, and those checks are a measurable part of a small layer's host time. Under torch.compile (which
    traces ``setattr`` on modules, not writes to ``__dict__``) it is ``setattr`` for all."""
    if torch.compiler.is_compiling():
        for name, value in attrs.items():
            setattr(module, name, value)
        return
    for name, value in attrs.items():
        descriptor = getattr(type(module), name, None)
        if (
            name in module._parameters
            or name in module._buffers
            or name in module._modules
            or hasattr(type(descriptor), "__set__")  # a property (or other data descriptor) of a subclass
        ):
            setattr(module, name, value)
        else:
            module.__dict__[name] = value


def first_parameter(module: torch.nn.Module) -> torch.Tensor | None:
    return next(module.parameters(), None)


def typed(name: str, value, kind=float):
    """``value`` as a ``kind`` (float or bool); the op that takes it checks the range."""
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a {kind.__name__}, got {value!r}")
    return kind(value)


def capacity_pair(name: str, value) -> tuple[float, float]:
    """``capacity`` as FastMoE takes it: ``(train_factor, eval_factor)``, or one factor for both."""
    train, evaluation = value if isinstance(value, (tuple, list)) and len(value) == 2 else (value, value)
    for factor in (train, evaluation):
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"{name} must be a factor > 0 or a (train, eval) pair of them, got {name}={value!r}")
    return float(train), float(evaluation)


def replicate_rates(rates) -> tuple | None:
    """``ep_replicate_rates``: None, or ``(gemm_flops, link_bytes)``, two positive finite numbers."""
    if rates is None:
        return None
    if (
        not isinstance(rates, (tuple, list))
        or len(rates) != 2
        or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r < math.inf for r in rates)
    ):
        raise ValueError(
            f"ep_replicate_rates must be (gemm_flops, link_bytes), two positive finite numbers, got {rates!r}"
        )
    return (float(rates[0]), float(rates[1]))


def gate_matches(gate, num_experts_total: int, d_model: int) -> None:
    """A gate built for another layer would route over the wrong experts (some never used, or ids past the end):
    a gate that says how many experts it routes over (``tot_expert``, as every fastmoe gate does) or its width
    (``d_model``) must agree with the layer."""
    gate_experts = getattr(gate, "tot_expert", None)
    if isinstance(gate_experts, int) and gate_experts != num_experts_total:
        raise ValueError(
            f"the gate routes over {gate_experts} experts (gate.tot_expert) but the layer has {num_experts_total} "
            f"(num_expert * world_size); build the gate with the layer's num_expert and world_size"
        )
    gate_width = getattr(gate, "d_model", None)
    if isinstance(gate_width, int) and gate_width != d_model:
        raise ValueError(f"the gate was built for d_model={gate_width} but the layer has d_model={d_model}")
