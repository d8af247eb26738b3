"""A cost model of one expert-parallel MoE layer: the forward + backward step time of ``FMoETransformerMLP``.

``predict(layer, setup, routing, hardware)`` adds up the pieces of one step, each from a count of bytes or FLOPs
over a machine rate (docs/scaling.md has the equations):

- the gate: its GEMM ``[T, d] x [d, E]`` forward and backward and the passes over the ``[T, E]`` logits;
- the experts: the two grouped GEMMs (forward 2, backward 4 calls) on the rank with the most slots, each call
  bound by its FLOPs or by its operand traffic, each expert of each chunk adding a fixed cost and a part-filled
  tile row;
- the memory passes of the token path (permute, activation, combine and their gradients), counted from the op
  sequence of ``fastmoe::TokenDispatch`` (csrc/ops/pipeline.cpp);
- the exchanges: every all-to-all of the step (forward: rows, scores, expert ids, partial sums; backward: their
  gradients) over NVLink inside a node and InfiniBand across nodes, flat (every rank pair) or hierarchical
  (over NVLink to the GPU of the destination's rail, then one InfiniBand message per rail and node pair);
- with ``chunks > 1`` the exchanges overlap the experts (a two-stage pipeline);
- with ``replication`` the hottest experts are copied to every rank when the model says that moving their
  weights and gradients costs less than moving their tokens (FasterMoE's shadowing).

The rates come from ``sim_calibration.json`` beside this file: H200 numbers from its specification and from the
measurements in docs/runs/, each with its source. The model is pure Python: it imports neither torch nor fastmoe's
extension, so ``tools/simulate_ep.py`` loads this file alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

CALIBRATION_FILE = Path(__file__).with_name("sim_calibration.json")

EXCHANGES = ("flat", "hierarchical")
COPIES = ("rank", "slot")
IMPLS = ("fastmoe", "ep_baseline")
DISTRIBUTIONS = ("uniform", "zipf")
PLACEMENTS = ("spread", "packed")
INDEX_BYTES = 8  # expert ids travel as int64


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _positive_int(name: str, value) -> None:
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        f"{name} must be an integer >= 1, got {value!r}",
    )


def _positive_float(name: str, value) -> None:
    _check(
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
        f"{name} must be a finite number > 0, got {value!r}",
    )


def _non_negative_float(name: str, value) -> None:
    _check(
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0,
        f"{name} must be a finite number >= 0, got {value!r}",
    )


# ----------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Layer:
    """One MoE FFN layer as every rank sees it: ``tokens`` of its own per step, GELU experts ``d_model -> d_hidden
    -> d_model`` without bias, top-``top_k`` routing over all experts.

    Give ``experts_per_rank`` (the experts grow with the GPUs, as in benchmarks/bench_ep.py) or ``experts_total``
    (a fixed expert count; with more GPUs than experts each expert-parallel group of ``experts_total`` ranks is
    repeated data-parallel)."""

    tokens: int
    d_model: int
    d_hidden: int
    top_k: int
    experts_per_rank: int | None = None
    experts_total: int | None = None
    dtype_bytes: int = 2

    def __post_init__(self):
        for name in ("tokens", "d_model", "d_hidden", "top_k", "dtype_bytes"):
            _positive_int(name, getattr(self, name))
        _check(
            (self.experts_per_rank is None) != (self.experts_total is None),
            f"give exactly one of experts_per_rank and experts_total, got experts_per_rank={self.experts_per_rank!r} "
            f"and experts_total={self.experts_total!r}",
        )
        for name in ("experts_per_rank", "experts_total"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.experts_total is not None:
            _check(
                self.top_k <= self.experts_total,
                f"top_k must be <= experts_total={self.experts_total}, got {self.top_k}",
            )

    def expert_parallel(self, world: int) -> tuple[int, int]:
        """``(ranks of the expert-parallel group, experts per rank)`` on ``world`` GPUs."""
        if self.experts_per_rank is not None:
            return world, self.experts_per_rank
        group = min(world, self.experts_total)
        _check(
            self.experts_total % group == 0 and world % group == 0,
            f"world={world} must divide experts_total={self.experts_total} or be a multiple of it",
        )
        return group, self.experts_total // group


@dataclass(frozen=True)
class Setup:
    """How the layer runs: ``world`` GPUs, ``gpus_per_node`` of them on one NVLink domain, the token path.

    - ``chunks``: fastmoe's ``ep_chunks`` (token chunks whose exchanges overlap each other's experts);
    - ``exchange``: ``"flat"`` (one all-to-all over every rank pair) or ``"hierarchical"`` (NVLink to the rail GPU,
      then InfiniBand once per rail);
    - ``replication``: copy hot experts to every rank where the model finds it cheaper than moving their tokens;
    - ``copies``: ``"rank"``, a token row travels once to each rank that owns one of its experts (fastmoe since
      2026-11-29), or ``"slot"``, once per slot (fastmoe before, and the plain-PyTorch baseline);
    - ``impl``: ``"fastmoe"`` or ``"ep_baseline"`` (benchmarks/baselines/ep_baseline.py, for the calibration);
    - ``group``: ``False`` for a layer without a process group (one GPU, no exchange at all; bench_moe_layer.py).
    """

    world: int = 1
    gpus_per_node: int = 8
    chunks: int = 1
    exchange: str = "flat"
    replication: bool = False
    copies: str = "rank"
    impl: str = "fastmoe"
    group: bool = True

    def __post_init__(self):
        _positive_int("world", self.world)
        _positive_int("gpus_per_node", self.gpus_per_node)
        _positive_int("chunks", self.chunks)
        _check(self.exchange in EXCHANGES, f"exchange must be one of {EXCHANGES}, got {self.exchange!r}")
        _check(self.copies in COPIES, f"copies must be one of {COPIES}, got {self.copies!r}")
        _check(self.impl in IMPLS, f"impl must be one of {IMPLS}, got {self.impl!r}")
        _check(isinstance(self.replication, bool), f"replication must be a bool, got {self.replication!r}")
        _check(isinstance(self.group, bool), f"group must be a bool, got {self.group!r}")
        _check(
            self.world <= self.gpus_per_node or self.world % self.gpus_per_node == 0,
            f"world={self.world} spans several nodes, so it must be a multiple of gpus_per_node={self.gpus_per_node}",
        )
        _check(self.group or self.world == 1, f"group=False is a one-GPU layer, got world={self.world}")
        _check(
            self.impl == "fastmoe" or (self.copies == "slot" and self.chunks == 1 and not self.replication),
            f"impl='ep_baseline' sends a row per slot with one chunk and no replication, got copies={self.copies!r}, "
            f"chunks={self.chunks}, replication={self.replication}",
        )


@dataclass(frozen=True)
class Routing:
    """Where the slots go: ``"uniform"`` over the experts, or ``"zipf"``, the ``i``-th hottest expert (from 0)
    drawing a share proportional to ``(i + 1) ** -exponent`` of the slots. Each token picks ``top_k`` distinct
    experts, so no expert gets more than one slot per token; the share above that goes to the others.

    ``placement`` says where the hot experts live: ``"spread"``, the ``i``-th hottest on rank ``i % ranks`` (each
    rank gets one of the hottest, as a placement that knew the loads would do), or ``"packed"``, the hottest
    ``experts_per_rank`` together on rank 0, the next on rank 1 (the worst case)."""

    distribution: str = "uniform"
    exponent: float = 0.0
    placement: str = "spread"

    def __post_init__(self):
        _check(
            self.distribution in DISTRIBUTIONS,
            f"distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}",
        )
        _non_negative_float("exponent", self.exponent)
        _check(
            self.distribution == "zipf" or self.exponent == 0,
            f"exponent is for distribution='zipf', got exponent={self.exponent!r} with {self.distribution!r}",
        )
        _check(self.placement in PLACEMENTS, f"placement must be one of {PLACEMENTS}, got {self.placement!r}")

    def owner(self, expert: int, ranks: int, local: int) -> int:
        """The rank of the ``expert``-th hottest expert."""
        return expert % ranks if self.placement == "spread" else expert // local

    def slot_shares(self, experts: int, top_k: int) -> list[float]:
        """Expected slots per token of each expert (hottest first): each in [0, 1], summing to ``top_k``."""
        if self.distribution == "uniform" or self.exponent == 0:
            return [top_k / experts] * experts
        weights = [(i + 1) ** -self.exponent for i in range(experts)]
        tail = [0.0] * (experts + 1)  # tail[i] = sum(weights[i:])
        for i in range(experts - 1, -1, -1):
            tail[i] = tail[i + 1] + weights[i]
        capped = 0  # the hottest experts take a slot of every token; the rest share what is left
        while capped < top_k and weights[capped] * (top_k - capped) / tail[capped] > 1:
            capped += 1
        scale = (top_k - capped) / tail[capped] if capped < experts else 0.0
        return [1.0] * capped + [w * scale for w in weights[capped:]]


@dataclass(frozen=True)
class Hardware:
    """Machine rates; ``Hardware.calibrated()`` reads them from sim_calibration.json (each with its source)."""

    gemm_tflops: float  # grouped expert GEMMs on full groups
    gemm_group_us: float  # per group (expert) and GEMM call: its tiles' start and end
    gemm_waste_rows: float  # per group and GEMM call: the rows of its last, partly filled tile row
    dense_tflops: float  # plain matmul (the gate)
    hbm_gbps: float  # the token path's memory passes
    hbm_peak_gbps: float  # the GEMMs' operand traffic (weights, rows), when it exceeds their compute
    nvlink_gbps: float  # all-to-all, per GPU and direction
    nvlink_latency_us: float  # per peer and exchange
    exchange_call_us: float  # per exchange across GPUs, whatever the peers: the collective's launch and handshake
    ib_gbps: float  # per GPU and direction
    ib_latency_us: float  # per peer (message) and exchange
    step_fixed_ms: float  # per step: launch- and latency-bound work of the gate and the plan
    ep_fixed_ms: float  # per step, with a process group: the counts exchange, its host read, the exchange calls
    overlap_slowdown: float  # the fraction the experts slow down while an exchange runs beside them
    baseline_slot_passes: float  # ep_baseline's passes over its [slots, d] rows beyond fastmoe's
    baseline_fixed_ms: float  # ep_baseline's per-step time above fastmoe's

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("gemm_tflops", "dense_tflops", "hbm_gbps", "hbm_peak_gbps", "nvlink_gbps", "ib_gbps"):
                _positive_float(f.name, value)
            else:
                _non_negative_float(f.name, value)

    @classmethod
    def calibrated(cls, path: Path | str | None = None, **overrides) -> Hardware:
        values = {name: entry["value"] for name, entry in calibration(path)["constants"].items()}
        unknown = sorted(set(overrides) - set(values))
        _check(not unknown, f"unknown hardware numbers {unknown}; known: {sorted(values)}")
        return cls(**{**values, **overrides})


def calibration(path: Path | str | None = None) -> dict:
    """The calibration file: ``constants`` (name -> value, unit, source) and the ``measurements`` it was fitted on."""
    data = json.loads(Path(path or CALIBRATION_FILE).read_text())
    names = {f.name for f in fields(Hardware)}
    _check(
        set(data["constants"]) == names,
        f"{path or CALIBRATION_FILE} must hold exactly the constants {sorted(names)}, got {sorted(data['constants'])}",
    )
    return data


# ----------------------------------------------------------------------------------------------- output


@dataclass
class Prediction:
    """One step's predicted time, in ms, and what it is made of."""

    total_ms: float
    parts: dict  # name -> ms; they add up to total_ms
    ib_messages: int  # InfiniBand messages a rank sends per step
    ib_bytes: float  # bytes a rank sends over InfiniBand per step (the busiest rank)
    nvlink_bytes: float  # bytes a rank sends over NVLink per step (the busiest rank)
    replicated: list = field(default_factory=list)  # global ids of the experts copied to every rank
    max_slots: float = 0.0  # slots on the busiest rank
    mean_slots: float = 0.0  # slots per rank on average
    exchange_ms: float = 0.0  # the exchanges' time before any overlap

    @property
    def imbalance(self) -> float:
        return self.max_slots / self.mean_slots if self.mean_slots else 1.0


# ----------------------------------------------------------------------------------------------- the model


def _hit_probability(share: float, experts: int, top_k: int) -> float:
    """Probability that a token sends at least one slot to a rank whose experts hold ``share`` slots per token.

    Exact for uniform routing (``k`` distinct experts out of ``E``, the rank holding ``n = E * share / k``:
    ``1 - C(E - n, k) / C(E, k)``), and the same formula with that effective ``n`` otherwise."""
    if share <= 0:
        return 0.0
    n = experts * share / top_k
    miss = 1.0
    for i in range(top_k):
        miss *= max(0.0, 1.0 - n / (experts - i))
    return 1.0 - miss


@dataclass
class _Links:
    """One all-to-all in which every rank sends ``rows_to[j]`` rows to rank ``j`` (all ranks route alike), per byte
    of row width: the ms of each link on its busiest rank, and what the busiest rank sends over it."""

    nvlink_ms: float
    ib_ms: float
    latency_ms: float
    hierarchical: bool  # NVLink, then InfiniBand (else both at once)
    ib_messages: int
    ib_rows: float
    nvlink_rows: float

    def time_ms(self, width: float) -> float:
        if self.hierarchical:
            return (self.nvlink_ms + self.ib_ms) * width + self.latency_ms
        return max(self.nvlink_ms, self.ib_ms) * width + self.latency_ms


def _links(rows_to: list[float], setup: Setup, ranks: int, hw: Hardware) -> _Links:
    """Sending and receiving overlap and the busiest rank sets the time. Flat: every rank pair, NVLink and
    InfiniBand at once, each peer costing its link's latency. Hierarchical: over NVLink to the GPU of the
    destination's rail, then along the rail over InfiniBand, one message per other node. A rank's rows to itself
    are a local copy, counted with the memory passes."""
    gpn = min(setup.gpus_per_node, ranks)
    nodes = ranks // gpn
    nv_bw, ib_bw = hw.nvlink_gbps * 1e6, hw.ib_gbps * 1e6  # bytes per ms
    call = hw.exchange_call_us
    node_rows = [sum(rows_to[n * gpn : (n + 1) * gpn]) for n in range(nodes)]
    total = sum(node_rows)
    top = max(rows_to)
    if setup.exchange == "flat" or nodes == 1:
        nv_send = max(node_rows[j // gpn] - r for j, r in enumerate(rows_to))
        ib_send = max(total - node_rows[j // gpn] for j in range(ranks))
        nv, ib = max(nv_send, (gpn - 1) * top), max(ib_send, (ranks - gpn) * top)
        latency = (call + (gpn - 1) * hw.nvlink_latency_us + (ranks - gpn) * hw.ib_latency_us) / 1e3
        return _Links(nv / nv_bw, ib / ib_bw, latency, False, ranks - gpn, ib_send, nv_send)
    rail_rows = [sum(rows_to[g::gpn]) for g in range(gpn)]
    nv_send = max(total - rail for rail in rail_rows)
    nv = max(nv_send, (gpn - 1) * max(rail_rows))
    ib_send = max(gpn * (rail_rows[j % gpn] - r) for j, r in enumerate(rows_to))  # the node's rows for each rail
    ib = max(ib_send, (nodes - 1) * gpn * top)
    latency = (2 * call + (gpn - 1) * hw.nvlink_latency_us + (nodes - 1) * hw.ib_latency_us) / 1e3
    return _Links(nv / nv_bw, ib / ib_bw, latency, True, nodes - 1, ib_send, nv_send)


def _gemm_ms(rows: float, experts: int, chunks: int, layer: Layer, hw: Hardware) -> tuple[float, float]:
    """Forward and backward ms of the two grouped GEMMs over ``rows`` rows in ``experts`` groups, called once per
    chunk. One call (forward: 2, backward: 4, each ``[m, d] x [d, h]`` in FLOPs) is bound by its compute or by its
    operand traffic (the weights or their gradients once, the rows in and out), plus a cost per group."""
    d, h, b = layer.d_model, layer.d_hidden, layer.dtype_bytes
    m = rows / chunks
    flops = 2 * d * h * (m + experts * hw.gemm_waste_rows)
    traffic = b * (experts * d * h + m * (d + h))
    call = max(flops / (hw.gemm_tflops * 1e9), traffic / (hw.hbm_peak_gbps * 1e6)) + experts * hw.gemm_group_us / 1e3
    return 2 * chunks * call, 4 * chunks * call


class _Model:
    """One layer, setup, routing and machine: the loads per rank, and the step for a set of replicated experts."""

    def __init__(self, layer: Layer, setup: Setup, routing: Routing, hw: Hardware):
        self.layer, self.setup, self.hw = layer, setup, hw
        self.ranks, self.local = layer.expert_parallel(setup.world)
        self.experts = self.ranks * self.local
        self.shares = routing.slot_shares(self.experts, layer.top_k)
        self.owners = [routing.owner(e, self.ranks, self.local) for e in range(self.experts)]
        self.held = [[] for _ in range(self.ranks)]  # each rank's experts, hottest first
        self.base_share = [0.0] * self.ranks  # slots per sender token that each rank's experts take
        for e in range(self.experts):
            self.held[self.owners[e]].append(e)
            self.base_share[self.owners[e]] += self.shares[e]

        self.base_rows = [self.row_share(q) for q in self.base_share]

    def row_share(self, slot_share: float) -> float:
        """Rows per sender token to a rank whose experts take ``slot_share`` slots per token."""
        if not self.setup.group:
            return 0.0
        if self.setup.copies == "rank":
            return _hit_probability(slot_share, self.experts, self.layer.top_k)
        return slot_share

    def slot_share(self, replicated: list) -> list:
        share = list(self.base_share)
        for e in replicated:
            share[self.owners[e]] = max(0.0, share[self.owners[e]] - self.shares[e])
        return share

    def step(self, replicated: list) -> Prediction:
        layer, setup, hw, ranks = self.layer, self.setup, self.hw, self.ranks
        T, d, h, k, b = layer.tokens, layer.d_model, layer.d_hidden, layer.top_k, layer.dtype_bytes
        n = setup.chunks
        hbm = hw.hbm_gbps * 1e6  # bytes per ms
        slot_share = self.slot_share(replicated)
        row_share = list(self.base_rows)
        for j in {self.owners[e] for e in replicated}:
            row_share[j] = self.row_share(slot_share[j])
        rep_slots = T * sum(self.shares[e] for e in replicated)  # run where the token is
        parts = {}

        # the gate: x [T, d] @ [d, E] forward, then its two gradient GEMMs, each compute- or memory-bound; the
        # top-k reads the logits, its backward writes their gradient
        E = self.experts
        gate_flops, gate_bytes = 2 * T * d * E, b * (T * d + T * E + d * E)
        parts["gate"] = 3 * max(gate_flops / (hw.dense_tflops * 1e9), gate_bytes / hbm) + 2 * b * T * E / hbm

        # the sender's passes over [T, d]: the combine's output, its gradient's input, the permute's gradient
        # output; over the rows it sends: the permute (2), the combine's input (1), their gradients (3); and the
        # copies of the rows it sends itself (read and write, per exchange)
        rows_out = T * sum(row_share)
        self_rows = max(T * r for r in row_share)
        widths = {"rank": ([d * b, k * b, k * INDEX_BYTES, d * b], [d * b, d * b, k * b]), "slot": ([d * b] * 2,) * 2}
        directions = widths[setup.copies] if setup.group else ([], [])
        copies = 2 * self_rows * sum(sum(w) for w in directions)
        parts["token passes (sender)"] = (b * d * (3 * T + 6 * rows_out) + copies) / hbm

        # the owner's compute on the busiest rank: permute to expert order, GEMMs, activation, combine, gradients.
        # It grows with a rank's slots and received rows: the ranks first go by a linear estimate (the GEMMs at
        # their compute rate), then the model proper picks the busiest of the first few.
        if setup.copies == "rank":  # slots: permute (2) + combine (1), gradients (3); rows in: 1 + 3
            per_slot_f, per_slot_b = b * (3 * d + 2 * h), b * (3 * d + 3 * h)
            per_row_f, per_row_b = b * d, 3 * b * d
        else:  # regroup to expert order and back (2 + 2), gradients (4); no combine on the owner
            per_slot_f, per_slot_b = b * (4 * d + 2 * h), b * (4 * d + 3 * h)
            per_row_f = per_row_b = 0.0
        if setup.impl == "ep_baseline":  # its extra passes over the slot rows, split 1 : 2 like the GEMMs
            per_slot_f += hw.baseline_slot_passes * b * d / 3
            per_slot_b += hw.baseline_slot_passes * b * d * 2 / 3
        gemm_per_slot = 12 * d * h / (hw.gemm_tflops * 1e9)
        load = [
            (gemm_per_slot + (per_slot_f + per_slot_b) / hbm) * (ranks * T * q + rep_slots)
            + (per_row_f + per_row_b) / hbm * ranks * T * r
            for q, r in zip(slot_share, row_share, strict=True)
        ]
        fwd_c = bwd_c = slots = -1.0
        for j in sorted(range(ranks), key=load.__getitem__)[-4:]:
            rank_slots = ranks * T * slot_share[j] + rep_slots
            rows_in = ranks * T * row_share[j]
            g_f, g_b = _gemm_ms(rank_slots, self.local + len(replicated), n, layer, hw)
            f = g_f + (per_slot_f * rank_slots + per_row_f * rows_in) / hbm
            bw = g_b + (per_slot_b * rank_slots + per_row_b * rows_in) / hbm
            if f + bw > fwd_c + bwd_c:
                fwd_c, bwd_c, slots = f, bw, rank_slots
        parts["experts (busiest rank)"] = fwd_c + bwd_c

        # the exchanges of the forward and of the backward, each issued once per chunk
        ib_messages, ib_bytes, nv_bytes, exposed, exchange = 0, 0.0, 0.0, 0.0, 0.0
        if setup.group and ranks > 1:
            links = _links([T * r / n for r in row_share], setup, ranks, hw)
            for direction, compute in zip(directions, (fwd_c, bwd_c), strict=True):
                x = n * sum(links.time_ms(w) for w in direction)
                exchange += x
                ib_messages += n * len(direction) * links.ib_messages
                ib_bytes += n * links.ib_rows * sum(direction)
                nv_bytes += n * links.nvlink_rows * sum(direction)
                if n == 1:
                    exposed += x
                else:  # chunk c's exchanges run beside chunk c - 1's experts: a two-stage pipeline
                    short = min(x, compute)
                    exposed += max(x, compute) + short / n + hw.overlap_slowdown * short * (1 - 1 / n) - compute
        parts["exchange (exposed)"] = exposed

        # replication, as the layer does it (csrc/ops/replication.cpp): each replicated expert's weights go down a
        # binomial tree in ceil(log2 W) rounds, each round a full copy over one link, and the gradients come back
        # up the same way. The tree is built from the owner, not from the node, so with several nodes a round's
        # busiest link is an InfiniBand one: every round is priced on the slowest link between the ranks.
        parts["replication"] = 0.0
        if replicated:
            gpn = min(setup.gpus_per_node, ranks)
            bw = (hw.ib_gbps if ranks > gpn else hw.nvlink_gbps) * 1e6
            lat = (hw.ib_latency_us if ranks > gpn else hw.nvlink_latency_us) / 1e3
            per_expert = 2 * math.ceil(math.log2(ranks)) * (2 * d * h * b / bw + lat)
            parts["replication"] = len(replicated) * per_expert

        parts["fixed"] = hw.step_fixed_ms + (hw.ep_fixed_ms if setup.group else 0.0)
        if setup.impl == "ep_baseline":
            parts["fixed"] += hw.baseline_fixed_ms
        total = sum(parts.values())
        return Prediction(
            total, parts, ib_messages, ib_bytes, nv_bytes, list(replicated), slots, T * k, exchange_ms=exchange
        )


MAX_REPLICATED = 16  # the replication search stops here (the layer's policy tries 16 candidates)
CANDIDATE_RANKS = 4  # each round tries the hottest unreplicated expert of this many of the busiest ranks


def predict(layer: Layer, setup: Setup, routing: Routing | None = None, hardware: Hardware | None = None) -> Prediction:
    """The predicted forward + backward step of ``layer`` run as ``setup`` under ``routing`` on ``hardware``
    (default: the calibrated H200)."""
    _check(isinstance(layer, Layer), f"layer must be a fastmoe.sim.Layer, got {type(layer).__name__}")
    _check(isinstance(setup, Setup), f"setup must be a fastmoe.sim.Setup, got {type(setup).__name__}")
    routing = Routing() if routing is None else routing
    _check(isinstance(routing, Routing), f"routing must be a fastmoe.sim.Routing, got {type(routing).__name__}")
    hw = Hardware.calibrated() if hardware is None else hardware
    _check(isinstance(hw, Hardware), f"hardware must be a fastmoe.sim.Hardware, got {type(hw).__name__}")
    ranks, local = layer.expert_parallel(setup.world)
    _check(
        layer.top_k <= ranks * local,
        f"top_k must be <= the {ranks * local} experts of world={setup.world}, got {layer.top_k}",
    )
    _check(setup.chunks <= layer.tokens, f"chunks must be <= tokens={layer.tokens}, got {setup.chunks}")
    if ranks > setup.gpus_per_node:
        _check(
            ranks % setup.gpus_per_node == 0,
            f"the expert-parallel group of {ranks} ranks must be a multiple of gpus_per_node={setup.gpus_per_node}",
        )
    model = _Model(layer, setup, routing, hw)
    best = model.step([])
    if not setup.replication or ranks == 1:
        return best
    # Greedy, by the cost model: each round tries the hottest unreplicated expert of each of the busiest ranks and
    # keeps the one that shortens the step most; it stops when none does.
    chosen = []
    while len(chosen) < min(MAX_REPLICATED, model.experts):
        share = model.slot_share(chosen)
        busiest = sorted(range(ranks), key=lambda j: -share[j])[:CANDIDATE_RANKS]
        taken = set(chosen)
        candidates = [next((e for e in model.held[j] if e not in taken), None) for j in busiest]
        candidates = [e for e in dict.fromkeys(candidates) if e is not None]
        winner = min((model.step([*chosen, e]) for e in candidates), key=lambda p: p.total_ms, default=None)
        if winner is None or winner.total_ms >= best.total_ms:
            break
        chosen, best = winner.replicated, winner
    return best


def efficiency(layer: Layer, setup: Setup, routing: Routing | None = None, hardware: Hardware | None = None) -> float:
    """Weak-scaling efficiency ``t(1) / t(W)``: ``t(1)`` is one GPU running the layer's per-rank share (the
    expert-parallel path on a one-rank group, as benchmarks/bench_ep.py measures it, one chunk), ``t(W)`` the
    step of ``setup``."""
    one = predict(layer, replace(setup, world=1, chunks=1, exchange="flat", replication=False), routing, hardware)
    return one.total_ms / predict(layer, setup, routing, hardware).total_ms


# ----------------------------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class Measured:
    """One measured step (ms) of docs/runs/, with what the model needs to predict it."""

    source: str
    config: str
    layer: Layer
    setup: Setup
    ms: float

    @property
    def label(self) -> str:
        path = "no group" if not self.setup.group else f"per {self.setup.copies}"
        return f"{self.config} W={self.setup.world} {self.setup.impl} ({path})"


def measured_points(root: Path | str, path: Path | str | None = None) -> list[Measured]:
    """Every measured step of the files that the calibration file lists, read from ``root`` (the repository)."""
    points = []
    for entry in calibration(path)["measurements"]:
        file = Path(root) / entry["file"]
        for line in file.read_text().splitlines():
            if not line.startswith("{"):
                continue  # a log's text lines around its JSON lines
            r = json.loads(line)
            if entry["kind"] == "bench_ep":
                layer = Layer(r["T"], r["d"], r["h"], r["k"], experts_per_rank=r["E_local"])
                setup = Setup(
                    world=r["W"],
                    chunks=r.get("ep_chunks", 1),
                    copies="slot" if r["impl"] == "ep_baseline" else entry["copies"],
                    impl=r["impl"],
                )
                points.append(Measured(entry["file"], r["config"], layer, setup, r["ms"]))
            else:  # bench_moe_layer.py: one GPU, no process group
                layer = Layer(r["T"], r["d"], r["h"], r["k"], experts_per_rank=r["E"])
                config = f"{r['config']} E={r['E']}"
                points.append(Measured(entry["file"], config, layer, Setup(group=False), r["methods"]["fastmoe"]["ms"]))
    return points
