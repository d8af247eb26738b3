"""Predicts the forward + backward step of an expert-parallel MoE layer with fastmoe's cost model (fastmoe.sim).

    python tools/simulate_ep.py predict --config mixtral --world 64 --exchange hierarchical --chunks 4
    python tools/simulate_ep.py validate        # the model against every measured step in docs/runs/
    python tools/simulate_ep.py scaling [--zipf 1.0] [--plot docs/images/scaling.png]
    python tools/simulate_ep.py sensitivity     # the best design at 1,024 GPUs when one machine number changes
    python tools/simulate_ep.py calibration     # the constants and their sources
    python tools/simulate_ep.py fit [--write]   # fits the calibrated constants to docs/runs/ again

Every subcommand takes the machine's numbers as flags (``--ib-gbps 50``, ``--gemm-tflops 700``, ...), which
replace the calibrated ones of python/fastmoe/sim_calibration.json. The model is docs/scaling.md's. This tool
loads python/fastmoe/sim.py by its path: it needs neither torch nor fastmoe's compiled extension.
"""

import argparse
import importlib.util
import json
import math
import sys
from dataclasses import fields, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fastmoe_sim", ROOT / "python" / "fastmoe" / "sim.py")
sim = importlib.util.module_from_spec(_spec)
sys.modules["fastmoe_sim"] = sim  # dataclasses look their module up by name
_spec.loader.exec_module(sim)

# benchmarks/bench_ep.py's configurations (per GPU), and a DeepSeek-V3-like layer: its d, h, 256 experts and
# top-8, GELU experts like the others, 8192 tokens per GPU
CONFIGS = {
    "mixtral": dict(tokens=8192, d_model=4096, d_hidden=14336, top_k=2, experts_per_rank=4),
    "fine": dict(tokens=16384, d_model=2048, d_hidden=1408, top_k=6, experts_per_rank=32),
    "paper": dict(tokens=4096, d_model=1024, d_hidden=4096, top_k=2, experts_per_rank=32),
    "dsv3": dict(tokens=8192, d_model=7168, d_hidden=2048, top_k=8, experts_total=256),
}
SCALING_WORLDS = (8, 64, 256, 1024)
CHUNK_CHOICES = (2, 4, 8)
ERROR_GOAL = 0.10  # the calibration's goal: every measured point within 10%

# what `fit` fits, in two stages: fastmoe's points, then the baseline's with fastmoe's constants fixed
FIT_FASTMOE = (
    "gemm_tflops",
    "gemm_group_us",
    "hbm_gbps",
    "step_fixed_ms",
    "ep_fixed_ms",
    "nvlink_gbps",
    "exchange_call_us",
)
FIT_BASELINE = ("baseline_slot_passes", "baseline_fixed_ms")


# ----------------------------------------------------------------------------------------------- arguments


def _hardware_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("machine numbers (default: python/fastmoe/sim_calibration.json)")
    for f in fields(sim.Hardware):
        group.add_argument("--" + f.name.replace("_", "-"), type=float, default=None, metavar="X")


def _hardware(args) -> "sim.Hardware":
    overrides = {f.name: getattr(args, f.name) for f in fields(sim.Hardware) if getattr(args, f.name) is not None}
    return sim.Hardware.calibrated(**overrides)


def _routing_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--zipf", type=float, default=None, metavar="S", help="Zipf routing with exponent S (default: uniform)"
    )
    parser.add_argument("--placement", choices=sim.PLACEMENTS, default="spread", help="where the hot experts live")


def _routing(args) -> "sim.Routing":
    if args.zipf is None:
        return sim.Routing()
    return sim.Routing("zipf", args.zipf, args.placement)


def _layer(args) -> "sim.Layer":
    values = dict(CONFIGS[args.config]) if args.config else {}
    for name in ("tokens", "d_model", "d_hidden", "top_k", "experts_per_rank", "experts_total"):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
            if name == "experts_per_rank":
                values.pop("experts_total", None)
            if name == "experts_total":
                values.pop("experts_per_rank", None)
    missing = [n for n in ("tokens", "d_model", "d_hidden", "top_k") if n not in values]
    if missing:
        raise ValueError(f"give --config or every one of {['--' + n.replace('_', '-') for n in missing]}")
    return sim.Layer(**values)


# ----------------------------------------------------------------------------------------------- predict


def cmd_predict(args) -> None:
    layer, hw, routing = _layer(args), _hardware(args), _routing(args)
    setup = sim.Setup(
        world=args.world,
        gpus_per_node=args.gpus_per_node,
        chunks=args.chunks,
        exchange=args.exchange,
        replication=args.replication,
    )
    p = sim.predict(layer, setup, routing, hw)
    eff = sim.efficiency(layer, setup, routing, hw)
    if args.json:
        out = {
            "total_ms": p.total_ms,
            "efficiency": eff,
            "parts_ms": p.parts,
            "exchange_ms": p.exchange_ms,
            "ib_messages": p.ib_messages,
            "ib_bytes": p.ib_bytes,
            "nvlink_bytes": p.nvlink_bytes,
            "replicated": p.replicated,
            "imbalance": p.imbalance,
        }
        print(json.dumps(out, indent=2))
        return
    print(f"step {p.total_ms:.2f} ms, weak-scaling efficiency {eff:.2f} (t(1) / t({args.world}))")
    for name, ms in p.parts.items():
        print(f"  {name:24} {ms:9.3f} ms")
    print(f"  exchanges before overlap {p.exchange_ms:7.3f} ms")
    print(f"busiest rank: {p.max_slots:.0f} slots ({p.imbalance:.2f}x the mean)")
    print(
        f"sent per step by the busiest sender: {p.ib_bytes / 1e6:.1f} MB over InfiniBand in {p.ib_messages} messages,"
    )
    print(f"  {p.nvlink_bytes / 1e6:.1f} MB over NVLink; replicated experts: {len(p.replicated)}")


# ----------------------------------------------------------------------------------------------- validate


def validation_rows(hw=None) -> list:
    """(point, predicted ms, relative error) for every measured point."""
    hw = hw or sim.Hardware.calibrated()
    rows = []
    for point in sim.measured_points(ROOT):
        predicted = sim.predict(point.layer, point.setup, hardware=hw).total_ms
        rows.append((point, predicted, predicted / point.ms - 1))
    return rows


def cmd_validate(args) -> None:
    rows = validation_rows(_hardware(args))
    print("| measurement | config | W | implementation | token path | measured ms | predicted ms | error |")
    print("|---|---|---|---|---|---|---|---|")
    for point, predicted, error in rows:
        path = "no process group" if not point.setup.group else f"a row per {point.setup.copies}"
        source = Path(point.source).name
        print(
            f"| {source} | {point.config} | {point.setup.world} | {point.setup.impl} | {path} | {point.ms:.3f} | "
            f"{predicted:.3f} | {100 * error:+.1f}% |"
        )
    print()
    for impl in sim.IMPLS:
        errors = [abs(e) for p, _, e in rows if p.setup.impl == impl]
        outside = [f"{p.config} W={p.setup.world}" for p, _, e in rows if p.setup.impl == impl and abs(e) > ERROR_GOAL]
        rms = math.sqrt(sum(e * e for e in errors) / len(errors))
        print(
            f"{impl}: {len(errors)} points, RMS error {100 * rms:.1f}%, largest {100 * max(errors):.1f}%, "
            f"beyond {100 * ERROR_GOAL:.0f}%: {', '.join(outside) or 'none'}"
        )


# ----------------------------------------------------------------------------------------------- scaling


VARIANTS = ("flat", "hierarchical", "+ overlap", "+ replication")


def variant_setups(world: int, gpus_per_node: int, chunks: int = 1) -> dict:
    """The four designs, each adding to the one before: {name: [candidate setups]}; a variant is the fastest of
    its candidates. Overlap tries each of CHUNK_CHOICES; replication keeps the chunks that overlap chose."""
    base = dict(world=world, gpus_per_node=gpus_per_node, exchange="hierarchical")
    return {
        "flat": [sim.Setup(**{**base, "exchange": "flat"})],
        "hierarchical": [sim.Setup(**base)],
        "+ overlap": [sim.Setup(**base, chunks=n) for n in CHUNK_CHOICES],
        "+ replication": [sim.Setup(**base, chunks=chunks, replication=True)],
    }


def scaling_results(configs, worlds, routing, hw, gpus_per_node: int) -> dict:
    """{config: {world: [(variant, setup, prediction, efficiency)]}}, efficiency = t(1) / t(W)."""
    results = {}
    for name in configs:
        layer = sim.Layer(**CONFIGS[name])
        one = sim.predict(layer, sim.Setup(world=1), routing, hw).total_ms
        results[name] = {}
        for world in worlds:
            row, chunks = [], 1
            for variant in VARIANTS:
                candidates = variant_setups(world, gpus_per_node, chunks)[variant]
                setup, p = min(
                    ((s, sim.predict(layer, s, routing, hw)) for s in candidates), key=lambda r: r[1].total_ms
                )
                chunks = setup.chunks
                row.append((variant, setup, p, one / p.total_ms))
            results[name][world] = row
    return results


def cmd_scaling(args) -> None:
    routing, hw = _routing(args), _hardware(args)
    results = scaling_results(args.configs, args.worlds, routing, hw, args.gpus_per_node)
    print("| config | GPUs | " + " | ".join(VARIANTS) + " |")
    print("|---|---|" + "---|" * len(VARIANTS))
    for config, by_world in results.items():
        for world, row in by_world.items():
            cells = []
            for variant, setup, p, eff in row:
                note = ""
                if variant == "+ overlap":
                    note = f" ({setup.chunks} chunks)"
                if variant == "+ replication":
                    note = f" ({setup.chunks} chunks, {len(p.replicated)} replicated)"
                cells.append(f"{eff:.2f}{note}")
            print(f"| {config} | {world} | " + " | ".join(cells) + " |")
    if args.breakdown:
        world = max(args.worlds)
        parts = list(next(iter(next(iter(results.values())).values()))[0][2].parts)
        print()
        print(f"Step at {world} GPUs, ms: the parts add up to the step; 'exchanges' is their time before overlap.")
        print()
        print("| config | variant | step | " + " | ".join(parts) + " | exchanges | IB MB / GPU | IB messages |")
        print("|---|---|---|" + "---|" * (len(parts) + 3))
        for config, by_world in results.items():
            for variant, _, p, _ in by_world[world]:
                values = " | ".join(f"{p.parts[k]:.2f}" for k in parts)
                print(
                    f"| {config} | {variant} | {p.total_ms:.2f} | {values} | {p.exchange_ms:.2f} | "
                    f"{p.ib_bytes / 1e6:.0f} | {p.ib_messages} |"
                )
    if args.plot:
        plot(results, args, routing)


def plot(results: dict, args, routing) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(results)
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 3.6), sharey=True)
    axes = [axes] if len(configs) == 1 else list(axes)
    for ax, config in zip(axes, configs, strict=True):
        worlds = list(results[config])
        for i, variant in enumerate(VARIANTS):
            effs = [results[config][w][i][3] for w in worlds]
            dashed = variant == "+ replication"  # on top of + overlap when nothing is worth replicating
            ax.plot(worlds, effs, marker="o", label=variant, linestyle="--" if dashed else "-")
        ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.set_title(config)
        ax.set_xlabel("GPUs (8 per node)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("weak-scaling efficiency t(1) / t(W)")
    axes[0].legend(fontsize=8)
    what = "uniform routing" if routing.distribution == "uniform" else f"Zipf s = {routing.exponent} routing"
    fig.suptitle(f"fastmoe.sim predictions (not measurements), {what}", fontsize=10)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110, metadata={"Software": None})
    print(f"\nwrote {args.plot}", file=sys.stderr)


# what-ifs of `sensitivity`: (label, {constant: factor}), each from the calibrated machine
WHAT_IFS = (
    ("as calibrated", {}),
    ("InfiniBand 2x faster", {"ib_gbps": 2.0}),
    ("InfiniBand 4x faster", {"ib_gbps": 4.0}),
    ("InfiniBand latency 0.5 us", {"ib_latency_us": 0.25}),
    ("InfiniBand latency 8 us", {"ib_latency_us": 4.0}),
    ("InfiniBand 4x faster, latency 0.5 us", {"ib_gbps": 4.0, "ib_latency_us": 0.25}),
    ("no slowdown beside an exchange", {"overlap_slowdown": 0.0}),
    ("exchange call 4x cheaper", {"exchange_call_us": 0.25}),
    ("free network (InfiniBand and NVLink 1000x, no latency)", {
        "ib_gbps": 1000.0, "nvlink_gbps": 1000.0, "ib_latency_us": 0.0, "nvlink_latency_us": 0.0,
        "exchange_call_us": 0.0,
    }),
)  # fmt: skip


def cmd_sensitivity(args) -> None:
    routing, calibrated = _routing(args), _hardware(args)
    print("| machine | " + " | ".join(args.configs) + " |")
    print("|---|" + "---|" * len(args.configs))
    for label, factors in WHAT_IFS:
        hw = replace(calibrated, **{k: getattr(calibrated, k) * f for k, f in factors.items()})
        results = scaling_results(args.configs, [args.world], routing, hw, args.gpus_per_node)
        cells = []
        for config in args.configs:
            variant, _, _, eff = max(results[config][args.world], key=lambda r: r[3])
            cells.append(f"{eff:.2f} ({variant})")
        print(f"| {label} | " + " | ".join(cells) + " |")


# ----------------------------------------------------------------------------------------------- calibration


def cmd_calibration(args) -> None:
    data = sim.calibration()
    print("| constant | value | unit | source |")
    print("|---|---|---|---|")
    for name, entry in data["constants"].items():
        print(f"| `{name}` | {entry['value']:g} | {entry['unit']} | {entry['source']} |")
    for name, entry in data["line_rates"].items():
        print(f"| `line_rates.{name}` | {entry['value']:g} | {entry['unit']} | {entry['source']} |")
    print()
    print("Measured steps the constants are fitted to:")
    print()
    for entry in data["measurements"]:
        print(f"- {entry['file']}: {entry['note']}")


def nelder_mead(f, x0: list, step: float, iterations: int = 3000, tol: float = 1e-12) -> tuple:
    """Minimises ``f`` from ``x0`` (a simplex of side ``step``); returns (x, f(x))."""
    n = len(x0)
    simplex = [list(x0)] + [[x + (step if i == j else 0.0) for j, x in enumerate(x0)] for i in range(n)]
    values = [f(p) for p in simplex]
    for _ in range(iterations):
        order = sorted(range(n + 1), key=values.__getitem__)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if values[-1] - values[0] < tol:
            break
        centre = [sum(p[i] for p in simplex[:-1]) / n for i in range(n)]
        worst = simplex[-1]

        def towards(t, centre=centre, worst=worst):
            return [c + t * (c - w) for c, w in zip(centre, worst, strict=True)]

        reflected = towards(1.0)
        fr = f(reflected)
        if fr < values[0]:
            expanded = towards(2.0)
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = towards(-0.5)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                best = simplex[0]
                simplex = [best] + [[b + 0.5 * (x - b) for b, x in zip(best, p, strict=True)] for p in simplex[1:]]
                values = [values[0]] + [f(p) for p in simplex[1:]]
    i = min(range(n + 1), key=values.__getitem__)
    return simplex[i], values[i]


def fit_objective(names, points, hw):
    """Sum of squared log errors over ``points`` as a function of the logs of the constants ``names``."""

    def objective(x):
        trial = replace(hw, **{n: math.exp(v) for n, v in zip(names, x, strict=True)})
        return sum(math.log(sim.predict(p.layer, p.setup, hardware=trial).total_ms / p.ms) ** 2 for p in points)

    return objective


def fit(hw) -> "sim.Hardware":
    """Both stages of the fit from ``hw``'s values; restarts until the simplex stops improving."""
    points = sim.measured_points(ROOT)
    for names, impl in ((FIT_FASTMOE, "fastmoe"), (FIT_BASELINE, "ep_baseline")):
        objective = fit_objective(names, [p for p in points if p.setup.impl == impl], hw)
        x, value = [math.log(getattr(hw, n)) for n in names], math.inf
        for step in (0.3, 0.1, 0.03, 0.01):
            x, value = nelder_mead(objective, x, step)
        hw = replace(hw, **{n: math.exp(v) for n, v in zip(names, x, strict=True)})
    line = {name: entry["value"] for name, entry in sim.calibration()["line_rates"].items()}
    return replace(hw, ib_gbps=line["ib_gbps"] * hw.nvlink_gbps / line["nvlink_gbps"])


def cmd_fit(args) -> None:
    hw = fit(_hardware(args))
    changed = (*FIT_FASTMOE, *FIT_BASELINE, "ib_gbps")
    for name in changed:
        print(f"{name:22} {getattr(hw, name):.4g}")
    if args.write:
        data = json.loads(sim.CALIBRATION_FILE.read_text())
        for name in changed:
            data["constants"][name]["value"] = float(f"{getattr(hw, name):.4g}")
        sim.CALIBRATION_FILE.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {sim.CALIBRATION_FILE}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="one layer's step: its parts, bytes and messages")
    p.add_argument("--config", choices=list(CONFIGS), default=None, help="start from this configuration")
    for name, help_text in (
        ("tokens", "tokens per GPU and step"),
        ("d-model", "model width d"),
        ("d-hidden", "expert hidden width h"),
        ("top-k", "experts per token"),
        ("experts-per-rank", "experts on each GPU (their number grows with the GPUs)"),
        ("experts-total", "a fixed number of experts"),
    ):
        p.add_argument("--" + name, type=int, default=None, help=help_text)
    p.add_argument("--world", type=int, default=1, help="GPUs (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs of one NVLink domain (default 8)")
    p.add_argument("--chunks", type=int, default=1, help="fastmoe's ep_chunks (default 1)")
    p.add_argument("--exchange", choices=sim.EXCHANGES, default="flat")
    p.add_argument("--replication", action="store_true", help="replicate hot experts where the model says it pays")
    p.add_argument("--json", action="store_true", help="print JSON")
    _routing_flags(p)
    _hardware_flags(p)
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("validate", help="the model's error against every measured point of docs/runs/")
    _hardware_flags(p)
    p.set_defaults(run=cmd_validate)

    p = sub.add_parser("scaling", help="predicted weak-scaling efficiency of the four designs")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["mixtral", "fine", "dsv3"])
    p.add_argument("--worlds", nargs="+", type=int, default=list(SCALING_WORLDS), help="GPU counts")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--breakdown", action="store_true", help="also the parts of the step at the largest GPU count")
    p.add_argument("--plot", type=Path, default=None, help="write the efficiency plot (PNG) here")
    _routing_flags(p)
    _hardware_flags(p)
    p.set_defaults(run=cmd_scaling)

    p = sub.add_parser("sensitivity", help="the best design's efficiency when one machine number changes")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["mixtral", "fine", "dsv3"])
    p.add_argument("--world", type=int, default=1024, help="GPUs (default 1024)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    _routing_flags(p)
    _hardware_flags(p)
    p.set_defaults(run=cmd_sensitivity)

    p = sub.add_parser("calibration", help="the calibrated constants and their sources")
    p.set_defaults(run=cmd_calibration)

    p = sub.add_parser("fit", help="fit the calibrated constants to the measured points again")
    p.add_argument("--write", action="store_true", help="store the fitted values in sim_calibration.json")
    _hardware_flags(p)
    p.set_defaults(run=cmd_fit)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as e:
        parser.exit(2, f"simulate_ep: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
