"""Expert parallelism across languages: on each of 2 ranks the Python layer (world_size=2) and the C++ fastmoe::nn
module on the same process group, with the same parameters and inputs, give bitwise-equal outputs and gradients
(input and every parameter), for FMoETransformerMLP (GELU, SwiGLU, SwiGLU without expert biases) and FMoE with
nn.Sequential experts, in fp64 and fp32, with ep_chunks 1 and 2 and a rank with fewer tokens. gloo on the CPU
always; NCCL when there are 2 GPUs.

Bitwise holds as on one process (tests/distributed/cross_language_cases.py says why): both layers run on the same
rank, thread count and device, and call the same kernels, including the same exchanges, on the same shapes."""

import cross_language_cases
import pytest
import torch
from test_expert_parallel import backends, run

from conftest import NN_TESTING_LIB, needs_nn_testing_lib

pytestmark = needs_nn_testing_lib

# (dtype, ep_chunks, tokens per rank): rank 1 has fewer tokens; with 2 chunks one of its chunks is empty
CASES = [
    (dtype, ep_chunks, tokens)
    for dtype in (torch.float64, torch.float32)
    for ep_chunks, tokens in ((1, [10, 3]), (2, [10, 3]), (2, [7, 1]))
]


@pytest.mark.parametrize("layer", cross_language_cases.LAYERS)
@pytest.mark.parametrize("backend", backends(2))
def test_expert_parallel_python_layer_equals_cpp_module_bitwise(backend, layer):
    compared = run(2, backend, cross_language_cases.expert_parallel, NN_TESTING_LIB, layer, CASES)
    # y, grad_x and every parameter's gradient (TransformerMLP: 6 parameters, 4 without expert biases; MoE: the
    # gate's 2, 4 per expert)
    params = {"moe": 2 + 2 * 4, "transformer_mlp_swiglu_nobias": 4}
    per_case = 2 + params.get(layer, 6)
    assert compared == [len(CASES) * per_case] * 2


@pytest.mark.parametrize("backend", backends(4))
def test_hierarchical_exchange_and_replication_python_layer_equals_cpp_module_bitwise(backend):
    results = run(4, backend, cross_language_cases.hierarchical_and_replicated, NN_TESTING_LIB)
    # TransformerMLP 2 + 6 tensors, twice (hierarchical, replicated); MoE 2 + 2 + 2 * 4; TransformerMLP without
    # expert biases (scored copies) 2 + 4
    assert [compared for compared, _ in results] == [8 + 12 + 8 + 6] * 4
    copied = results[0][1]
    assert 0 in copied, f"the skewed router's hot expert 0 was not copied: {copied}"
    assert all(c == copied for _, c in results), "the ranks copied different experts"
