"""tools/memory_at_peak.py: the replay of an allocator trace finds the peak and what is alive there (checked on a
made-up trace, as the recording itself needs a CUDA device), and bad arguments are refused by name."""

import sys
from pathlib import Path

import pytest

from conftest import assert_cli_refuses

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import memory_at_peak  # noqa: E402

MiB = 2**20


def event(action, addr, size, name="fastmoe::ops::permute(at::Tensor const&)", filename="dispatch.cpp"):
    return {"action": action, "addr": addr, "size": size, "frames": [{"name": name, "filename": filename, "line": 7}]}


def test_replay_finds_the_peak_and_the_blocks_alive_there():
    trace = [
        event("alloc", 1, 4 * MiB),
        event("alloc", 2, 8 * MiB, "at::native::empty_cuda(...)", "??"),
        event("segment_alloc", 9, 64 * MiB),  # the allocator's own reservations do not count
        event("free_requested", 1, 4 * MiB),
        event("free_completed", 1, 4 * MiB),
        event("alloc", 3, 2 * MiB, "grouped_mm_moe", "benchmarks/baselines/moe_baselines.py"),  # 10 MiB: below 12
        event("alloc", 4, 3 * MiB, "torch::autograd::Engine", "engine.cpp"),  # 13 MiB: the peak
        event("free_requested", 2, 8 * MiB),
        event("alloc", 5, 1 * MiB),
    ]
    peak, live = memory_at_peak.live_at_peak(trace)
    assert peak == 13 * MiB
    assert sorted(live) == [2, 3, 4]
    assert [size for size, _ in (live[a] for a in (2, 3, 4))] == [8 * MiB, 2 * MiB, 3 * MiB]
    assert live[2][1] == "at::native::empty_cuda (??:7)"
    assert live[3][1] == "grouped_mm_moe (moe_baselines.py:7)"
    assert live[4][1] == "(no named frame)"


def test_an_empty_trace_has_no_peak():
    assert memory_at_peak.live_at_peak([]) == (0, {})


@pytest.mark.parametrize(
    "argv, named",
    [(["--config", "escan", "--index", "4"], "--index"), (["--config", "mixtral9"], "--config")],
)
def test_bad_arguments_are_refused_by_name(argv, named, capsys):
    assert_cli_refuses(memory_at_peak.main, argv, named, capsys)
