"""Bodies of the DeviceMesh / DTensor expert tests (test_dtensor_ep.py), run on every rank by
dist_harness.run_workers (module-level functions, so the spawned processes can import them).

Every layer here is an fp64 FMoETransformerMLP with ``NUM_TOTAL`` experts in all. The single-process reference
(``world_size=1``, every expert) and the mesh layers are built from the same seed, so they start equal (expert
initialisation is per global expert, docs/distributed.md). Checkpoint tests overwrite every parameter with
``marked_state()`` first, so a load that left a tensor alone, or put one rank's experts on another, is seen."""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import fastmoe

NUM_TOTAL, D_MODEL, D_HIDDEN, TOP_K, SEED = 4, 8, 12, 2, 2024
TOKENS_PER_RANK = (5, 7, 0, 6)  # rank 2 of a 4-rank job has no tokens at all
DTYPE = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}  # fp64: the layouts sum a token's slots in other orders (docs/numerics.md)


def single_layer() -> fastmoe.FMoETransformerMLP:
    """The one-process layer holding every expert."""
    torch.manual_seed(SEED)
    return fastmoe.FMoETransformerMLP(NUM_TOTAL, D_MODEL, D_HIDDEN, top_k=TOP_K).to(DTYPE)


def mesh_layer(ep_mesh) -> fastmoe.FMoETransformerMLP:
    """The expert-parallel layer over the 1-D ``ep_mesh``, its experts DTensors."""
    ep = ep_mesh.size()
    torch.manual_seed(SEED)
    layer = fastmoe.FMoETransformerMLP(
        NUM_TOTAL // ep, D_MODEL, D_HIDDEN, top_k=TOP_K, world_size=ep, moe_group=ep_mesh
    )
    return layer.to(DTYPE)


def make_mesh(world: int, dp: int):
    """A 1-D ("ep",) mesh, or with ``dp > 1`` a 2-D ("dp", "ep") mesh; returns ``(mesh, mesh["ep"])``."""
    if dp == 1:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    else:
        mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "ep"))
    return mesh, mesh["ep"]


def marked_state() -> dict:
    """A value for every parameter of the layer, by name, in its global shape (the single-process layer's)."""
    gen = torch.Generator().manual_seed(77)
    return {name: torch.randn(p.shape, generator=gen, dtype=DTYPE) for name, p in single_layer().named_parameters()}


def local_part(global_value: torch.Tensor, param) -> torch.Tensor:
    """The part of ``global_value`` that ``param`` holds on this rank: its Shard(0) slice, or all of it."""
    if not isinstance(param, DTensor):
        return global_value
    assert param.placements == (Shard(0),), f"expert placements {param.placements}, expected (Shard(dim=0),)"
    rows = param.to_local().shape[0]
    rank = param.device_mesh.get_local_rank()
    return global_value[rank * rows : (rank + 1) * rows]


@torch.no_grad()
def apply_state(layer, state: dict) -> None:
    for name, param in layer.named_parameters():
        target = param.to_local() if isinstance(param, DTensor) else param
        target.copy_(local_part(state[name], param))


def tokens(rank: int, world: int):
    """The tokens of every rank of a ``world``-rank job (``x_all``, ``grad_all``) and this rank's rows of them."""
    gen = torch.Generator().manual_seed(99)
    num_tokens = sum(TOKENS_PER_RANK[:world])
    x_all = torch.randn(num_tokens, D_MODEL, generator=gen, dtype=DTYPE)
    grad_all = torch.randn(num_tokens, D_MODEL, generator=gen, dtype=DTYPE)
    start = sum(TOKENS_PER_RANK[:rank])
    return x_all, grad_all, slice(start, start + TOKENS_PER_RANK[rank])


def to_numpy(tensor: torch.Tensor):
    return tensor.detach().numpy()


def check_matches_state(layer, state: dict, where: str) -> None:
    """Every parameter holds exactly its part of ``state`` (data movement: bitwise)."""
    for name, param in layer.named_parameters():
        got = param.to_local() if isinstance(param, DTensor) else param
        want = local_part(state[name], param)
        assert torch.equal(got.detach(), want), f"{where}: parameter {name} differs from the saved values"


# ------------------------------------------------------------------------------------------------ bodies


def init_and_forward(rank, world):
    """A mesh layer's experts are DTensors of the whole layer's shape, Shard(0) on the mesh, whose full tensors
    equal the one-process layer of the same seed bit for bit; the forward runs on the local shards."""
    _, ep_mesh = make_mesh(world, 1)
    layer, ref = mesh_layer(ep_mesh), single_layer()
    for (name, param), (_, want) in zip(layer.named_parameters(), ref.named_parameters(), strict=True):
        if name.startswith("experts."):
            assert isinstance(param, DTensor), f"{name} is a {type(param).__name__}, expected a DTensor"
            assert param.placements == (Shard(0),) and param.device_mesh == ep_mesh, f"{name}: {param.placements}"
            assert param.shape == want.shape, f"{name}: global shape {tuple(param.shape)} != {tuple(want.shape)}"
            assert param.to_local().shape[0] == NUM_TOTAL // world
            full = param.full_tensor()
        else:
            assert not isinstance(param, DTensor), f"{name} (replicated) became a DTensor"
            full = param
        assert torch.equal(full.detach(), want.detach()), f"rank {rank}: {name} differs from the one-process layer"
    x_all, g_all, rows = tokens(rank, world)
    y_ref = ref(x_all)
    (y_ref * g_all).sum().backward()
    y = layer(x_all[rows])
    (y * g_all[rows]).sum().backward()
    torch.testing.assert_close(y, y_ref[rows], **TOL)
    for name, param in layer.named_parameters():
        if name.startswith("experts."):
            assert isinstance(param.grad, DTensor) and param.grad.placements == (Shard(0),), f"{name}.grad"
            torch.testing.assert_close(
                param.grad.to_local(), local_part(dict(ref.named_parameters())[name].grad, param), **TOL
            )
    return y.shape[0]


def save_mesh(rank, world, dp, path):
    """Marks every parameter, saves the layer with torch.distributed.checkpoint, returns this rank's output."""
    import torch.distributed.checkpoint as dcp

    _, ep_mesh = make_mesh(world, dp)
    layer = mesh_layer(ep_mesh)
    apply_state(layer, marked_state())
    dcp.save(layer.state_dict(), checkpoint_id=path)
    x_all, _, rows = tokens(rank, world)
    with torch.no_grad():
        return to_numpy(layer(x_all[rows]))


def load_mesh(rank, world, dp, path):
    """Loads the checkpoint into a mesh layer of another seed; each rank must hold exactly its experts, and the
    output on its tokens is returned for the parent to compare."""
    import torch.distributed.checkpoint as dcp

    _, ep_mesh = make_mesh(world, dp)
    torch.manual_seed(SEED + 1)
    layer = fastmoe.FMoETransformerMLP(
        NUM_TOTAL // ep_mesh.size(), D_MODEL, D_HIDDEN, top_k=TOP_K, world_size=ep_mesh.size(), moe_group=ep_mesh
    ).to(DTYPE)
    state = layer.state_dict()
    dcp.load(state, checkpoint_id=path)
    layer.load_state_dict(state)
    check_matches_state(layer, marked_state(), f"rank {rank}")
    x_all, _, rows = tokens(rank, world)
    with torch.no_grad():
        return to_numpy(layer(x_all[rows]))


def ddp_refuses(rank, world):
    """torch's DistributedDataParallel cannot hold DTensor parameters: it raises at construction, before its
    broadcast could copy rank 0's experts over rank 1's, and the experts keep their values."""
    from torch.nn.parallel import DistributedDataParallel

    _, ep_mesh = make_mesh(world, 1)
    layer = mesh_layer(ep_mesh)
    before = {name: p.to_local().clone() for name, p in layer.named_parameters() if isinstance(p, DTensor)}
    try:
        DistributedDataParallel(layer)
    except RuntimeError as error:
        message = str(error)
    else:
        raise AssertionError(f"rank {rank}: DistributedDataParallel accepted DTensor experts")
    assert "DTensor" in message, f"rank {rank}: unexpected error {message}"
    for name, value in before.items():
        assert torch.equal(dict(layer.named_parameters())[name].to_local(), value), f"rank {rank}: {name} changed"
    # the layer still works after the refusal
    x_all, _, rows = tokens(rank, world)
    layer(x_all[rows]).sum().backward()
    return message


def fsdp2_dp_ep(rank, world):
    """fully_shard over the data-parallel dimension of a (dp, ep) mesh: the experts are sharded over ep by the
    layer and over dp by FSDP2, the replicated parameters over every rank. Outputs, gradients (summed, as one
    process on every rank's tokens computes them) and the parameters after an SGD step equal the one-process
    layer's."""
    from torch.distributed.fsdp import fully_shard

    mesh, ep_mesh = make_mesh(world, 2)
    world_mesh = init_device_mesh("cpu", (world,))
    layer, ref = mesh_layer(ep_mesh), single_layer()
    fully_shard(layer.experts, mesh=mesh["dp"])
    fully_shard(layer, mesh=world_mesh)
    # The loss is a sum over tokens, so the gradients are sums over ranks: no division by the group sizes.
    layer.set_gradient_divide_factor(1.0)
    layer.experts.set_gradient_divide_factor(1.0)
    expert_weight = layer.experts.htoh4.weight
    assert expert_weight.device_mesh == mesh and expert_weight.placements[1] == Shard(0), expert_weight.placements
    x_all, g_all, rows = tokens(rank, world)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (layer, ref))
    for _ in range(2):
        y_ref = ref(x_all)
        (y_ref * g_all).sum().backward()
        y = layer(x_all[rows])
        (y * g_all[rows]).sum().backward()
        torch.testing.assert_close(y, y_ref[rows], **TOL)
        ref_params = dict(ref.named_parameters())
        for name, param in layer.named_parameters():
            got = param.grad.full_tensor()
            torch.testing.assert_close(got, ref_params[name].grad, **TOL, msg=lambda m, n=name: f"grad {n}: {m}")
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for name, param in layer.named_parameters():
            torch.testing.assert_close(param.full_tensor(), ref_params[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")
    return y.shape[0]


def clip_global_norm(rank, world):
    """torch.nn.utils.clip_grad_norm_ over the DTensor experts gives their global gradient norm, and
    fastmoe.distributed.clip_grad_norm_ over the whole layer (DTensor experts and the plain gate) the norm torch
    computes for the one-process layer, and the same clipped gradients."""
    _, ep_mesh = make_mesh(world, 1)
    layer, ref = mesh_layer(ep_mesh), single_layer()
    x_all, g_all, rows = tokens(rank, world)
    (ref(x_all) * g_all).sum().backward()
    (layer(x_all[rows]) * g_all[rows]).sum().backward()
    for param in layer.gate.parameters():  # the gate's gradient of every rank's tokens, as in one process
        dist.all_reduce(param.grad)
    expert_names = [name for name, _ in layer.named_parameters() if name.startswith("experts.")]
    ref_params = dict(ref.named_parameters())
    want_experts = torch.linalg.vector_norm(torch.stack([ref_params[n].grad.norm() for n in expert_names]))
    got_experts = torch.nn.utils.clip_grad_norm_(layer.experts.parameters(), max_norm=1e30)
    assert isinstance(got_experts, DTensor), type(got_experts)
    torch.testing.assert_close(got_experts.full_tensor(), want_experts, **TOL)
    max_norm = 0.5
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    got = fastmoe.distributed.clip_grad_norm_(layer.parameters(), max_norm)
    assert want > max_norm, f"the reference norm {want} must exceed max_norm for the clip to matter"
    torch.testing.assert_close(got, want, **TOL)
    for name, param in layer.named_parameters():
        grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        torch.testing.assert_close(grad, local_part(ref_params[name].grad, param), **TOL)
    return float(got)
