"""fastmoe's own distributed tools on models whose experts are DTensors (layers built with moe_group=<DeviceMesh>),
gloo on loopback:

- fastmoe.checkpoint saves a mesh layer's DTensor experts, loads them back into DTensors at the same EP size
  (model and Adam state, bitwise), into the one-process model (2 -> 1) and from it (1 -> 2), and consolidate()
  gives the one-process state dict;
- a model whose experts FSDP2 shards too (fully_shard over the dp dimension of a (dp, ep) mesh, 4 ranks) saves with
  its AdamW state and loads bitwise into the same layout, into the one-process model, and into a process-group
  EP layer on 2 ranks;
- DistributedGroupedDataParallel refuses a mesh layer up front, naming it;
- fastmoe.distributed.clip_grad_norm_ over a model mixing DTensor experts and plain parameters gives the
  one-process model's total norm (2-norm and inf-norm) on every rank and the same clipped gradients.

Every model is fp64: an embedding-like Linear and an FMoETransformerMLP with NUM_TOTAL experts in all."""

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_workers
from dtensor_cases import D_HIDDEN, D_MODEL, DTYPE, NUM_TOTAL, SEED, TOL, TOP_K, local_part, make_mesh, tokens
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import fastmoe
from fastmoe import checkpoint


class Model(nn.Module):
    """``embed`` (replicated) then the MoE layer, over ``ep_group``: a 1-D DeviceMesh (DTensor experts), a process
    group (plain tensors holding this rank's experts), or None (one process)."""

    def __init__(self, ep_group=None, seed: int = SEED):
        super().__init__()
        torch.manual_seed(seed)
        ep = 1 if ep_group is None else ep_group.size()
        mesh_args = {} if ep_group is None else {"world_size": ep, "moe_group": ep_group}
        self.embed = nn.Linear(D_MODEL, D_MODEL)
        self.mlp = fastmoe.FMoETransformerMLP(NUM_TOTAL // ep, D_MODEL, D_HIDDEN, top_k=TOP_K, **mesh_args)
        self.to(DTYPE)

    def forward(self, x):
        h = self.embed(x)
        return h + self.mlp(h)


def local(value):
    return value.to_local() if isinstance(value, DTensor) else value


def backward(model, rank: int, world: int) -> None:
    """The loss of every rank's tokens; on a mesh model the replicated gradients are summed over the ranks, so
    every gradient equals the one-process model's."""
    x_all, g_all, rows = tokens(rank, world) if world > 1 else (*tokens(0, 2)[:2], slice(None))
    (model(x_all[rows]) * g_all[rows]).sum().backward()
    if world > 1:
        for param in model.parameters():
            if not isinstance(param, DTensor):
                dist.all_reduce(param.grad)


def train_step(model, optimizer, rank: int, world: int) -> None:
    optimizer.zero_grad()
    backward(model, rank, world)
    optimizer.step()


def full(value):
    return value.full_tensor() if isinstance(value, DTensor) else value


def to_numpy(tree):
    """Tensors as numpy arrays, to return from a worker (a tensor would travel as shared memory of an exited
    process)."""
    return torch.utils._pytree.tree_map(lambda t: t.detach().numpy() if isinstance(t, torch.Tensor) else t, tree)


def from_numpy(tree):
    return torch.utils._pytree.tree_map(lambda a: torch.from_numpy(a) if hasattr(a, "dtype") else a, tree)


def full_state(model, optimizer) -> tuple[dict, dict]:
    """``({name: global parameter}, {name: {state key: global value}})`` (collectives on a mesh model)."""
    params = {name: full(p).detach().clone() for name, p in model.named_parameters()}
    state = {name: {k: full(v).clone() for k, v in optimizer.state[p].items()} for name, p in model.named_parameters()}
    return params, state


def assert_same_state(model, optimizer, other, other_optimizer, where: str) -> None:
    """Parameters and Adam state equal bitwise, placed alike (DTensor experts stay DTensors)."""
    other_params = dict(other.named_parameters())
    for name, param in model.named_parameters():
        want = other_params[name]
        assert type(param) is type(want), f"{where}: {name} is a {type(param).__name__}, not {type(want).__name__}"
        assert torch.equal(local(param).detach(), local(want).detach()), f"{where}: parameter {name} differs"
        got_state, want_state = optimizer.state[param], other_optimizer.state[want]
        assert set(got_state) == set(want_state) == {"step", "exp_avg", "exp_avg_sq"}, (where, name, set(got_state))
        for key, value in want_state.items():
            assert type(got_state[key]) is type(value), f"{where}: state {key} of {name}: {type(got_state[key])}"
            assert torch.equal(local(got_state[key]), local(value)), f"{where}: state {key} of {name} differs"


def save_and_reload(rank, world, path):
    """Trains a mesh model one step and saves it; a mesh model of another seed loads it (DTensor experts filled
    through their local shards) and equals it bitwise, before and after one more step. Returns the global state
    for the parent's one-process checks."""
    _, ep_mesh = make_mesh(world, 1)
    model = Model(ep_mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_step(model, optimizer, rank, world)
    checkpoint.save(model, optimizer, path, tag="mesh", extra={"step": 1})
    saved = full_state(model, optimizer)
    fresh = Model(ep_mesh, seed=SEED + 1)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    info = checkpoint.load(fresh, fresh_optimizer, path)
    assert info["tag"] == "mesh" and info["extra"] == {"step": 1}, info
    assert_same_state(fresh, fresh_optimizer, model, optimizer, f"rank {rank}, after load")
    train_step(model, optimizer, rank, world)
    train_step(fresh, fresh_optimizer, rank, world)
    assert_same_state(fresh, fresh_optimizer, model, optimizer, f"rank {rank}, one step after load")
    return to_numpy(saved)


def load_from_single(rank, world, path):
    """1 -> 2: each rank of a mesh model loads its experts (and their Adam state) out of a one-process checkpoint;
    the parameters and state are the one-process values' Shard(0) parts."""
    _, ep_mesh = make_mesh(world, 1)
    model = Model(ep_mesh, seed=SEED + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    checkpoint.load(model, optimizer, path)
    consolidated = checkpoint.consolidate(path)
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor) == name.startswith("mlp.experts."), f"{name}: {type(param).__name__}"
        assert torch.equal(local(param).detach(), local_part(consolidated[name], param)), f"rank {rank}: {name}"
        assert isinstance(optimizer.state[param]["exp_avg"], DTensor) == isinstance(param, DTensor), name
    train_step(model, optimizer, rank, world)  # the loaded state steps (DTensor and plain state together)
    return to_numpy({name: full(p) for name, p in model.named_parameters()})


def test_checkpoint_mesh_round_trip_and_one_process(tmp_path):
    path = str(tmp_path / "ckpt")
    params, state = from_numpy(run_workers(2, save_and_reload, path)[0])
    # consolidate(): the one-process state dict, every expert stacked in global order
    consolidated = checkpoint.consolidate(path)
    single = Model(seed=SEED + 2)
    assert set(consolidated) == set(single.state_dict())
    for name, value in params.items():
        assert torch.equal(consolidated[name], value), f"consolidate: {name} differs from the saved model"
    # 2 -> 1: load() into the one-process model, with its Adam state
    optimizer = torch.optim.Adam(single.parameters(), lr=1e-2)
    checkpoint.load(single, optimizer, path)
    for name, param in single.named_parameters():
        assert torch.equal(param.detach(), params[name]), f"2 -> 1: parameter {name} differs"
        for key, value in state[name].items():
            assert torch.equal(optimizer.state[param][key], value), f"2 -> 1: state {key} of {name} differs"


def test_checkpoint_one_process_to_mesh(tmp_path):
    path = str(tmp_path / "ckpt")
    single = Model()
    optimizer = torch.optim.Adam(single.parameters(), lr=1e-2)
    train_step(single, optimizer, 0, 1)
    checkpoint.save(single, optimizer, path)
    stepped = from_numpy(run_workers(2, load_from_single, path))
    # one step after the load: the mesh model's step equals the one-process model's on the same tokens
    train_step(single, optimizer, 0, 1)
    for name, param in single.named_parameters():
        for rank in range(2):
            torch.testing.assert_close(stepped[rank][name], param.detach(), **TOL, msg=lambda m, n=name: f"{n}: {m}")


def fsdp2_model(mesh, seed: int):
    """The model over the (dp, ep) ``mesh`` with FSDP2 as docs/distributed.md sets it up: the experts sharded over
    ep by the layer and over dp by fully_shard, everything else over all ranks; the gradients are sums over the
    ranks (divide factor 1), as in :func:`backward`."""
    from torch.distributed.fsdp import fully_shard

    model = Model(mesh["ep"], seed=seed)
    fully_shard(model.mlp.experts, mesh=mesh["dp"])
    fully_shard(model, mesh=init_device_mesh("cpu", (mesh.size(),)))
    model.set_gradient_divide_factor(1.0)
    model.mlp.experts.set_gradient_divide_factor(1.0)
    return model


def adamw(model, lr: float = 1e-2):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)


def fsdp2_save(rank, world, path):
    """Trains the FSDP2 model two AdamW steps and saves it; a fresh FSDP2 model of another seed loads it and equals
    it bitwise. Returns the global parameters and AdamW state (full_tensor() before the save)."""
    mesh, _ = make_mesh(world, 2)
    model = fsdp2_model(mesh, SEED)
    weight = model.mlp.experts.htoh4.weight
    assert weight.device_mesh == mesh and weight.to_local().shape[0] == NUM_TOTAL // world, weight
    optimizer = adamw(model)
    for _ in range(2):
        train_step(model, optimizer, rank, world)
    saved = full_state(model, optimizer)
    checkpoint.save(model, optimizer, path, tag="fsdp2", extra={"step": 2})
    fresh = fsdp2_model(mesh, SEED + 1)
    fresh_optimizer = adamw(fresh, lr=0.5)
    assert not torch.equal(full(fresh.embed.weight).detach(), saved[0]["embed.weight"])
    info = checkpoint.load(fresh, fresh_optimizer, path)
    assert info["extra"] == {"step": 2}, info
    assert_full_state_equal(fresh, fresh_optimizer, saved, f"FSDP2 rank {rank}")
    return to_numpy(saved)


def assert_full_state_equal(model, optimizer, saved, where: str) -> None:
    """The global parameters and optimizer state of ``model`` equal ``saved`` (:func:`full_state`) bitwise, and
    the saved hyperparameters replaced the optimizer's."""
    params, state = saved
    got_params, got_state = full_state(model, optimizer)
    assert sorted(got_params) == sorted(params), where
    for name, value in params.items():
        assert torch.equal(got_params[name], value), f"{where}: parameter {name} differs"
        assert set(got_state[name]) == set(state[name]) == {"step", "exp_avg", "exp_avg_sq"}, (where, name)
        for key, want in state[name].items():
            assert torch.equal(got_state[name][key], want), f"{where}: state {key} of {name} differs"
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(1e-2, 0.05)], optimizer.param_groups


def fsdp2_load_process_group(rank, world, path, saved):
    """The FSDP2 checkpoint loads into a process-group EP layer: each rank holds its experts (plain tensors) and
    their AdamW state, the replicated parameters whole, all bitwise."""
    params, state = from_numpy(saved)
    model = Model(dist.group.WORLD, seed=SEED + 1)
    assert not any(isinstance(p, DTensor) for p in model.parameters())
    optimizer = adamw(model, lr=0.5)
    checkpoint.load(model, optimizer, path)
    rows = slice(rank * NUM_TOTAL // world, (rank + 1) * NUM_TOTAL // world)
    for name, param in model.named_parameters():
        part = (lambda v: v[rows]) if name.startswith("mlp.experts.") else (lambda v: v)
        assert torch.equal(param.detach(), part(params[name])), f"rank {rank}: parameter {name} differs"
        for key, value in optimizer.state[param].items():
            want = state[name][key] if key == "step" else part(state[name][key])
            assert torch.equal(value, want), f"rank {rank}: state {key} of {name} differs"
        assert set(optimizer.state[param]) == {"step", "exp_avg", "exp_avg_sq"}, (name, set(optimizer.state[param]))
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(1e-2, 0.05)], optimizer.param_groups
    train_step(model, optimizer, rank, world)  # the loaded state steps


def test_checkpoint_fsdp2_experts_load_in_one_process_and_over_a_process_group(tmp_path):
    path = str(tmp_path / "ckpt")
    saved = run_workers(4, fsdp2_save, path)[0]
    layers = checkpoint.read_meta(path)["layers"]
    assert layers == {"mlp": {"fused": True, "num_experts_total": NUM_TOTAL, "ep_size": 2}}, layers
    params, state = from_numpy(saved)
    consolidated = checkpoint.consolidate(path)
    single = Model(seed=SEED + 2)
    assert set(consolidated) == set(single.state_dict())
    for name, value in params.items():
        assert torch.equal(consolidated[name], value), f"consolidate: {name} differs from the saved model"
    # (a) one process: the plain model and AdamW
    optimizer = adamw(single, lr=0.5)
    checkpoint.load(single, optimizer, path)
    assert_full_state_equal(single, optimizer, (params, state), "one process")
    # (b) a process-group EP layer on 2 ranks
    run_workers(2, fsdp2_load_process_group, path, saved)


def dgdp_refuses(rank, world):
    """DistributedGroupedDataParallel refuses a mesh layer, and leaves its parameters alone."""
    _, ep_mesh = make_mesh(world, 1)
    model = Model(ep_mesh)
    before = {name: local(p).detach().clone() for name, p in model.named_parameters()}
    try:
        fastmoe.DistributedGroupedDataParallel(model)
    except TypeError as error:
        message = str(error)
    else:
        raise AssertionError(f"rank {rank}: DistributedGroupedDataParallel accepted DTensor experts")
    for name, param in model.named_parameters():
        assert torch.equal(local(param).detach(), before[name]), f"rank {rank}: {name} changed"
    return message


def test_dgdp_refuses_a_mesh_layer_and_points_to_fsdp2():
    messages = run_workers(2, dgdp_refuses)
    assert messages[0] == messages[1], messages
    ddp = messages[0]
    assert ddp.startswith("DistributedGroupedDataParallel cannot reduce the DTensor experts of FMoE layer 'mlp'"), ddp
    assert "FSDP2" in ddp and "'DeviceMesh and DTensor experts'" in ddp, ddp


def clip_like_one_process(rank, world, norm_type):
    """fastmoe.distributed.clip_grad_norm_ over the whole mesh model: the one-process model's total norm on every
    rank, and its clipped gradients."""
    _, ep_mesh = make_mesh(world, 1)
    model, ref = Model(ep_mesh), Model()
    backward(model, rank, world)
    backward(ref, 0, 1)
    max_norm = 0.25
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type)
    assert want > 2 * max_norm, f"the reference norm {want} must exceed max_norm for the clip to matter"
    mixed = {type(p.grad) for p in model.parameters()}
    assert mixed == {torch.Tensor, DTensor}, mixed
    got = fastmoe.distributed.clip_grad_norm_(model.parameters(), max_norm, norm_type)
    assert type(got) is torch.Tensor, type(got)
    torch.testing.assert_close(got, want, **TOL)
    ref_params = dict(ref.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(
            local(param.grad), local_part(ref_params[name].grad, param), **TOL, msg=lambda m, n=name: f"{n}: {m}"
        )
    return float(got)


@pytest.mark.parametrize("norm_type", [2.0, float("inf")], ids=["l2", "inf"])
def test_clip_grad_norm_mixed_dtensor_model_equals_one_process(norm_type):
    norms = run_workers(2, clip_like_one_process, norm_type)
    assert norms[0] == norms[1], f"the ranks clipped by different norms: {norms}"


def test_clip_grad_norm_plain_parameters_and_bad_max_norm():
    """Without any DTensor it is torch's clip_grad_norm_; a NaN max_norm raises, naming it."""
    model, ref = Model(), Model()
    backward(model, 0, 1)
    backward(ref, 0, 1)
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    torch.testing.assert_close(fastmoe.distributed.clip_grad_norm_(model.parameters(), 0.1), want, **TOL)
    for param, ref_param in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(param.grad, ref_param.grad, **TOL)
    with pytest.raises(ValueError, match="max_norm must be a number >= 0, got nan"):
        fastmoe.distributed.clip_grad_norm_(model.parameters(), float("nan"))
    assert float(fastmoe.distributed.clip_grad_norm_([torch.zeros(3, requires_grad=True)], 1.0)) == 0.0
    model.embed.bias.grad[0] = float("inf")
    with pytest.raises(RuntimeError, match="total norm of order 2.0 of the gradients is non-finite"):
        fastmoe.distributed.clip_grad_norm_(model.parameters(), 0.1, error_if_nonfinite=True)
