"""Runs a test body in W processes joined by a torch.distributed process group (gloo on loopback, or NCCL with
one GPU per rank) and brings back each rank's return value or its traceback.

    results = run_workers(2, body, arg1, arg2)          # body(rank, world_size, arg1, arg2) in each process

``body`` must be a module-level function (it is pickled by reference). A worker that raises makes
``run_workers`` raise ``WorkerError`` with that rank's traceback; a worker that neither returns nor raises
within ``timeout`` seconds is killed and reported as hung.
"""

import datetime
import os
import queue
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def nccl_skip_reason(world_size: int):
    """Why a NCCL run of ``world_size`` ranks cannot happen here (one GPU per rank), or None when it can."""
    import fastmoe

    if not torch.cuda.is_available():
        return "NCCL runs need CUDA devices; none here"
    if torch.cuda.device_count() < world_size:
        return f"NCCL at world size {world_size} needs {world_size} GPUs, found {torch.cuda.device_count()}"
    if not fastmoe.with_cuda:
        return "this fastmoe build has no CUDA ops"
    return None


class WorkerError(RuntimeError):
    """One or more ranks failed; ``failures`` maps rank -> traceback text (or 'hung' / 'exit code N')."""

    def __init__(self, failures: dict):
        self.failures = failures
        text = "\n".join(f"--- rank {rank}:\n{msg}" for rank, msg in sorted(failures.items()))
        super().__init__(f"{len(failures)} rank(s) failed:\n{text}")


def _worker(rank, world_size, init_file, backend, pg_timeout, body, args, results):
    try:
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
            device_id=torch.device("cuda", rank) if backend == "nccl" else None,
        )
        value = body(rank, world_size, *args)
        results.put((rank, "ok", value))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent with its traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group cannot be torn down cleanly; the result is sent
                pass


def run_workers(
    world_size: int, body, *args, backend: str = "gloo", timeout: float = 120.0, pg_timeout=60.0, may_die=()
):
    """Runs ``body(rank, world_size, *args)`` on ``world_size`` ranks; returns the values in rank order. Ranks in
    ``may_die`` may exit without a result (their value is then ``None``); any other failure raises."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, init_file, backend, pg_timeout, body, args, results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        values, failures = {}, {}
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        while len(values) + len(failures) < world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                break
            try:
                rank, status, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                for rank, p in enumerate(procs):
                    if not p.is_alive() and rank not in values and rank not in failures and p.exitcode != 0:
                        failures[rank] = f"exit code {p.exitcode} without a result"
                continue
            (values if status == "ok" else failures)[rank] = value
        for rank in range(world_size):
            if rank not in values and rank not in failures:
                failures[rank] = f"hung: no result within {timeout:.0f} s"
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        unexpected = {rank: msg for rank, msg in failures.items() if rank not in may_die or "exit code" not in msg}
        if unexpected:
            raise WorkerError(failures)
        return [values.get(rank) for rank in range(world_size)]
