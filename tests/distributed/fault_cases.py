"""Bodies of the distributed fault tests (tests/distributed/test_faults.py): one rank fails in the middle of a
training step, the others must raise a clear error within the exchange timeout instead of hanging."""

import os
import time

import torch

import fastmoe


class Boom(RuntimeError):
    pass


def _layer(world):
    torch.manual_seed(3)
    return fastmoe.FMoETransformerMLP(2, 8, 12, world_size=world)


def fail_in_step(rank, world, backend, where, timeout_s):
    """Rank 1 raises at ``where`` ("forward": inside its experts; "backward": inside the expert gradient) and then
    stays alive without joining the collectives (``linger``) or exits at once (``exit``); every other rank must
    raise within the exchange timeout. Returns (rank, seconds until the error, the error text)."""
    os.environ["FASTMOE_COMM_TIMEOUT"] = str(timeout_s)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    layer = _layer(world).to(device)
    stage, mode = where.split("-")
    x = torch.randn(16, 8, device=device, requires_grad=True)
    layer(x).sum().backward()  # a step everyone completes, so the communicators are up
    if rank == 1:

        def explode(*_):
            raise Boom(f"rank 1 fails in its {stage}")

        if stage == "forward":
            layer.experts.register_forward_hook(lambda *a: explode())
        else:
            layer.experts.htoh4.weight.register_hook(lambda g: explode())
    start = time.monotonic()
    try:
        layer(x).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            layer(x)  # the exchanges after an aborted communicator raise its reason
    except Boom:
        if mode == "exit":
            os._exit(17)  # killed mid-step: no clean shutdown, no result
        time.sleep(timeout_s * 2)  # alive, but never joins the next collective
        return (rank, None, "failed on purpose")
    except Exception as error:  # noqa: BLE001 - the survivors' error is the result under test
        return (rank, time.monotonic() - start, f"{type(error).__name__}: {error}")
    raise AssertionError(f"rank {rank}: the step finished although rank 1 failed in its {stage}")
