"""Data and assertions shared by the fuzz generators (fuzz_ops.py): random tensors in random memory layouts,
the Case record, and comparisons with the references."""

import random
from collections.abc import Callable
from typing import NamedTuple

import torch

F = torch.ops.fastmoe
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [0, 1, 1, 2, 3, 5, 8, 17]
# Accuracy of an op against the fp64 reference, per dtype, relative to the size of the values.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}
SCALAR_NAME = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.bool: "Bool",
    torch.uint8: "Byte",
}


class Case(NamedTuple):
    name: str  # "op/mutation"
    call: Callable
    check: Callable | None = None  # valid input: check(result) raises AssertionError on a wrong result
    error: tuple | None = None  # invalid input: (exception types, argument, value) the message must name
    meta_call: Callable | None = None  # valid input: the same call on the meta device (shapes only)


# ----------------------------------------------------------------------------------------------- data


def layout(rng: random.Random, t: torch.Tensor) -> torch.Tensor:
    """``t`` with the same values in a random memory layout: contiguous, column-major, or every other element
    of a larger buffer."""
    kind = rng.choice(["contiguous", "contiguous", "transposed", "strided"])
    if kind == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    if kind == "strided" and t.dim() >= 1:
        buffer = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
        view = buffer[..., 1::2]
        view.copy_(t)
        return view
    return t


def randn(rng: random.Random, *shape, dtype=torch.float32, device="cpu", overlap_ok=True) -> torch.Tensor:
    """Seeded normal data; for a 2-D shape sometimes an overlapping view (one row expanded, stride 0)."""
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    if overlap_ok and len(shape) == 2 and rng.random() < 0.15:
        row = torch.randn(shape[1], generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        return row.expand(*shape)
    return layout(rng, torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device))


def distinct_logits(rng: random.Random, num_tokens: int, num_experts: int, dtype, device) -> torch.Tensor:
    """``[T, E]`` rows of distinct values exactly representable in bf16 (steps of 0.5, shifted by 0.25s), so
    the top-k is unambiguous in every dtype."""
    rows = []
    for _ in range(num_tokens):
        perm = list(range(num_experts))
        rng.shuffle(perm)
        shift = rng.randint(-4, 4) * 0.25
        rows.append([(p - num_experts / 2) * 0.5 + shift for p in perm])
    logits = torch.tensor(rows, dtype=torch.float64).reshape(num_tokens, num_experts)
    if num_tokens > 1 and rng.random() < 0.15:
        logits = logits[:1].expand(num_tokens, num_experts)  # overlapping rows
        return logits.to(dtype=dtype, device=device)
    return layout(rng, logits.to(dtype=dtype, device=device))


def random_idx(rng: random.Random, num_tokens: int, k: int, num_experts: int, device) -> torch.Tensor:
    """``[T, k]`` int64 expert ids in [-1, E) (distinct per token when k <= E, as a gate gives; -1 = dropped)."""
    rows = []
    for _ in range(num_tokens):
        row = rng.sample(range(num_experts), k) if k <= num_experts else [rng.randrange(num_experts) for _ in range(k)]
        rows.append([-1 if rng.random() < 0.15 else e for e in row])
    return layout(rng, torch.tensor(rows, dtype=torch.int64).reshape(num_tokens, k).to(device))


def set_one(t: torch.Tensor, flat_index: int, value) -> torch.Tensor:
    t = t.clone().contiguous()
    t.view(-1)[flat_index] = value
    return t


def not_dense(rng: random.Random, t: torch.Tensor):
    """``t`` as something the ops cannot take: None, a sparse, quantized or nested tensor; and the word the
    front end's message must show."""
    kind = rng.choice(["None", "sparse", "quantized", "nested"])
    if kind == "None":
        return None, "NoneType"
    cpu = t.detach().cpu().float() if t.is_floating_point() else t.detach().cpu()
    if kind == "sparse":
        return cpu.to_sparse(), "sparse_coo"
    if kind == "quantized" and cpu.is_floating_point():
        return torch.quantize_per_tensor(cpu, 0.1, 0, torch.qint8), "quantized"
    return torch.nested.nested_tensor([cpu], layout=torch.jagged) if cpu.dim() >= 1 else None, (
        "nested" if cpu.dim() >= 1 else "NoneType"
    )


def not_dense_case(name: str, via_ops: bool, call, arg: str, kind: str) -> Case:
    """fastmoe.ops names the argument; torch.ops.fastmoe fails in torch's dispatcher (any exception, no crash)."""
    return Case(name, call, error=(TypeError, arg, kind) if via_ops else (Exception, "", ""))


def other_device(device: str) -> str:
    return "meta" if device == "cpu" else "cpu"


def wrong_float(rng: random.Random, dtype) -> torch.dtype:
    return rng.choice([d for d in FLOATS if d != dtype])


def to_meta(value):
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*[to_meta(v) for v in value])
    return value


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype, name: str, scale: float = 1.0) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype} != {dtype}"
    if actual.numel() == 0:
        return
    diff = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()
    magnitude = max(1.0, expected.detach().double().abs().max().item()) * scale
    assert diff <= TOLERANCE[dtype] * magnitude, f"{name}: max error {diff:.3e} > {TOLERANCE[dtype]:.1e} x {magnitude}"


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert torch.equal(actual.cpu(), expected.cpu()), f"{name}: values differ"


def valid_name(name: str) -> str:
    """A mutation that does not apply to the drawn sizes (e.g. a bad id with 0 tokens) runs as a valid case."""
    return name.split("/")[0] + "/valid"


def pick(rng: random.Random, mutations: list) -> str:
    """'valid' for about 40% of the cases, else one of the op's mutations."""
    return "valid" if rng.random() < 0.4 else rng.choice(mutations)


R = RuntimeError
# Arguments that fail torch's schema parsing raise TypeError or RuntimeError depending on the value's type.
SCHEMA = (RuntimeError, TypeError)
