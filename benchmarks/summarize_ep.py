"""Weak-scaling tables from the JSON lines of benchmarks/bench_ep.py runs at several W.

    python benchmarks/summarize_ep.py bench_ep.jsonl [more.jsonl ...] > bench_ep_summary.md

One markdown table per configuration: W, fastmoe and baseline time (ms, max over ranks of the per-rank
medians), fastmoe's speed-up over the baseline, expert TFLOP/s per GPU of each, and the weak-scaling efficiency
t(W=1) / t(W) of each method (1.00 = no cost for going across GPUs). When a (config, W, method) appears more
than once, the last line read wins.
"""

import argparse
import json
import sys
from pathlib import Path

IMPLS = ("fastmoe", "ep_baseline")


def load(paths) -> dict:
    """``{"config dtype on device[, variant]": {W: {impl: record}}}`` from the JSON lines in ``paths`` (later
    lines replace earlier ones; each variant of fastmoe's layer (chunks, exchange, skew, replication) gets tables of
    its own)."""
    table: dict = {}
    for path in paths:
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as error:
                raise SystemExit(f"summarize_ep: {path}:{number} is not a JSON line: {error}") from None
            # the variant the run asked for (older lines name only their chunks)
            chunks = r.get("ep_chunks", 1)
            variant = r["variant"] if "variant" in r else (f"ep_chunks={chunks}" if chunks != 1 else "")
            key = f"{r['config']} {r['dtype']} on {r['device']}" + (f", {variant}" if variant else "")
            table.setdefault(key, {}).setdefault(int(r["W"]), {})[r["impl"]] = r
    return table


def _fmt(value, spec):
    return "–" if value is None else format(value, spec)


def render(table: dict) -> str:
    out = []
    for config, by_w in table.items():  # config: 'name dtype on device'
        any_record = next(iter(next(iter(by_w.values())).values()))
        shape = ", ".join(f"{key}={any_record[key]}" for key in ("T", "d", "h", "E_local", "k"))
        out.append(f"### {config} (per GPU: {shape}; torch {any_record['torch']}, {any_record['date'][:10]})\n")
        out.append(
            "| W | fastmoe ms | baseline ms | speed-up | fastmoe TFLOP/s/GPU | baseline TFLOP/s/GPU "
            "| fastmoe eff. | baseline eff. | fastmoe peak GiB | baseline peak GiB |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        skewed = any(rec.get("skew") for row in by_w.values() for rec in row.values())
        t1 = {impl: by_w.get(1, {}).get(impl, {}).get("ms") for impl in IMPLS}
        for w in sorted(by_w):
            row = by_w[w]
            ms = {impl: row.get(impl, {}).get("ms") for impl in IMPLS}
            tf = {impl: row.get(impl, {}).get("tflops_per_gpu") for impl in IMPLS}
            both = None not in (ms["fastmoe"], ms["ep_baseline"])
            speedup = f"{ms['ep_baseline'] / ms['fastmoe']:.2f}×" if both else "–"
            eff = {impl: t1[impl] / ms[impl] if None not in (t1[impl], ms[impl]) else None for impl in IMPLS}
            peak = {impl: row.get(impl, {}).get("peak_gib") for impl in IMPLS}
            out.append(
                f"| {w} | {_fmt(ms['fastmoe'], '.3f')} | {_fmt(ms['ep_baseline'], '.3f')} | {speedup} "
                f"| {_fmt(tf['fastmoe'], '')} | {_fmt(tf['ep_baseline'], '')} | {_fmt(eff['fastmoe'], '.2f')} "
                f"| {_fmt(eff['ep_baseline'], '.2f')} | {_fmt(peak['fastmoe'], '')} | {_fmt(peak['ep_baseline'], '')} |"
            )
        if skewed:  # what the skewed router did, and what fastmoe copied
            for w in sorted(by_w):
                fm = by_w[w].get("fastmoe", {})
                out.append(
                    f"- W={w}: expert 0 took {_fmt(fm.get('hot_share'), '.2f')} of the slots; fastmoe copied "
                    f"{_fmt(fm.get('copies'), '')} experts per step (replicate={fm.get('replicate', 0)})"
                )
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.files:
        if not path.is_file():
            parser.error(f"no such file: {path}")
    print(render(load(args.files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
