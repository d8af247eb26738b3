"""tools/train_seeds.py: the tokens/s share and the margin at equal training time of each run, and their spread,
from the summary.json files fastmoe-train writes (here made up, with known answers), and runs that are not
comparisons refused by name."""

import json
import sys
from pathlib import Path

import pytest

from conftest import assert_cli_refuses

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import train_seeds  # noqa: E402


def model(name, tokens_per_s, train_time, history):
    points = [{"step": i, "time": t, "tokens": 0, "val_loss": loss} for i, (t, loss) in enumerate(history)]
    return {"name": name, "tokens_per_s": tokens_per_s, "train_time_s": train_time, "history": points}


def write_run(path: Path, moe, dense) -> Path:
    path.mkdir()
    (path / "summary.json").write_text(json.dumps({"header": "fastmoe-train", "models": [moe, dense]}))
    return path


def test_each_run_and_the_spread(tmp_path, capsys):
    # Run a: the dense model stops first (100 s); MoE's loss at 100 s is halfway between 3.0 (80 s) and 2.0 (120 s).
    a = write_run(
        tmp_path / "a",
        model("moe", 900.0, 120.0, [(0, 5.0), (80, 3.0), (120, 2.0)]),
        model("dense", 1000.0, 100.0, [(0, 5.0), (100, 2.75)]),
    )
    # Run b: MoE stops first (90 s); the dense loss at 90 s is 3.0 + 0.5 * (2.0 - 3.0).
    b = write_run(
        tmp_path / "b",
        model("moe", 950.0, 90.0, [(0, 5.0), (90, 2.4)]),
        model("dense", 1000.0, 95.0, [(0, 5.0), (85, 3.0), (95, 2.0)]),
    )
    out = tmp_path / "seeds.json"
    assert train_seeds.main([str(a), str(b), "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    ra, rb = record["runs"]
    assert ra["equal_time_s"] == 100.0 and ra["moe_val_loss"] == pytest.approx(2.5)
    assert ra["margin"] == pytest.approx(0.25) and ra["tokens_per_s_share"] == pytest.approx(0.9)
    assert rb["equal_time_s"] == 90.0 and rb["dense_val_loss"] == pytest.approx(2.5)
    assert rb["margin"] == pytest.approx(0.1) and rb["tokens_per_s_share"] == pytest.approx(0.95)
    assert record["margin"] == pytest.approx({"mean": 0.175, "min": 0.1, "max": 0.25})
    assert record["tokens_per_s_share"] == pytest.approx({"mean": 0.925, "min": 0.9, "max": 0.95})
    assert "over 2 runs" in capsys.readouterr().out


def test_a_run_without_both_models_is_refused(tmp_path):
    path = tmp_path / "moe-only"
    path.mkdir()
    (path / "summary.json").write_text(json.dumps({"models": [model("moe", 1.0, 1.0, [(0, 1.0)])]}))
    with pytest.raises(ValueError, match="no dense model"):
        train_seeds.main([str(path)])


def test_a_directory_without_a_summary_is_named(tmp_path, capsys):
    assert_cli_refuses(train_seeds.main, [str(tmp_path / "nothing")], "runs", capsys)
