"""Shared fixtures and helpers of the fastmoe test suite.

Helpers are imported by the test modules with ``from conftest import ...`` (pytest puts this folder on
sys.path). They hold the device list, the tolerance policy of docs/numerics.md and plain-PyTorch references of the
dispatch and expert ops (no fastmoe op is used in a reference).
"""

import contextlib
import os
import re

import pytest
import torch

import fastmoe  # registers torch.ops.fastmoe

# ----------------------------------------------------------------------------------------------- options

# The fuzz tests (tests/fuzz) run this many random cases per test and device in CI; a longer run passes
# --fuzz-cases N (or sets FASTMOE_FUZZ_CASES), and --fuzz-seed S picks another reproducible stream.
DEFAULT_FUZZ_CASES = 150


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-cases",
        type=int,
        default=int(os.environ.get("FASTMOE_FUZZ_CASES", DEFAULT_FUZZ_CASES)),
        help=f"random cases per fuzz test and device (default {DEFAULT_FUZZ_CASES}, or $FASTMOE_FUZZ_CASES)",
    )
    parser.addoption(
        "--fuzz-seed",
        type=int,
        default=int(os.environ.get("FASTMOE_FUZZ_SEED", 0)),
        help="first seed of the fuzz tests (default 0, or $FASTMOE_FUZZ_SEED); case i uses seed + i",
    )


@pytest.fixture
def fuzz_budget(request) -> tuple[int, int]:
    """(number of cases, first seed) of a fuzz test."""
    return request.config.getoption("--fuzz-cases"), request.config.getoption("--fuzz-seed")


# ----------------------------------------------------------------------------------------------- devices

# True when the fastmoe ops have CUDA kernels in this build. fastmoe.with_cuda only says how the extension was
# compiled; the registered kernels are what the tests can run.
CUDA_KERNELS_REGISTERED = torch._C._dispatch_has_kernel_for_dispatch_key("fastmoe::route_topk", "CUDA")


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not CUDA_KERNELS_REGISTERED:
        return "CUDA kernels for the fastmoe ops are not built/registered on this machine"
    return None


CUDA_SKIP_REASON = _cuda_skip_reason()

# The devices the op tests run on: cpu, plus cuda when a device and the fastmoe CUDA kernels are both present.
devices = ["cpu"] + (["cuda"] if CUDA_SKIP_REASON is None else [])

# Parameters for a device-parametrised test: the cuda case is always listed, skipped with a visible reason.
DEVICE_PARAMS = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or ""),
    ),
]


@pytest.fixture(params=DEVICE_PARAMS)
def device(request) -> str:
    """Each op test runs once per device (cuda skipped with a reason where it cannot run)."""
    return request.param


# The reduced/standard precisions every op is checked in against an fp64 reference (DESIGN §6).
LOW_PRECISION_DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]
ALL_FLOAT_DTYPES = LOW_PRECISION_DTYPES + [pytest.param(torch.float64, id="fp64")]


def make_generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, gen: torch.Generator, dtype=torch.float64, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Seeded normal data drawn on the CPU (same values on every device), then cast and moved."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------- tolerance


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| in fp64 (0 for empty tensors; NaN if either side has a NaN)."""
    if actual.numel() == 0:
        return 0.0
    return (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()


def rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Root-mean-square of ``actual - expected`` in fp64 (0 for empty tensors; NaN propagates).

    The policy compares this norm-wise error rather than the max: at the rounding level the max over a few
    elements is luck (two correctly rounded results can differ 2-3x in their worst element), while a real
    accuracy loss moves the whole distribution."""
    if actual.numel() == 0:
        return 0.0
    diff = actual.detach().double().cpu() - expected.detach().double().cpu()
    return diff.pow(2).mean().sqrt().item()


def tolerance_floor(dtype: torch.dtype) -> float:
    """The tiny absolute floor: a thousandth of the dtype's epsilon, so exact references do not fail on it."""
    return 1e-3 * torch.finfo(dtype).eps


def assert_within_policy(actual, expected_fp64, torch_same_precision, name: str = "output", factor: float = 2.0):
    """DESIGN §6: the op's error against fp64 is at most ``factor`` times the error of the same-precision
    PyTorch reference against fp64, plus a tiny floor (errors as :func:`rms_error`). Shapes and dtypes must
    match exactly; a NaN anywhere fails."""
    assert actual.shape == expected_fp64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected_fp64.shape)}"
    assert actual.dtype == torch_same_precision.dtype, f"{name}: dtype {actual.dtype} != {torch_same_precision.dtype}"
    op_error = rms_error(actual, expected_fp64)
    torch_error = rms_error(torch_same_precision, expected_fp64)
    bound = factor * torch_error + tolerance_floor(actual.dtype)
    assert op_error <= bound, (
        f"{name} ({actual.dtype}): fastmoe RMS error {op_error:.3e} vs fp64 exceeds {factor}x the PyTorch "
        f"same-precision error {torch_error:.3e} (+ floor {tolerance_floor(actual.dtype):.1e}); "
        f"max abs errors: fastmoe {max_abs_error(actual, expected_fp64):.3e}, PyTorch "
        f"{max_abs_error(torch_same_precision, expected_fp64):.3e}"
    )


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, name: str = "output") -> None:
    """Exact equality of shape, dtype and every bit (NaN-aware through the raw bytes). Only for results that are
    bitwise on any CPU (docs/numerics.md, "What is bitwise on any CPU, and what is not")."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().cpu().contiguous(), expected.detach().cpu().contiguous()
    if a.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, e = a.view(bits), e.view(bits)
    mismatches = (a != e).sum().item()
    assert mismatches == 0, f"{name}: {mismatches} of {a.numel()} elements differ bitwise"


# ----------------------------------------------------------------------------------------------- routing data


def distinct_logits(num_tokens: int, num_experts: int, gen: torch.Generator, dtype=torch.float64, device="cpu"):
    """``[T, E]`` logits whose entries in a row are at least 0.3 apart (no near-ties, even in bf16), in a
    random order per row and shifted per row, so top-k and its gradient are well defined."""
    order = (
        torch.stack([torch.randperm(num_experts, generator=gen) for _ in range(num_tokens)])
        if num_tokens
        else (torch.empty(0, num_experts, dtype=torch.int64))
    )
    shift = torch.rand(num_tokens, 1, generator=gen, dtype=torch.float64) * 2 - 1
    jitter = torch.rand(num_tokens, num_experts, generator=gen, dtype=torch.float64) * 0.05
    logits = (order.double() - num_experts / 2) * 0.4 + shift + jitter
    return logits.to(dtype=dtype, device=device)


def random_topk_idx(
    num_tokens: int, k: int, num_experts: int, gen: torch.Generator, drop_prob: float = 0.0, device="cpu"
) -> torch.Tensor:
    """``[T, k]`` int64 routing with k distinct experts per token; each slot is -1 with ``drop_prob``."""
    if num_tokens == 0:
        return torch.empty(0, k, dtype=torch.int64, device=device)
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(num_tokens)])
    if drop_prob > 0:
        dropped = torch.rand(num_tokens, k, generator=gen) < drop_prob
        idx = torch.where(dropped, torch.full_like(idx, -1), idx)
    return idx.to(device)


# ----------------------------------------------------------------------------------------------- references


def reference_permute(x: torch.Tensor, sorted_pair: torch.Tensor, k: int) -> torch.Tensor:
    """``x [T, d]`` -> ``[T*k, d]``: row r is x[sorted_pair[r] // k], zero where sorted_pair[r] < 0."""
    valid = sorted_pair >= 0
    tokens = torch.where(valid, sorted_pair, torch.zeros_like(sorted_pair)) // k
    rows = x.index_select(0, tokens)
    return torch.where(valid[:, None], rows, torch.zeros_like(rows))


def reference_combine(y_sorted: torch.Tensor, pair_pos: torch.Tensor, topk_score=None) -> torch.Tensor:
    """``y[t] = sum_j score[t, j] * y_sorted[pair_pos[t, j]]`` over routed slots (score 1 when None), as an
    explicit loop over the k slots in order, in the dtype of ``y_sorted``."""
    num_tokens, k = pair_pos.shape
    y = y_sorted.new_zeros(num_tokens, y_sorted.shape[1])
    for j in range(k):
        pos = pair_pos[:, j]
        routed = (pos >= 0)[:, None]
        rows = y_sorted.index_select(0, pos.clamp(min=0))
        if topk_score is not None:
            rows = rows * topk_score[:, j : j + 1].to(rows.dtype)
        y = y + torch.where(routed, rows, torch.zeros_like(rows))
    return y


def reference_grouped_linear(x: torch.Tensor, expert_offsets: torch.Tensor, weight: torch.Tensor, bias=None):
    """Per-expert matmul over the row blocks of ``expert_offsets``; rows past ``offsets[E]`` give zeros."""
    bounds = expert_offsets.tolist()
    num_experts = weight.shape[0]
    blocks = []
    for e in range(num_experts):
        block = x[bounds[e] : bounds[e + 1]] @ weight[e].t()
        if bias is not None:
            block = block + bias[e]
        blocks.append(block)
    blocks.append(x.new_zeros(x.shape[0] - bounds[num_experts], weight.shape[1]))
    return torch.cat(blocks, dim=0)


def segment_sums(values: torch.Tensor, offsets: list) -> torch.Tensor:
    """[E, hidden]: each expert's column sums of ``values [N, hidden]`` over its rows ``offsets[e]:offsets[e + 1]``
    (zero for an expert without rows), in values' dtype."""
    hidden = values.shape[1]
    parts = [values[begin:end].sum(0) for begin, end in zip(offsets[:-1], offsets[1:], strict=True)]
    return torch.stack(parts) if parts else values.new_zeros(0, hidden)


def mentions(argument: str, value: str) -> str:
    """A ``pytest.raises(match=...)`` pattern: the message names ``argument`` and shows ``value`` (both
    literal, in any order)."""
    return rf"(?s)^(?=.*{re.escape(argument)})(?=.*{re.escape(value)})"


def assert_cli_refuses(main, argv: list, named: str, capsys) -> None:
    """``main(argv)`` exits with argparse's usage error (2), and its message names ``named`` and shows the last
    argument (the bad value)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert named in err and argv[-1] in err, err


@contextlib.contextmanager
def deterministic_mode(enabled: bool = True):
    """fastmoe.use_deterministic(enabled) inside the block, the previous setting restored after it."""
    previous = fastmoe.use_deterministic(enabled)
    try:
        yield
    finally:
        fastmoe.use_deterministic(previous)


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh leaf copy of ``t`` that requires grad."""
    return t.detach().clone().requires_grad_(True)


def assert_early_cast_matches_late(layer, x: torch.Tensor, label: str = "") -> None:
    """Under bf16 autocast ``layer`` (an FMoETransformerMLP) casts its rows before the permute and the exchange;
    it is run that way and again with grouped_linear casting after them. The expert GEMMs see the same bf16
    rows in the same shapes, so the output is bitwise the same; the input gradient is summed over the k slots in
    bf16 in the first run, so it and the weight gradients match to bf16 rounding."""
    results = []
    for early in (True, False):
        layer.expert_input_follows_autocast = early
        layer.zero_grad(set_to_none=True)
        inp = leaf(x)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            y = layer(inp)
        y.float().square().sum().backward()
        results.append((y, inp.grad, [p.grad for p in layer.parameters()]))
    (y_early, gx_early, gp_early), (y_late, gx_late, gp_late) = results
    assert y_early.dtype == torch.bfloat16 and gx_early.dtype == torch.float32, (y_early.dtype, gx_early.dtype)
    assert_bitwise_equal(y_early, y_late, f"{label}y")
    torch.testing.assert_close(gx_early, gx_late, rtol=2e-2, atol=1e-3)
    for a, b in zip(gp_early, gp_late, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)


def grads(output: torch.Tensor, inputs, grad_output: torch.Tensor):
    """The gradients of ``inputs`` for ``output.backward(grad_output)`` (zeros for unused inputs)."""
    return torch.autograd.grad(output, inputs, grad_output, allow_unused=True, materialize_grads=True)


# ----------------------------------------------------------------------------------------------- process groups


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-rank gloo process group for the collective ops, torn down after the test."""
    import torch.distributed as dist

    assert not dist.is_initialized(), "a test left a torch.distributed group initialised"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD.group_name
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- C++ modules


def _nn_testing_lib():
    """The test-only op library that runs the C++ fastmoe::nn modules (tests/cpp/nn_testing_ops.cpp), newest build
    first, or None when it is not built."""
    import glob

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = glob.glob(os.path.join(root, "build*", "tests", "cpp", "libfastmoe_nn_testing.so"))
    return max(found, key=os.path.getmtime) if found else None


NN_TESTING_LIB = _nn_testing_lib()
needs_nn_testing_lib = pytest.mark.skipif(
    NN_TESTING_LIB is None,
    reason="libfastmoe_nn_testing.so is not built (cmake --build build --target fastmoe_nn_testing)",
)

# ------------------------------------------------------------------------------------------------ scored experts
# Gated (SwiGLU) grouped experts run through fastmoe::TokenDispatch in its two ways of applying the routing scores:
# weighted in the combine (give(c, y)), or scaled into each row's activation before the second GEMM
# (swiglu(h, row_scores(c)), give(c, y, scored=True)). Used by tests/ops/test_token_dispatch.py (one process) and
# tests/distributed/ep_cases.py (expert parallel, with hot-expert copies).


def swiglu_experts(rows, offsets, w_in, w_out, scale=None):
    """rows [N, d] grouped by expert -> [N, d_out]: w_out[e] swiglu(w_in[e] row, scale)."""
    return fastmoe.ops.grouped_linear(
        fastmoe.ops.swiglu(fastmoe.ops.grouped_linear(rows, offsets, w_in, None), scale), offsets, w_out, None
    )


def run_token_path(x, topk_idx, topk_score, w_in, w_out, scored, world=1, group="", replicate=None):
    """One forward through TokenDispatch with the local experts ``w_in [E_local, 2h, d]``, ``w_out [E_local, d,
    h]``; ``replicate`` = (max_experts, expert_params, gemm_flops, link_bytes) turns hot-expert copies on. Returns
    (y, the global ids copied)."""
    num_local = w_in.shape[0]
    args = (x, topk_idx, topk_score, num_local, world, group, 1, False, "")
    if replicate is not None:
        max_experts, expert_params, gemm_flops, link_bytes = replicate
        args += ("", "", max_experts, expert_params, x.element_size(), gemm_flops, link_bytes)
    tokens = torch.classes.fastmoe.TokenDispatch(*args)
    replicated = tokens.replicated()
    if replicated:
        copies = [fastmoe.ops.replicate_experts(w, replicated, num_local, group) for w in (w_in, w_out)]
        scale = tokens.replica_scores() if scored else None
        tokens.give_replicas(swiglu_experts(tokens.replica_rows(), tokens.replica_offsets(), *copies, scale), scored)
    for c in range(tokens.num_chunks()):
        scale = tokens.row_scores(c) if scored else None
        tokens.give(c, swiglu_experts(tokens.rows(c), tokens.expert_offsets(c), w_in, w_out, scale), scored)
    return tokens.combine(), replicated


def both_ways(x, topk_idx, topk_score, w_in, w_out, grad, **path):
    """The output and the gradients of (x, topk_score, w_in, w_out) for the weighted and the scored way."""
    results = {}
    for scored in (False, True):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, topk_score, w_in, w_out)]
        y, replicated = run_token_path(leaves[0], topk_idx, leaves[1], leaves[2], leaves[3], scored, **path)
        grads = torch.autograd.grad(y, leaves, grad)
        results[scored] = (y.detach(), grads, replicated)
    return results


def assert_ways_agree(results, rtol, atol, what="", may_be_zero=()):
    """The two ways of both_ways agree; each result must be nonzero (else the comparison proves nothing) but those
    named in ``may_be_zero`` (e.g. "grad w_in" on a rank whose experts got no rows)."""
    names = ("y", "grad x", "grad topk_score", "grad w_in", "grad w_out")
    weighted, scored = results[False], results[True]
    assert weighted[2] == scored[2], f"{what}: the two ways copied different experts"
    for name, a, b in zip(names, (weighted[0], *weighted[1]), (scored[0], *scored[1]), strict=True):
        assert name in may_be_zero or a.abs().max() > 0, (
            f"{what}: {name} is all zero: the comparison would prove nothing"
        )
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{what}: {name}: {m}")
