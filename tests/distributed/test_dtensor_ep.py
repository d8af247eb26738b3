"""Expert parallelism over a DeviceMesh (gloo on loopback): the fused experts are DTensors sharded over the expert
dimension, so PyTorch's own tools see what each rank holds. torch.distributed.checkpoint saves and loads them
across EP sizes (2 -> 1, 1 -> 2, 2 -> 4, 2 data-parallel x 2 EP -> 4) and the result equals the one-process
layer; FSDP2 over the data-parallel dimension of a (dp, ep) mesh trains like one process; gradient clipping sees
the global norm; DistributedDataParallel refuses DTensor experts at construction instead of overwriting rank 1's
with rank 0's. Bodies in dtensor_cases.py."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_harness import run_workers
from dtensor_cases import (
    D_MODEL,
    NUM_TOTAL,
    TOKENS_PER_RANK,
    TOL,
    apply_state,
    check_matches_state,
    clip_global_norm,
    ddp_refuses,
    fsdp2_dp_ep,
    init_and_forward,
    load_mesh,
    marked_state,
    save_mesh,
    single_layer,
    tokens,
)
from torch.distributed.device_mesh import init_device_mesh

import fastmoe


def single_outputs(world: int) -> list:
    """The one-process layer holding marked_state(), on each of ``world`` ranks' tokens."""
    layer = single_layer()
    apply_state(layer, marked_state())
    with torch.no_grad():
        return [layer(tokens(rank, world)[0][tokens(rank, world)[2]]) for rank in range(world)]


def assert_outputs_match(outputs: list, world: int) -> None:
    for rank, (got, want) in enumerate(zip(outputs, single_outputs(world), strict=True)):
        torch.testing.assert_close(torch.from_numpy(got), want, **TOL, msg=lambda m, r=rank: f"rank {r}: {m}")


@pytest.mark.parametrize("world", [2, 4])
def test_mesh_experts_are_dtensors_equal_to_one_process(world):
    assert run_workers(world, init_and_forward) == list(TOKENS_PER_RANK[:world])


def test_dcp_save_ep2_load_one_process(tmp_path):
    """2 -> 1: DCP assembles the ranks' shards into the one-process layer's tensors (each rank wrote its own
    experts, which today's plain tensors of equal names would have overwritten with one rank's)."""
    outputs = run_workers(2, save_mesh, 1, str(tmp_path))
    assert_outputs_match(outputs, 2)
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(1)
    layer = fastmoe.FMoETransformerMLP(NUM_TOTAL, D_MODEL, 12, top_k=2).to(torch.float64)
    state = layer.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path))
    layer.load_state_dict(state)
    check_matches_state(layer, marked_state(), "one process")


def test_dcp_save_one_process_load_ep2(tmp_path):
    """1 -> 2: each rank loads its own experts out of the one-process layer's tensors."""
    import torch.distributed.checkpoint as dcp

    layer = single_layer()
    apply_state(layer, marked_state())
    dcp.save(layer.state_dict(), checkpoint_id=str(tmp_path))
    assert_outputs_match(run_workers(2, load_mesh, 1, str(tmp_path)), 2)


@pytest.mark.parametrize(("save_world", "save_dp"), [(2, 1), (4, 2)], ids=["ep2", "dp2xep2"])
def test_dcp_reshard_to_ep4(tmp_path, save_world, save_dp):
    """2 -> 4 and 2 data-parallel x 2 EP -> 4: a rank of the larger layout loads a piece of what one rank saved;
    replicas over dp save their experts once."""
    assert_outputs_match(run_workers(save_world, save_mesh, save_dp, str(tmp_path)), save_world)
    assert_outputs_match(run_workers(4, load_mesh, 1, str(tmp_path)), 4)


def test_ddp_refuses_dtensor_experts():
    messages = run_workers(2, ddp_refuses)
    assert all("mixed torch.Tensor and DTensor" in m for m in messages), messages


def test_fsdp2_over_dp_of_a_dp_ep_mesh():
    assert run_workers(4, fsdp2_dp_ep, timeout=180.0) == list(TOKENS_PER_RANK)


def test_clip_grad_norm_is_the_global_norm():
    norms = run_workers(2, clip_global_norm)
    assert norms[0] == norms[1], f"the ranks clipped by different norms: {norms}"
    assert np.isfinite(norms[0]) and norms[0] > 0.5


def _mesh_errors(rank, world):
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "ep"))
    errors = []
    for kwargs in (
        {"moe_group": mesh, "world_size": 2},
        {"moe_group": mesh["ep"], "world_size": 4},
        {"moe_group": mesh["ep"], "world_size": 2, "expert": lambda d: torch.nn.Linear(d, d)},
    ):
        try:
            if "expert" in kwargs:
                fastmoe.FMoE(2, D_MODEL, **kwargs)
            else:
                fastmoe.FMoETransformerMLP(2, D_MODEL, 12, **kwargs)
        except (ValueError, NotImplementedError) as error:
            errors.append(f"{type(error).__name__}: {error}")
        else:
            errors.append("accepted")
    dist.barrier()
    return errors


def test_bad_mesh_arguments_raise_clear_errors():
    errors = run_workers(4, _mesh_errors)[0]
    assert errors[0].startswith("ValueError: moe_group must be a 1-D DeviceMesh") and "('dp', 'ep')" in errors[0]
    assert errors[1] == "ValueError: world_size=4 but moe_group has 2 ranks; they must be equal", errors[1]
    assert errors[2].startswith("NotImplementedError: expert= (a module per expert) with moe_group=<DeviceMesh>")
