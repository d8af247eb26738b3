"""What a run leaves behind: the summary table (printed and written as Markdown and JSON) and the plot of
validation loss against training wall-clock time."""

import json
import textwrap
from pathlib import Path

from fastmoe.train.loop import RunResult


def loss_at_time(history: list, when: float) -> float:
    """The validation loss at training time ``when``, linearly interpolated between evaluations (the last value
    past the end, the first before the start)."""
    if not history:
        return float("nan")
    if when <= history[0]["time"]:
        return history[0]["val_loss"]
    for before, after in zip(history, history[1:], strict=False):
        if before["time"] <= when <= after["time"]:
            span = after["time"] - before["time"]
            weight = 0.0 if span == 0 else (when - before["time"]) / span
            return before["val_loss"] + weight * (after["val_loss"] - before["val_loss"])
    return history[-1]["val_loss"]


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f} M"


def summary_rows(results: list[RunResult]) -> list[list[str]]:
    rows = [["model", "val loss", "tokens/s", "params total", "params active", "steps", "train time"]]
    for r in results:
        rows.append(
            [
                r.name,
                f"{r.final_val_loss:.4f}",
                f"{r.tokens_per_s:,.0f}",
                _millions(r.params_total),
                _millions(r.params_active),
                str(r.steps),
                f"{r.train_time:.1f} s",
            ]
        )
    return rows


def equal_time_losses(runs: dict) -> tuple[float, dict]:
    """For ``{name: (train_time, history)}``: the shortest training time, and each model's validation loss at it."""
    when = min(train_time for train_time, _ in runs.values())
    return when, {name: loss_at_time(history, when) for name, (_, history) in runs.items()}


def equal_time_line(results: list[RunResult]) -> str | None:
    """A sentence comparing the models at the shorter of their training times (None with one model)."""
    if len(results) < 2:
        return None
    when, losses = equal_time_losses({r.name: (r.train_time, r.history) for r in results})
    best = min(losses, key=losses.get)
    parts = ", ".join(f"{name} {loss:.4f}" for name, loss in losses.items())
    return f"validation loss at equal training time ({when:.1f} s): {parts}; lower: {best}"


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_summary(results: list[RunResult], out_dir: Path, header: str) -> str:
    """Writes ``summary.md`` and ``summary.json`` under ``out_dir`` and returns the text table to print."""
    rows = summary_rows(results)
    comparison = equal_time_line(results)
    text = text_table(rows) + (f"\n{comparison}" if comparison else "")
    md = f"{header}\n\n{markdown_table(rows)}\n" + (f"\n{comparison}\n" if comparison else "")
    (out_dir / "summary.md").write_text(md)
    data = {
        "header": header,
        "models": [
            {
                "name": r.name,
                "final_val_loss": r.final_val_loss,
                "final_train_loss": r.final_train_loss,
                "tokens_per_s": r.tokens_per_s,
                "params_total": r.params_total,
                "params_active": r.params_active,
                "steps": r.steps,
                "train_time_s": r.train_time,
                "history": r.history,
                "balance": r.balance,
                "replicas_equal": r.replicas_equal,
            }
            for r in results
        ],
        "equal_time": comparison,
    }
    (out_dir / "summary.json").write_text(json.dumps(data, indent=1))
    return text


def plot(results: list[RunResult], path: Path, title: str) -> Path | None:
    """Validation loss against training wall-clock time, one line per model, as a PNG (None, with a message,
    when matplotlib is not installed)."""
    try:
        import matplotlib
    except ImportError:
        # The extra "train" installs only matplotlib, and the distribution is not on PyPI: name the package.
        print(
            "fastmoe-train: no plot, matplotlib is not installed (pip install matplotlib, or in fastmoe's source "
            'tree pip install --no-build-isolation ".[train]")'
        )
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for r in results:
        times = [p["time"] for p in r.history]
        losses = [p["val_loss"] for p in r.history]
        ax.plot(
            times,
            losses,
            marker="o",
            markersize=3,
            label=f"{r.name}: {r.params_total / 1e6:.2f} M parameters, {r.params_active / 1e6:.2f} M active",
        )
    ax.set_xlabel("training wall-clock time (s)")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.set_title(textwrap.fill(title, 80), fontsize=9)  # a long model description takes two lines
    losses = [p["val_loss"] for r in results for p in r.history[1:]] or [1.0]
    ax.set_ylim(min(losses) * 0.97, max(losses) * 1.05)  # the first point (untrained, ln 256) squeezes the rest
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
