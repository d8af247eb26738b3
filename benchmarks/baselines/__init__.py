"""In-tree baselines for the benchmarks, written in plain PyTorch (no fastmoe op is used)."""
