"""fastmoe.moefy with expert parallelism: 2 ranks on gloo (tests/distributed/dist_harness.py). Each rank keeps its
slice of the copied (and perturbed) experts, and the model equals the one-process model upcycled with all
experts; with noise=0 it equals the dense model."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

from dist_harness import run_workers  # noqa: E402
from moefy_models import ep_body  # noqa: E402

TOL = 1e-10  # docs/numerics.md


def test_each_rank_holds_its_slice_of_the_copies():
    results = run_workers(2, ep_body)
    for rank, by_noise in enumerate(results):
        for noise, result in by_noise.items():
            assert result["same_weights"], (rank, noise)
            assert result["vs_one_process"] <= TOL, (rank, noise, result)
            assert result["embed_grad_finite"], (rank, noise)
            if noise == 0.0:
                assert result["vs_dense"] <= TOL, (rank, result)  # the copies keep the dense outputs
            else:
                assert result["vs_dense"] > 1e-6, (rank, result)  # the noise changes them
