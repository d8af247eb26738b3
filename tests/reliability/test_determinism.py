"""Deterministic mode (docs/reliability.md): with fastmoe.use_deterministic(True), or under
torch.use_deterministic_algorithms(True), two training runs from the same seed give bitwise-equal parameters, on
the CPU and on CUDA (where the grouped GEMMs then run the tiled kernel instead of the CUTLASS grouped GEMM or
torch._grouped_mm)."""

import os
import subprocess
import sys

import pytest
import torch

import fastmoe
from conftest import DEVICE_PARAMS, assert_bitwise_equal
from fastmoe import gates

# torch.use_deterministic_algorithms(True) refuses cuBLAS GEMMs (the gates' nn.Linear) unless cuBLAS uses a fixed
# workspace; it must be set before the first cuBLAS call of the process, so at import (collection) time.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(autouse=True)
def restore_flags():
    fastmoe_flag = fastmoe.use_deterministic(False)
    torch_flag = torch.are_deterministic_algorithms_enabled()
    yield
    fastmoe.use_deterministic(fastmoe_flag)
    torch.use_deterministic_algorithms(torch_flag)


def train(device: str, dtype, gate, steps: int = 6) -> dict:
    """A few Adam steps of a two-layer MoE model; widths are multiples of 8 so that bf16 on sm_90 would take
    a library grouped GEMM (CUTLASS or torch._grouped_mm) outside deterministic mode. Returns the final parameters."""
    torch.manual_seed(1234)
    d_model = 16
    model = torch.nn.Sequential(
        fastmoe.FMoETransformerMLP(4, d_model, 32, top_k=2, gate=gate),
        fastmoe.FMoETransformerMLP(4, d_model, 32, top_k=2, activation="swiglu"),
    ).to(device=device, dtype=dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.randn(steps, 64, d_model, generator=torch.Generator().manual_seed(7)).to(device=device, dtype=dtype)
    for step in range(steps):
        optimizer.zero_grad()
        loss = model(data[step]).float().square().mean() + sum(layer.get_loss() for layer in model)
        loss.backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def dtypes_for(device):
    return [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("switch", ["fastmoe", "torch"])
@pytest.mark.parametrize("gate", [gates.NaiveGate, gates.GShardGate, gates.NoisyGate], ids=lambda g: g.__name__)
def test_two_runs_bitwise_equal(device, switch, gate):
    if switch == "fastmoe":
        fastmoe.use_deterministic(True)
    else:
        torch.use_deterministic_algorithms(True)
    assert fastmoe.is_deterministic()
    for dtype in dtypes_for(device):
        # Run to run in one process: fastmoe's sums have a fixed order, and the torch GEMMs (gates, optimizer)
        # see the same shapes and thread count. Nothing here promises the same bits on another machine.
        first, second = train(device, dtype, gate), train(device, dtype, gate)
        for name in first:
            assert_bitwise_equal(second[name], first[name], f"{name} ({dtype})")


def test_flags():
    assert not fastmoe.is_deterministic()
    assert fastmoe.use_deterministic(True) is False
    assert fastmoe.is_deterministic() and fastmoe.determinism.deterministic_flag()
    assert fastmoe.use_deterministic(False) is True
    torch.use_deterministic_algorithms(True)
    assert fastmoe.is_deterministic() and not fastmoe.determinism.deterministic_flag()
    with pytest.raises(TypeError, match="enabled must be a bool, got 'yes'"):
        fastmoe.use_deterministic("yes")


_TILED_SCRIPT = """
import sys, torch, fastmoe
g = torch.Generator().manual_seed(3)
x = torch.randn(300, 64, generator=g).cuda().bfloat16()
w = torch.randn(4, 32, 64, generator=g).cuda().bfloat16()
b = torch.randn(4, 32, generator=g).cuda().bfloat16()
offsets = torch.tensor([0, 40, 40, 200, 290]).cuda()
if sys.argv[1] == "deterministic":
    fastmoe.use_deterministic(True)
torch.save(fastmoe.ops.grouped_linear(x, offsets, w, b).cpu(), sys.argv[2])
"""


@pytest.mark.parametrize("device", [p for p in DEVICE_PARAMS if p.id == "cuda"])
def test_deterministic_mode_takes_the_tiled_kernel(device, tmp_path):
    """bf16 grouped_linear in deterministic mode equals, bitwise, the same call forced onto the tiled kernel
    (FASTMOE_GROUPED_GEMM=tiled, read once per process, hence the child processes)."""
    outputs = {}
    for mode, env in (("deterministic", {}), ("tiled", {"FASTMOE_GROUPED_GEMM": "tiled"})):
        path = tmp_path / f"{mode}.pt"
        run = subprocess.run(
            [sys.executable, "-c", _TILED_SCRIPT, mode, str(path)],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        outputs[mode] = torch.load(path)
    assert_bitwise_equal(outputs["deterministic"], outputs["tiled"], "grouped_linear")
