"""tools/ncu_layer.py: ncu's CSV (``--csv --page details``) is read into one row per kernel with its share and its
placement against the roofs (checked on a CSV of ncu's layout, as profiling needs a GPU); bad arguments and a
missing ncu are reported by name."""

import sys
from pathlib import Path

import pytest

from conftest import assert_cli_refuses

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import ncu_layer  # noqa: E402

HEADER = (
    '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
    '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"'
)


def rows(launch_id, kernel, duration, unit, sm, mem, dram):
    section = ncu_layer.SECTION
    common = f'"{launch_id}","1","python3","h","{kernel}","1","7","(256, 1, 1)","(132, 1, 1)","0","9.0"'
    return [
        f'{common},"{section}","DRAM Frequency","Ghz","2.62"',
        f'{common},"{section}","Duration","{unit}","{duration}"',
        f'{common},"{section}","Compute (SM) Throughput","%","{sm}"',
        f'{common},"{section}","Memory Throughput","%","{mem}"',
        f'{common},"{section}","DRAM Throughput","%","{dram}"',
        f'{common},"Launch Statistics","Duration","ns","1"',  # another section's metric of the same name
    ]


def make_csv():
    lines = ["==PROF== Connected to process 1", HEADER]
    lines += rows(0, "gemm<bf16>", "1,200.00", "usecond", "80.0", "40.0", "30.0")
    lines += rows(1, "gelu_kernel", "100", "usecond", "20.0", "90.0", "88.0")
    lines += rows(2, "gemm<bf16>", "800000", "nsecond", "70.0", "50.0", "45.0")
    lines += rows(3, "plan_kernel", "50", "usecond", "5.0", "10.0", "2.0")
    lines.append("==PROF== Disconnected from process 1")
    return "\n".join(lines) + "\n"


def test_kernels_are_merged_by_name_with_weighted_throughputs_and_placed():
    kernels = ncu_layer.parse(make_csv())
    assert [k["name"] for k in kernels] == ["gemm<bf16>", "gelu_kernel", "plan_kernel"]
    gemm, gelu, plan = kernels
    assert gemm["calls"] == 2 and gemm["duration"] == pytest.approx(2000.0)
    assert gemm["sm_pct"] == pytest.approx((80.0 * 1200 + 70.0 * 800) / 2000)  # weighted by duration
    assert gemm["mem_pct"] == pytest.approx((40.0 * 1200 + 50.0 * 800) / 2000)
    assert (gemm["placement"], gelu["placement"], plan["placement"]) == ("compute", "memory", "latency")
    assert gelu["duration"] == pytest.approx(100.0) and gelu["dram_pct"] == pytest.approx(88.0)
    text = ncu_layer.table(kernels)
    assert text.splitlines()[1].split()[:2] == ["2000.0", "93.0%"]  # the largest first, its share of 2150 us
    assert "2150.0 100.0%     4" in text


def test_a_csv_without_the_header_is_refused():
    with pytest.raises(ValueError, match="no ncu CSV header"):
        ncu_layer.parse("==PROF== ERR_NVGPUCTRPERM\n")


def test_parse_prints_the_table_of_a_saved_csv(tmp_path, capsys):
    saved = tmp_path / "ncu.csv"
    saved.write_text(make_csv())
    assert ncu_layer.main(["--parse", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "gelu_kernel" in out and "memory" in out and "latency" in out


def test_missing_ncu_is_named(capsys):
    assert ncu_layer.main(["--ncu", "/nonexistent/ncu"]) == 2
    assert "/nonexistent/ncu" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, named", [(["--config", "escan", "--index", "9"], "--index"), (["--config", "x"], "--config")]
)
def test_bad_arguments_are_refused_by_name(argv, named, capsys):
    assert_cli_refuses(ncu_layer.main, argv, named, capsys)
