"""A job that ends with expert-parallel layers still holding their process group exits cleanly: gloo releases a
finished collective's tensors on its own thread, and that release takes the GIL; when it came while Python was
finalising, the process aborted ("terminate called without an active exception") in about two runs of three."""

import os
import socket
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import torch.distributed as dist
    import fastmoe

    dist.init_process_group("gloo")
    moe = fastmoe.FMoETransformerMLP(num_expert=2, d_model=8, d_hidden=16, world_size=dist.get_world_size())
    model = fastmoe.DistributedGroupedDataParallel(moe, need_sync=False)
    dist.destroy_process_group()  # the layer and the wrapper still hold the group, as a script's model does
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_processes_exit_cleanly_after_destroy_process_group(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    failures = []
    for attempt in range(5):
        port = str(free_port())
        procs = [
            subprocess.Popen(
                [sys.executable, str(script)],
                env={
                    **os.environ,
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port,
                    "RANK": str(rank),
                    "WORLD_SIZE": "2",
                    "OMP_NUM_THREADS": "1",
                    "CUDA_VISIBLE_DEVICES": "",
                },
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in range(2)
        ]
        for rank, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=120)
            if proc.returncode != 0:
                failures.append(f"attempt {attempt}, rank {rank}: exit {proc.returncode}: {out[-500:]}")
    assert not failures, "\n".join(failures)
