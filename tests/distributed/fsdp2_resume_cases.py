"""Bodies of test_dtensor_resume.py: training under expert parallelism x FSDP2, a DCP checkpoint of the model and
its optimizer, and a resume with another number of ranks (module-level functions, so that dist_harness can run them
in spawned processes).

The model is fp64: an input Linear, two FMoETransformerMLP layers (``NUM_TOTAL`` experts each, top-2) with a
LayerNorm between them, and an output Linear. Every layout sees the same global batches: step ``s`` draws
``TOKENS`` rows from its own seed, and rank ``r`` of ``W`` takes rows ``[r * TOKENS / W, (r + 1) * TOKENS / W)``.
The loss of a step is the mean squared error over the whole global batch; a rank computes its rows' part of it (its
rows' sum over the global count), so the parts of all ranks add up to the one-process loss and every gradient is a
sum over the ranks: FSDP2 reduces with a plain sum (gradient divide factor 1), which also sidesteps torch 2.11's
double division over a one-rank mesh (docs/distributed.md). Gradients are clipped by the global norm
(``fastmoe.distributed.clip_grad_norm_``), then AdamW steps."""

import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import fastmoe

NUM_TOTAL, D_MODEL, D_HIDDEN, TOP_K, SEED = 4, 8, 12, 2, 2025
TOKENS, STEPS, SAVE_AT = 16, 20, 10
LR, WEIGHT_DECAY, MAX_NORM = 1e-2, 0.1, 0.5
DTYPE = torch.float64
# fp64, docs/numerics.md: the layouts sum the same terms in other orders (a token's slots, the ranks' gradient
# parts); 20 AdamW steps keep those differences near 1e-15.
TOL = {"rtol": 1e-10, "atol": 1e-10}


class Net(nn.Module):
    """The model; with ``ep_mesh`` (a 1-D DeviceMesh) its experts are DTensors sharded over it."""

    def __init__(self, ep_mesh=None, seed: int = SEED):
        super().__init__()
        torch.manual_seed(seed)
        ep = 1 if ep_mesh is None else ep_mesh.size()
        mesh_args = {} if ep_mesh is None else {"world_size": ep, "moe_group": ep_mesh}
        self.embed = nn.Linear(D_MODEL, D_MODEL)
        self.mlp1 = fastmoe.FMoETransformerMLP(NUM_TOTAL // ep, D_MODEL, D_HIDDEN, top_k=TOP_K, **mesh_args)
        self.norm = nn.LayerNorm(D_MODEL)
        self.mlp2 = fastmoe.FMoETransformerMLP(NUM_TOTAL // ep, D_MODEL, D_HIDDEN, top_k=TOP_K, **mesh_args)
        self.head = nn.Linear(D_MODEL, D_MODEL)
        self.to(DTYPE)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.mlp1(h)
        h = h + self.mlp2(self.norm(h))
        return self.head(h)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, target)`` of step ``step``, ``[TOKENS, D_MODEL]`` each, the same in every layout."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(TOKENS, D_MODEL, generator=gen, dtype=DTYPE), torch.randn(
        TOKENS, D_MODEL, generator=gen, dtype=DTYPE
    )


def sharded_model(world: int, seed: int = SEED) -> Net:
    """EP x FSDP2 on ``world`` ranks: a ("dp", "ep") mesh of shape (1, world), the experts sharded over "ep" by
    their layers and wrapped by ``fully_shard`` over "dp", every other parameter sharded by ``fully_shard`` over all
    ranks. Every FSDP unit sums the gradients (see the module docstring)."""
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "ep"))
    model = Net(mesh["ep"], seed)
    units = []
    for layer in (model.mlp1, model.mlp2):
        fully_shard(layer.experts, mesh=mesh["dp"])
        units.append(layer.experts)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    for unit in [*units, model]:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no scaled-sum reduction
    return model


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def train_step(model, optimizer, step: int, rank: int, world: int, clip=fastmoe.distributed.clip_grad_norm_):
    """One step on this rank's rows of the global batch; returns ``(this rank's part of the loss, the total
    gradient norm before clipping)``."""
    x, target = global_batch(step)
    rows = slice(rank * TOKENS // world, (rank + 1) * TOKENS // world)
    loss = (model(x[rows]) - target[rows]).pow(2).sum() / target.numel()
    optimizer.zero_grad()
    loss.backward()
    norm = clip(model.parameters(), MAX_NORM)
    optimizer.step()
    return float(loss.detach()), float(norm)


def full(value):
    return value.full_tensor() if isinstance(value, DTensor) else value


def snapshot(model, optimizer) -> dict:
    """Every parameter and AdamW state tensor in its global shape, by name (``"params"`` and ``"optim"``), as numpy
    arrays to travel back from a worker. Collectives on a sharded model."""
    _, optim_state = get_state_dict(model, optimizer)
    params = {name: full(p).detach().numpy().copy() for name, p in model.named_parameters()}
    optim = {
        name: {key: full(value).detach().numpy().copy() for key, value in state.items()}
        for name, state in optim_state["state"].items()
    }
    return {"params": params, "optim": optim}


def load_checkpoint(model, optimizer, path: str, no_dist: bool = False) -> None:
    """Model and optimizer state from the DCP checkpoint at ``path``, resharded to this model's layout."""
    model_state, optim_state = get_state_dict(model, optimizer)  # initialises the optimizer's state to fill
    state = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():  # without a process group DCP warns that it assumes one process, as meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=no_dist)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


# ------------------------------------------------------------------------------------------------ bodies


def train_and_save(rank, world, path):
    """Steps 0 .. SAVE_AT - 1 under EP x FSDP2, then a DCP checkpoint of the model and AdamW state. Returns this
    rank's loss parts and the norms of every step."""
    model = sharded_model(world)
    optimizer = make_optimizer(model)
    weight = model.mlp1.experts.htoh4.weight
    assert isinstance(weight, DTensor) and weight.to_local().shape[0] == NUM_TOTAL // world, weight.placements
    history = [train_step(model, optimizer, step, rank, world) for step in range(SAVE_AT)]
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    return history


def resume_and_train(rank, world, path):
    """A model of another seed, under EP x FSDP2 on ``world`` ranks, loads the checkpoint and trains from SAVE_AT
    to STEPS. Returns its state right after the load, the loss parts and norms, and its final state."""
    model = sharded_model(world, seed=SEED + 1)
    optimizer = make_optimizer(model)
    load_checkpoint(model, optimizer, path)
    loaded = snapshot(model, optimizer)
    history = [train_step(model, optimizer, step, rank, world) for step in range(SAVE_AT, STEPS)]
    return loaded, history, snapshot(model, optimizer)
