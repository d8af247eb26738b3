"""The MoE-against-dense training comparison over several seeds, from the runs' summary.json files.

Each argument is the ``--out`` directory of one ``fastmoe-train`` run that trained both models (a seed each, e.g.
``SEED=1 tools/gpu_train.sh``). Per run, and then as mean, min and max over the runs: the MoE model's tokens/s as
a share of the dense model's, and the margin at equal training time, the dense model's validation loss minus the
MoE model's at the shorter of the two training times (interpolated between evaluations as the run's own summary
does; positive: the MoE model is ahead).

    python3 tools/train_seeds.py OUT/train-seed0 OUT/train-seed1 OUT/train-seed2 [--json seeds.json]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from fastmoe.train.report import equal_time_losses  # noqa: E402


def compare(summary: dict, where: str) -> dict:
    """tokens/s share and equal-time margin of the moe and dense models of one summary.json."""
    models = {m["name"]: m for m in summary.get("models", [])}
    missing = [name for name in ("moe", "dense") if name not in models]
    if missing:
        raise ValueError(f"{where}: no {' and no '.join(missing)} model in its summary.json (train both models)")
    moe, dense = models["moe"], models["dense"]
    when, losses = equal_time_losses(
        {name: (models[name]["train_time_s"], models[name]["history"]) for name in ("moe", "dense")}
    )
    moe_loss, dense_loss = losses["moe"], losses["dense"]
    return {
        "run": where,
        "header": summary.get("header", ""),
        "tokens_per_s_share": moe["tokens_per_s"] / dense["tokens_per_s"],
        "equal_time_s": when,
        "moe_val_loss": moe_loss,
        "dense_val_loss": dense_loss,
        "margin": dense_loss - moe_loss,
    }


def spread(values: list) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="--out directories of fastmoe-train runs")
    parser.add_argument("--json", type=Path, help="also write the per-run rows and the spreads here")
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        path = run / "summary.json"
        if not path.is_file():
            parser.error(f"runs: {run} has no summary.json (is it a fastmoe-train --out directory?)")
        rows.append(compare(json.loads(path.read_text()), str(run)))
    print(f"{'run':40} {'tokens/s moe/dense':>18} {'equal time':>10} {'moe loss':>9} {'dense loss':>10} {'margin':>8}")
    for r in rows:
        print(
            f"{r['run'][-40:]:40} {r['tokens_per_s_share']:18.3f} {r['equal_time_s']:9.1f}s "
            f"{r['moe_val_loss']:9.4f} {r['dense_val_loss']:10.4f} {r['margin']:8.4f}"
        )
    share = spread([r["tokens_per_s_share"] for r in rows])
    margin = spread([r["margin"] for r in rows])
    print(
        f"over {len(rows)} runs: tokens/s moe/dense mean {share['mean']:.3f} (min {share['min']:.3f}, max "
        f"{share['max']:.3f}); margin mean {margin['mean']:.4f} (min {margin['min']:.4f}, max {margin['max']:.4f})"
    )
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": rows, "tokens_per_s_share": share, "margin": margin}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
