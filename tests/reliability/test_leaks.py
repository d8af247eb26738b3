"""No leaks over a long run: 1,000 training steps of a small MoE model keep the process's resident memory
(CPU) and torch's allocated CUDA memory flat after warm-up."""

import gc
import os

import pytest
import torch

import fastmoe
from conftest import CUDA_SKIP_REASON

STEPS, WARMUP = 1000, 100


def resident_kib() -> int:
    """VmRSS of this process in KiB (Linux /proc)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS line in /proc/self/status")


def training_loop(device: str, on_step):
    """STEPS Adam steps of a tiny FMoETransformerMLP (with a gate loss and a capacity limit); calls
    ``on_step(step)`` after each step."""
    torch.manual_seed(0)
    layer = fastmoe.FMoETransformerMLP(4, 8, 16, top_k=2, gate=fastmoe.gates.GShardGate).to(device)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    x = torch.randn(32, 8, device=device)
    for step in range(1, STEPS + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = layer(x).square().mean() + layer.get_loss()
        loss.backward()
        optimizer.step()
        on_step(step)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for VmRSS")
def test_cpu_resident_memory_is_flat():
    samples = {}

    def on_step(step):
        if step in (WARMUP, STEPS):
            gc.collect()
            samples[step] = resident_kib()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is several times faster than a contended pool
    try:
        training_loop("cpu", on_step)
    finally:
        torch.set_num_threads(threads)
    growth = (samples[STEPS] - samples[WARMUP]) / samples[WARMUP]
    assert abs(growth) < 0.05, f"VmRSS went from {samples[WARMUP]} KiB at step {WARMUP} to {samples[STEPS]} KiB"


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or "")
def test_cuda_allocated_memory_is_flat():
    samples = {}

    def on_step(step):
        if step >= WARMUP and step % 100 == 0:
            torch.cuda.synchronize()
            samples[step] = torch.cuda.memory_allocated()

    training_loop("cuda", on_step)
    assert len(set(samples.values())) == 1, f"torch.cuda.memory_allocated() by step: {samples}"
