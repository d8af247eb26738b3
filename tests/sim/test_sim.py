"""fastmoe.sim, the cost model of an expert-parallel layer (docs/scaling.md), and its tool tools/simulate_ep.py: the
calibration reproduces the measured steps of docs/runs/, the model keeps the properties its equations promise, bad
arguments are refused by name, and every table of docs/scaling.md is what the tool prints."""

import json
import math
import re
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

from fastmoe import sim

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "simulate_ep.py"
DOC = ROOT / "docs" / "scaling.md"

MIXTRAL = sim.Layer(8192, 4096, 14336, 2, experts_per_rank=4)
FINE = sim.Layer(16384, 2048, 1408, 6, experts_per_rank=32)
PAPER = sim.Layer(4096, 1024, 4096, 2, experts_per_rank=32)
DSV3 = sim.Layer(8192, 7168, 2048, 8, experts_total=256)
LAYERS = [MIXTRAL, FINE, PAPER, DSV3]

# The one measured configuration outside the 10% goal, and its bound (docs/scaling.md explains it: that run's
# W = 2 step of paper was faster than its W = 1 step, for both implementations).
OUTLIERS = {("paper", 2, "2026-11-28-h200x4-bench-ep.jsonl")}
OUTLIER_BOUND = 0.15


def tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------- calibration


def test_calibration_reproduces_every_measured_step():
    points = sim.measured_points(ROOT)
    # 9 one-GPU steps without a process group, 18 fastmoe and 18 baseline steps of bench_ep
    assert len(points) == 45
    assert {p.setup.world for p in points} == {1, 2, 4}
    hw = sim.Hardware.calibrated()
    errors = {}
    for p in points:
        errors[p] = sim.predict(p.layer, p.setup, hardware=hw).total_ms / p.ms - 1
    for p, error in errors.items():
        key = (p.config, p.setup.world, Path(p.source).name)
        bound = OUTLIER_BOUND if key in OUTLIERS else 0.10
        assert abs(error) <= bound, f"{p.label} from {p.source}: predicted {100 * error:+.1f}%, bound {bound:.0%}"
    for impl in sim.IMPLS:
        mine = [e for p, e in errors.items() if p.setup.impl == impl]
        rms = math.sqrt(sum(e * e for e in mine) / len(mine))
        assert rms < 0.06, f"{impl}: RMS error {rms:.3f} over {len(mine)} points"


def _log_error(hw: sim.Hardware, points) -> float:
    return sum(math.log(sim.predict(p.layer, p.setup, hardware=hw).total_ms / p.ms) ** 2 for p in points)


@pytest.mark.parametrize("impl", sim.IMPLS)
def test_fitted_constants_are_the_fit(impl):
    """The stored constants minimise the fit's objective: moving any fitted one by 2% makes it worse."""
    fitted = [
        name
        for name, entry in sim.calibration()["constants"].items()
        if entry["source"].startswith("fitted") and name.startswith("baseline") == (impl == "ep_baseline")
    ]
    assert len(fitted) == (7 if impl == "fastmoe" else 2)
    points = [p for p in sim.measured_points(ROOT) if p.setup.impl == impl]
    hw = sim.Hardware.calibrated()
    best = _log_error(hw, points)
    for name in fitted:
        for factor in (0.98, 1.02):
            moved = _log_error(replace(hw, **{name: getattr(hw, name) * factor}), points)
            assert moved >= best * (1 - 1e-9), f"{name} x{factor} lowers the fit's error from {best} to {moved}"


def test_every_constant_has_a_source():
    data = sim.calibration()
    assert list(data["constants"]) == [f.name for f in fields(sim.Hardware)]
    for name, entry in data["constants"].items():
        assert entry["unit"] and entry["source"], name
        assert entry["source"].split()[0].rstrip(":") in ("fitted", "measured", "assumed", "derived", "H200"), name
    for entry in data["measurements"]:
        assert (ROOT / entry["file"]).is_file(), entry["file"]


# ----------------------------------------------------------------------------------------------- properties

WORLDS = (1, 2, 4, 8, 16, 64, 256)
EXPONENTS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)


@pytest.mark.parametrize("layer", LAYERS, ids=["mixtral", "fine", "paper", "dsv3"])
@pytest.mark.parametrize("placement", sim.PLACEMENTS)
def test_more_skew_is_never_faster_without_replication(layer, placement):
    """Without replication a larger Zipf exponent never shortens the step while the hottest expert takes less than
    a slot of every token (beyond that, more skew only moves load between the saturated experts), and no skew is
    faster than uniform routing."""
    hw = sim.Hardware.calibrated()
    checked = 0
    for world in WORLDS:
        ranks, local = layer.expert_parallel(world)
        for setup in (
            sim.Setup(world=world),
            sim.Setup(world=world, exchange="hierarchical", chunks=4),
            sim.Setup(world=world, copies="slot"),
        ):
            uniform = sim.predict(layer, setup, sim.Routing(), hw).total_ms
            previous = uniform
            for s in EXPONENTS:
                routing = sim.Routing("zipf", s, placement)
                t = sim.predict(layer, setup, routing, hw).total_ms
                assert t >= uniform * (1 - 1e-12), (world, setup, s, t, uniform)
                if routing.slot_shares(ranks * local, layer.top_k)[0] < 1:
                    assert t >= previous * (1 - 1e-12), (world, setup, s, t, previous)
                    checked += 1
                previous = t
    assert checked > 50


@pytest.mark.parametrize("world", (8, 16, 64, 256, 1024))
@pytest.mark.parametrize("gpus_per_node", (1, 2, 4, 8))
def test_hierarchical_never_sends_more_infiniband_messages(world, gpus_per_node):
    hw = sim.Hardware.calibrated()
    for routing in (sim.Routing(), sim.Routing("zipf", 1.0)):
        flat = sim.predict(MIXTRAL, sim.Setup(world=world, gpus_per_node=gpus_per_node), routing, hw)
        hier = sim.predict(
            MIXTRAL, sim.Setup(world=world, gpus_per_node=gpus_per_node, exchange="hierarchical"), routing, hw
        )
        assert hier.ib_messages <= flat.ib_messages
        gpn = min(world, gpus_per_node)
        # 7 exchanges a step (forward: rows, scores, expert ids, partial sums; backward: 3 gradients): flat sends to
        # every rank of the other nodes, hierarchical to one GPU of each other node
        assert flat.ib_messages == 7 * (world - gpn)
        assert hier.ib_messages == 7 * (world // gpn - 1)
        if routing.distribution == "uniform":  # both move the same bytes over InfiniBand, only in fewer messages
            assert hier.ib_bytes == pytest.approx(flat.ib_bytes, rel=1e-9)


def test_one_gpu_has_no_exchange_time():
    hw = sim.Hardware.calibrated()
    for layer in LAYERS:
        for routing in (sim.Routing(), sim.Routing("zipf", 1.0, "packed")):
            for setup in (sim.Setup(world=1), sim.Setup(world=1, chunks=4), sim.Setup(group=False)):
                p = sim.predict(layer, setup, routing, hw)
                assert p.parts["exchange (exposed)"] == 0 and p.exchange_ms == 0
                assert p.ib_messages == 0 and p.ib_bytes == 0 and p.nvlink_bytes == 0


def test_single_node_has_no_infiniband():
    p = sim.predict(FINE, sim.Setup(world=8, exchange="hierarchical"))
    assert p.ib_messages == 0 and p.ib_bytes == 0 and p.nvlink_bytes > 0
    assert p.total_ms == sim.predict(FINE, sim.Setup(world=8)).total_ms  # one node: hierarchical is flat


def test_overlap_hides_part_of_the_exchange():
    hw = sim.Hardware.calibrated()
    one = sim.predict(MIXTRAL, sim.Setup(world=64, exchange="hierarchical"), hardware=hw)
    four = sim.predict(MIXTRAL, sim.Setup(world=64, exchange="hierarchical", chunks=4), hardware=hw)
    assert one.parts["exchange (exposed)"] == pytest.approx(one.exchange_ms)
    assert 0 < four.parts["exchange (exposed)"] < four.exchange_ms
    assert four.total_ms < one.total_ms
    # chunks cost GEMM efficiency and exchange calls: with no exchange to hide they only slow the step down
    assert sim.predict(MIXTRAL, sim.Setup(world=1, chunks=4)).total_ms > sim.predict(MIXTRAL, sim.Setup()).total_ms


def test_replication_is_chosen_by_the_cost_model():
    hw = sim.Hardware.calibrated()
    for layer in (MIXTRAL, FINE, DSV3):
        setup = sim.Setup(world=8, chunks=2)
        uniform = sim.predict(layer, replace(setup, replication=True), sim.Routing(), hw)
        assert uniform.replicated == []  # balanced routing: moving weights never pays
        assert uniform.total_ms == sim.predict(layer, setup, sim.Routing(), hw).total_ms
        skewed = sim.Routing("zipf", 1.0)
        without = sim.predict(layer, setup, skewed, hw)
        with_rep = sim.predict(layer, replace(setup, replication=True), skewed, hw)
        assert with_rep.replicated and with_rep.total_ms < without.total_ms
        assert with_rep.replicated[0] == 0  # the hottest expert first
        assert with_rep.imbalance < without.imbalance
        assert with_rep.parts["replication"] > 0
    # an InfiniBand too slow to move weights: replication finds nothing worth its cost
    slow = replace(hw, ib_gbps=0.01)
    p = sim.predict(MIXTRAL, sim.Setup(world=64, replication=True), sim.Routing("zipf", 0.5), slow)
    assert p.replicated == []


def test_zipf_shares():
    for experts, k, s in ((8, 2, 1.0), (256, 8, 2.0), (64, 6, 0.3), (4, 4, 5.0)):
        shares = sim.Routing("zipf", s).slot_shares(experts, k)
        assert sum(shares) == pytest.approx(k)
        assert all(0 <= q <= 1 + 1e-12 for q in shares)
        assert shares == sorted(shares, reverse=True)
    assert sim.Routing().slot_shares(16, 2) == [2 / 16] * 16
    assert sim.Routing("zipf", 5.0).slot_shares(4, 4) == [1.0] * 4  # every token picks every expert


def test_uniform_rows_per_rank_are_exact():
    """A token of uniform top-k routing reaches a rank of n of the E experts with probability 1 - C(E-n, k)/C(E, k):
    the rows the model sends to each rank, checked against the busiest rank's received rows."""
    T = 1000
    for experts_per_rank, world, k in ((4, 2, 2), (32, 2, 6), (2, 8, 3)):
        layer = sim.Layer(T, 16, 16, k, experts_per_rank=experts_per_rank)
        p = sim.predict(layer, sim.Setup(world=world, gpus_per_node=world))
        E = experts_per_rank * world
        hit = 1 - math.comb(E - experts_per_rank, k) / math.comb(E, k)
        # the busiest sender's NVLink rows per step: 7 exchanges of widths 2d, 2k, 8k, 2d | 2d, 2d, 2k bytes per row
        widths = (2 * 16) * 4 + 2 * k * 2 + 8 * k
        assert p.nvlink_bytes == pytest.approx((world - 1) * T * hit * widths)


# ----------------------------------------------------------------------------------------------- bad arguments

BAD = [
    (lambda: sim.Layer(0, 8, 8, 1, experts_per_rank=1), "tokens must be an integer >= 1, got 0"),
    (lambda: sim.Layer(8, 8, 8, 1), "give exactly one of experts_per_rank and experts_total"),
    (lambda: sim.Layer(8, 8, 8, 1, experts_per_rank=2, experts_total=4), "experts_total=4"),
    (lambda: sim.Layer(8, 8, 8, 9, experts_total=8), "top_k must be <= experts_total=8, got 9"),
    (lambda: sim.Layer(8, 8, 8, 1, experts_per_rank=1.5), "experts_per_rank must be an integer >= 1, got 1.5"),
    (lambda: sim.Setup(world=0), "world must be an integer >= 1, got 0"),
    (lambda: sim.Setup(world=12), "world=12 spans several nodes, so it must be a multiple of gpus_per_node=8"),
    (lambda: sim.Setup(chunks=-1), "chunks must be an integer >= 1, got -1"),
    (lambda: sim.Setup(exchange="ring"), "exchange must be one of ('flat', 'hierarchical'), got 'ring'"),
    (lambda: sim.Setup(copies="token"), "copies must be one of ('rank', 'slot'), got 'token'"),
    (lambda: sim.Setup(impl="tutel"), "impl must be one of ('fastmoe', 'ep_baseline'), got 'tutel'"),
    (lambda: sim.Setup(replication="yes"), "replication must be a bool, got 'yes'"),
    (lambda: sim.Setup(world=2, group=False), "group=False is a one-GPU layer, got world=2"),
    (lambda: sim.Setup(impl="ep_baseline", copies="slot", chunks=2), "chunks=2"),
    (lambda: sim.Routing("pareto"), "distribution must be one of ('uniform', 'zipf'), got 'pareto'"),
    (lambda: sim.Routing("zipf", -1.0), "exponent must be a finite number >= 0, got -1.0"),
    (lambda: sim.Routing("zipf", math.inf), "exponent must be a finite number >= 0, got inf"),
    (lambda: sim.Routing("uniform", 1.0), "exponent is for distribution='zipf', got exponent=1.0"),
    (lambda: sim.Routing("zipf", 1.0, "random"), "placement must be one of ('spread', 'packed'), got 'random'"),
    (lambda: sim.Hardware.calibrated(ib_gbps=0), "ib_gbps must be a finite number > 0, got 0"),
    (lambda: sim.Hardware.calibrated(ib_latency_us=-1), "ib_latency_us must be a finite number >= 0, got -1"),
    (lambda: sim.Hardware.calibrated(nvlink_tbps=1), "unknown hardware numbers ['nvlink_tbps']"),
    (lambda: sim.predict(sim.Layer(8, 8, 8, 3, experts_per_rank=1), sim.Setup()), "top_k must be <= the 1 experts"),
    (lambda: sim.predict(sim.Layer(8, 8, 8, 1, experts_per_rank=1), sim.Setup(chunks=9)), "chunks must be <= tokens"),
    (lambda: sim.predict(DSV3, sim.Setup(world=24, gpus_per_node=24)), "world=24 must divide experts_total=256"),
    (lambda: sim.predict("mixtral", sim.Setup()), "layer must be a fastmoe.sim.Layer, got str"),
    (lambda: sim.predict(MIXTRAL, sim.Setup(), "uniform"), "routing must be a fastmoe.sim.Routing, got str"),
]


@pytest.mark.parametrize("make, message", BAD, ids=[m for _, m in BAD])
def test_bad_arguments_name_the_argument_and_value(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


# ----------------------------------------------------------------------------------------------- the tool


def test_cli_help_prediction_and_table():
    proc = tool("--help")
    assert proc.returncode == 0 and "predict" in proc.stdout and "scaling" in proc.stdout

    proc = tool("predict", "--config", "mixtral", "--world", "64", "--exchange", "hierarchical", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    expected = sim.predict(MIXTRAL, sim.Setup(world=64, exchange="hierarchical"))
    assert out["total_ms"] == pytest.approx(expected.total_ms)
    assert out["efficiency"] == pytest.approx(sim.efficiency(MIXTRAL, sim.Setup(world=64, exchange="hierarchical")))
    assert sum(out["parts_ms"].values()) == pytest.approx(out["total_ms"])

    proc = tool("scaling")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line[2].isalpha()]
    assert rows[0].startswith("| config | GPUs | flat | hierarchical | + overlap | + replication |")
    assert len(rows) == 1 + 3 * 4  # mixtral, fine, dsv3 at 8, 64, 256, 1024 GPUs
    for row in rows[1:]:
        effs = [float(cell.split()[0]) for cell in row.strip("| ").split(" | ")[2:]]
        assert all(0 < e < 2 for e in effs), row
        assert effs[3] >= effs[2]  # replication keeps overlap's chunks and only takes what shortens the step


def test_cli_refuses_bad_arguments_by_name():
    proc = tool("predict", "--config", "mixtral", "--world", "12")
    assert proc.returncode == 2
    assert "world=12 spans several nodes, so it must be a multiple of gpus_per_node=8" in proc.stderr
    proc = tool("predict", "--tokens", "8")
    assert proc.returncode == 2 and "--d-model" in proc.stderr
    proc = tool("scaling", "--zipf", "-1")
    assert proc.returncode == 2 and "exponent must be a finite number >= 0, got -1.0" in proc.stderr


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (requirements-dev.txt)")
    png = tmp_path / "scaling.png"
    proc = tool("scaling", "--configs", "fine", "--worlds", "8", "64", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _doc_commands() -> list:
    """The tool's commands in docs/scaling.md's runnable bash blocks."""
    text = DOC.read_text()
    commands = []
    for block in re.finditer(r"(<!-- snippet: [^\n]*-->\n)?```bash\n(.*?)```", text, re.S):
        if block.group(1):
            continue  # a skipped block (the plot commands, which write the committed images)
        for line in block.group(2).splitlines():
            if line.startswith("python tools/simulate_ep.py"):
                commands.append(line.split()[2:])
    return commands


def test_every_table_of_the_doc_is_the_tools_output():
    """docs/scaling.md quotes the output of each command it shows, as the tool prints it today."""
    text = DOC.read_text()
    commands = _doc_commands()
    assert len(commands) >= 5
    for args in commands:
        proc = tool(*args)
        assert proc.returncode == 0, f"{args}: {proc.stderr}"
        assert proc.stdout.strip() in text, f"docs/scaling.md does not hold the output of {' '.join(args)}"
