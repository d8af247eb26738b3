"""fastmoe: Mixture-of-Experts training for PyTorch.

The compute runs in C++ ops registered as ``torch.ops.fastmoe.*`` (CPU and Meta kernels, C++ autograd); this
package holds thin ``nn.Module`` front ends with FastMoE's names, so ``import fastmoe as fmoe`` ports FastMoE
code.
"""

import torch  # noqa: F401  (loads libtorch before fastmoe's library, which links against it)

# Before _C: an ImportError naming both versions when torch is not the release the library was built against.
import fastmoe._torch_abi as _torch_abi  # noqa: F401
from fastmoe import (
    _C,  # noqa: F401  (registers the ops)
    balance,
    checkpoint,
    debug,
    distributed,
    gates,
    ops,
)
from fastmoe.debug import NonFiniteError, is_debug, set_debug
from fastmoe.determinism import is_deterministic, use_deterministic
from fastmoe.distributed import DistributedGroupedDataParallel
from fastmoe.integrations import fmoefy, moefy, restore_hf, use_fastmoe
from fastmoe.layers import FMoE
from fastmoe.linear import FMoELinear
from fastmoe.transformer import FMoETransformerMLP

__version__ = "0.1.0"
with_cuda = bool(_C.with_cuda)

__all__ = [
    "DistributedGroupedDataParallel",
    "FMoE",
    "FMoELinear",
    "FMoETransformerMLP",
    "NonFiniteError",
    "balance",
    "checkpoint",
    "debug",
    "distributed",
    "fmoefy",
    "gates",
    "is_debug",
    "is_deterministic",
    "moefy",
    "restore_hf",
    "use_fastmoe",
    "set_debug",
    "use_deterministic",
    "ops",
    "cmake_prefix_path",
    "with_cuda",
]


def cmake_prefix_path() -> str:
    """The folder to add to CMAKE_PREFIX_PATH for ``find_package(fastmoe)`` against an installed wheel."""
    import os

    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "share", "cmake")
