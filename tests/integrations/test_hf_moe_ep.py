"""fastmoe.use_fastmoe(model, moe_group=...) on Hugging Face MoE models (Mixtral, Qwen3-MoE, and Qwen2-MoE with its
shared expert; tiny random configurations, fp64): 2 ranks over gloo (tests/distributed/dist_harness.py), each
holding half of every layer's experts, against the same model in one process. The cases run in
tests/integrations/hf_moe_ep_cases.py; one job of 2 processes runs all models, and the tests below check its
results."""

import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "transformers", reason="Hugging Face transformers is not installed (it is pinned in requirements-dev.txt)"
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

from dist_harness import run_workers  # noqa: E402
from hf_moe_ep_cases import ARCHS, all_body  # noqa: E402

TOL = 1e-10  # docs/numerics.md: fp64 against the one-process model
WORLD = 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Per rank, per model, what hf_moe_ep_cases measured (one job for every test here: starting the processes
    and importing transformers costs more than the cases)."""
    return run_workers(WORLD, all_body, str(tmp_path_factory.mktemp("hf_moe_ep")), timeout=300.0)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_each_rank_holds_its_block_of_the_one_process_experts(results, arch):
    for rank, by_arch in enumerate(results):
        for key in ("init", "again"):  # after use_fastmoe, and after calling it again
            init = by_arch[arch][key]
            assert init["shapes"] and init["num_blocks"] == 2 * 2, (rank, key, init)  # 2 layers x 2 tensors
            assert init["replicated"] == 0.0 and init["experts"] == 0.0, (rank, key, init)  # slices: bit for bit
        assert by_arch[arch]["implementations"] == ["fastmoe"], (rank, by_arch[arch]["implementations"])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_outputs_and_gradients_match_one_process(results, arch):
    for rank, by_arch in enumerate(results):
        for what, diff in by_arch[arch]["outputs"].items():
            assert diff <= TOL, (rank, what, diff)
        for what, diff in by_arch[arch]["grads"].items():
            assert diff <= TOL, (rank, what, diff)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_training_with_dgdp_matches_one_process_on_the_union_batch(results, arch):
    for rank, by_arch in enumerate(results):
        trained = by_arch[arch]["trained"]
        assert trained["shapes"], (rank, trained)
        assert trained["replicated"] <= TOL and trained["experts"] <= TOL, (rank, trained)
        assert trained["moved"] > 1e-6, (rank, trained)  # every parameter of the one-process model was trained


@pytest.mark.parametrize("arch", list(ARCHS))
def test_restore_hf_gathers_the_experts_and_save_pretrained_loads(results, arch):
    for rank, by_arch in enumerate(results):
        restored = by_arch[arch]["restored"]
        assert restored["keys_equal"] and restored["implementations"] == ["eager"], (rank, restored)
        assert restored["state"] <= TOL and restored["logits"] <= TOL, (rank, restored)
        assert by_arch[arch]["save_pretrained_logits"] <= TOL, rank
        assert by_arch[arch]["round_trip_bitwise"], rank


@pytest.mark.parametrize("arch", list(ARCHS))
def test_checkpoint_consolidates_into_the_plain_hf_model(results, arch):
    for rank, by_arch in enumerate(results):
        consolidated = by_arch[arch]["consolidated"]
        assert consolidated["keys_equal"] and consolidated["implementations"] == ["eager"], (rank, consolidated)
        assert consolidated["state"] <= TOL and consolidated["logits"] <= TOL, (rank, consolidated)
        assert by_arch[arch]["loaded_one_process"] <= TOL, rank  # resharded 2 -> 1 into a one-process model


def test_bad_input_raises_on_every_rank_and_changes_nothing(results):
    path = "model.layers.0.mlp.experts"
    for rank, by_arch in enumerate(results):
        errors = by_arch["errors"]
        kind, message = errors["indivisible"]
        assert kind == "ValueError" and path in message, (rank, message)
        assert "num_experts=3" in message and "2 ranks" in message, (rank, message)
        kind, message = errors["seeds"]  # ranks built from other seeds hold other experts
        assert kind == "ValueError" and "expert values" in message and "rank 1 has" in message, (rank, message)
        kind, message = errors["not a group"]
        assert kind == "TypeError" and "moe_group='world'" in message, (rank, message)
        kind, message = errors["mesh"]
        assert kind == "NotImplementedError" and "mesh.get_group()" in message, (rank, message)
        for key in ("indivisible", "seeds", "not a group", "mesh"):
            assert errors[key + " unchanged"], (rank, key)
        if rank == 1:
            kind, message = errors["not in the group"]
            assert kind == "ValueError" and "this rank (1) is not in moe_group" in message, message
            assert errors["not in the group unchanged"]
        else:
            assert errors["alone holds all experts"]  # a group of one rank: the experts stay whole
        split = errors["split after one process"]
        assert split["shapes"] and split["experts"] == 0.0 and split["replicated"] == 0.0, (rank, split)
        kind, message = errors["resplit"]
        assert kind == "ValueError" and "restore_hf" in message and "group of 2 ranks" in message, (rank, message)
