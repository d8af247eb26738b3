"""One random stream per global expert, so that expert parallelism does not change initial values.

Every rank of an expert-parallel group is usually seeded alike, so drawing the local experts from the default
generator would give rank 1's experts the values of rank 0's. Instead a layer (1) draws one base seed from the
CPU default generator, the same draw on every rank and whatever the world size, and (2) initialises global
expert ``g`` from a generator seeded with ``expert_seed(base_seed, g)``. A model split over W ranks then starts
equal, parameter for parameter and bit for bit, to the one-process model with every expert built from the same
seed, and the modules built after the layer (which draw from the default generators) stay equal too.

``expert_seed`` is written once, in C++ (``include/fastmoe/expert_seed.h``), for both front ends.
"""

import contextlib

import torch

from fastmoe import _C


def draw_base_seed() -> int:
    """One draw from the CPU default generator (``device="cpu"`` even under a default-device context, and on
    any device the parameters are made on), in ``[0, 2**63 - 1)``. The C++ modules draw it with the same op."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device="cpu"))


def expert_seed(base_seed: int, global_expert: int) -> int:
    """The seed of global expert ``global_expert``'s stream: SplitMix64 of the base seed advanced by the expert
    id (``include/fastmoe/expert_seed.h``, the function the C++ modules use), so neighbouring experts (and layers
    whose base seeds are close) get unrelated streams."""
    return _C.expert_seed(base_seed, global_expert)


def expert_generator(base_seed: int, global_expert: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded for global expert ``global_expert``."""
    return torch.Generator(device=device).manual_seed(expert_seed(base_seed, global_expert))


def fill_per_expert_(weight: torch.Tensor, first_expert: int, fill) -> None:
    """Fills ``weight [num_local, ...]`` expert by expert: local expert ``e`` is global expert ``first_expert + e``
    and gets ``fill(weight[e], generator)`` with that expert's own stream. One base-seed draw, whatever the
    number of experts; a meta tensor only takes the draw (it has no values)."""
    base_seed = draw_base_seed()
    if weight.device.type == "meta":
        return
    with torch.no_grad():
        for e in range(weight.shape[0]):
            fill(weight[e], expert_generator(base_seed, first_expert + e, weight.device))


@contextlib.contextmanager
def default_generators_seeded(seed: int):
    """Runs the block with the CPU default generator, and the default generator of every CUDA device when CUDA
    is initialised, seeded with ``seed``; afterwards they get their states back, so the block draws nothing from
    the caller's streams.

    ``torch.manual_seed`` is not used: before CUDA is initialised it queues the seed for the CUDA generators,
    which would replace the caller's own queued seed. A block that itself initialises CUDA and draws on it
    therefore draws from the caller's CUDA stream; making any CUDA tensor first (the layer's gate, for one)
    avoids that."""
    cpu = torch.default_generator
    cuda = list(torch.cuda.default_generators) if torch.cuda.is_initialized() else []
    states = [gen.get_state() for gen in [cpu, *cuda]]
    try:
        for gen in [cpu, *cuda]:
            gen.manual_seed(seed)
        yield
    finally:
        for gen, state in zip([cpu, *cuda], states, strict=True):
            gen.set_state(state)


def build_experts(makers, d_model: int, first_expert: int) -> list:
    """Runs ``makers[i](d_model)`` for global expert ``first_expert + i``, each inside its own stream
    (``default_generators_seeded``), after one base-seed draw: the modules get the values that the same
    callable gives that global expert on any rank and in a layer of any size."""
    base_seed = draw_base_seed()
    modules = []
    for i, make in enumerate(makers):
        with default_generators_seeded(expert_seed(base_seed, first_expert + i)):
            modules.append(make(d_model))
    return modules
