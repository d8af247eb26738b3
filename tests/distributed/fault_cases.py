"""Bodies of the distributed fault tests (tests/distributed/test_faults.py): one rank fails in the middle of a
training step, or the ranks disagree (on the configuration, the dtype, the passes they run, or whether they join
a collective at all); the others must raise a clear error within the exchange timeout instead of hanging or
aborting."""

import os
import time

import torch
import torch.distributed as dist

import fastmoe


class Boom(RuntimeError):
    pass


def _layer(world, **kwargs):
    torch.manual_seed(3)
    return fastmoe.FMoETransformerMLP(2, 8, 12, world_size=world, **kwargs)


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


# ------------------------------------------------------------------------------------------ ranks that disagree


def _expect_error(rank, what, run, errors=(RuntimeError, ValueError)):
    try:
        run()
    except errors as error:
        return f"{type(error).__name__}: {error}"
    raise AssertionError(f"rank {rank}: no error although {what}")


def config_mismatch(rank, world, backend, field, timeout_s):
    """Rank 1 builds its layer with ep_chunks=2 (``field="ep_chunks"``) or with float64 parameters
    (``field="dtype"``, the default dtype at construction); every rank must raise at construction, naming it."""
    os.environ["FASTMOE_COMM_TIMEOUT"] = str(timeout_s)
    odd = rank == 1
    kwargs = {"ep_chunks": 2} if field == "ep_chunks" and odd else {}
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if field == "dtype" and odd else torch.float32)
    try:
        return _expect_error(
            rank, f"rank 1 built its layer with another {field}", lambda: _layer(world, **kwargs), (ValueError,)
        )
    finally:
        torch.set_default_dtype(default_dtype)


def runtime_mismatch(rank, world, backend, change, timeout_s):
    """Every rank builds the same layer; then rank 1 casts it (``change`` a dtype name: ``.to(torch.<change>)``,
    after the construction-time check) or sets ``ep_chunks=2``. The next step must raise on every rank, naming
    both values, instead of aborting in gloo on rows of different sizes."""
    os.environ["FASTMOE_COMM_TIMEOUT"] = str(timeout_s)
    layer = _layer(world)
    dtype = torch.float32
    if rank == 1:
        if change == "ep_chunks":
            layer.ep_chunks = 2
        else:
            dtype = getattr(torch, change)
            layer = layer.to(dtype)
    x = torch.randn(16, 8, dtype=dtype, requires_grad=True)
    return _expect_error(rank, f"rank 1 changed {change}", lambda: layer(x).sum().backward(), (RuntimeError,))


def skipped_backward(rank, world, backend, timeout_s):
    """After a good step, rank 0 runs forward and backward while rank 1 runs a forward and skips its backward; then
    both run a forward. Rank 0's backward exchange meets rank 1's next forward: both must raise, naming the two
    phases."""
    os.environ["FASTMOE_COMM_TIMEOUT"] = str(timeout_s)
    layer = _layer(world)
    x = torch.randn(16, 8, requires_grad=True)
    layer(x).sum().backward()
    y = layer(x)

    def rest():
        if rank == 0:
            y.sum().backward()
        layer(x)

    return _expect_error(rank, "rank 1 skipped a backward", rest, (RuntimeError,))


# ------------------------------------------------------------------------------------------ collectives that wait


def _release(signal_path):
    with open(signal_path, "w"):
        pass


def _linger(signal_path, limit_s=60.0):
    """Alive, but joining nothing, until the other rank has its result (or limit_s passed)."""
    deadline = time.monotonic() + limit_s
    while not os.path.exists(signal_path) and time.monotonic() < deadline:
        time.sleep(0.1)


def _cpp_layer(lib_path, world, group_name):
    torch.ops.load_library(lib_path)
    torch.ops.fastmoe_testing.initial_parameters("transformer_mlp", 2, 8, 12, world, group_name)


def world_size_mismatch(rank, world, backend, timeout_s, signal_path, cpp_lib=None):
    """Rank 0 builds an FMoE layer (``cpp_lib``: the C++ TransformerMLP) with world_size=2, rank 1 with world_size=1,
    then stays alive without joining anything. Rank 0's configuration check must raise within the timeout. Returns
    (rank, seconds until the error, the error text)."""
    os.environ["FASTMOE_COMM_TIMEOUT"] = str(timeout_s)
    layer_world = world if rank == 0 else 1

    def build():
        if cpp_lib is None:
            _layer(layer_world)
        else:
            _cpp_layer(cpp_lib, layer_world, dist.group.WORLD.group_name)

    if rank == 1:
        build()
        _linger(signal_path)
        return (rank, None, "")
    return _timed_error(rank, build, signal_path, "rank 1 built its layer with world_size=1")


def allreduce_linger(rank, world, backend, timeout_s, signal_path):
    """Both ranks wrap a model in DistributedGroupedDataParallel and run a backward; rank 0 calls
    allreduce_gradients() and rank 1 never does. Rank 0 must raise within the timeout."""
    os.environ["FASTMOE_COMM_TIMEOUT"] = str(timeout_s)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), _layer(1))
    ddp = fastmoe.DistributedGroupedDataParallel(model)
    model(torch.randn(3, 8)).sum().backward()
    if rank == 1:
        _linger(signal_path)
        return (rank, None, "")
    return _timed_error(rank, ddp.allreduce_gradients, signal_path, "rank 1 never called allreduce_gradients")


def _timed_error(rank, run, signal_path, what):
    start = time.monotonic()
    try:
        run()
    except RuntimeError as error:
        return (rank, time.monotonic() - start, f"{type(error).__name__}: {error}")
    finally:
        _release(signal_path)
    raise AssertionError(f"rank {rank}: no error although {what}")
