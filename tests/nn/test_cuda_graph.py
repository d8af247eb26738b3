"""One training step of FMoETransformerMLP (forward + backward) captured in a CUDA graph and replayed.

A capture fails on any host synchronisation (reading a count, .item(), .cpu()), so a passing capture proves the
single-GPU layer has none; the replay must then reproduce eager results on new inputs copied into the static
input buffer.
"""

import pytest
import torch

import fastmoe
from conftest import CUDA_SKIP_REASON

pytestmark = pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or "")


def _step(model, x):
    model.zero_grad(set_to_none=False)
    y = model(x)
    (y.float().pow(2).mean() + model.get_loss()).backward()
    return y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_training_step_replays_in_a_cuda_graph(dtype, activation):
    torch.manual_seed(0)
    model = fastmoe.FMoETransformerMLP(num_expert=8, d_model=64, d_hidden=128, top_k=2, activation=activation)
    model = model.to(device="cuda", dtype=dtype)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    static_x = torch.randn(256, 64, device="cuda", dtype=dtype)

    # Warm up on a side stream (allocator pools, library handles), as CUDA graph capture requires.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _step(model, static_x)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = _step(model, static_x)

    for seed in (1, 2):
        torch.manual_seed(seed)
        x = torch.randn(256, 64, device="cuda", dtype=dtype)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        graph_y = static_y.clone()
        graph_grads = [p.grad.clone() for p in model.parameters()]

        eager_y = _step(model, x)
        torch.cuda.synchronize()
        # Bitwise: eager mode launches the kernels the graph captured, on the same shapes, stream and device;
        # fastmoe's kernels add no floats with atomics, and cuBLAS repeats itself for a fixed shape and stream.
        torch.testing.assert_close(graph_y, eager_y, rtol=0, atol=0)
        for (name, p), g in zip(model.named_parameters(), graph_grads, strict=True):
            torch.testing.assert_close(g, p.grad, rtol=0, atol=0, msg=f"gradient of {name} differs after replay")
