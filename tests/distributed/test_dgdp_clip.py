"""DistributedGroupedDataParallel.clip_grad_norm_ over per-expert modules that hold a 0-d parameter (a learned
scalar per expert): at EP 2 on gloo, the norm and the clipped gradients are those of torch.nn.utils.clip_grad_norm_
on the one-process model trained on both ranks' tokens."""

import torch
from dist_harness import run_workers
from torch import nn

import fastmoe

D_MODEL, NUM_LOCAL, TOP_K, TOKENS, MAX_NORM = 6, 2, 2, 5, 0.05


class ScaledExpert(nn.Module):
    """A Linear times a learned scalar (a 0-d parameter)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.linear = nn.Linear(d_model, d_model)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.linear(x)


def model(num_expert: int, world_size: int) -> nn.ModuleDict:
    torch.manual_seed(5)
    return nn.ModuleDict(
        {
            "embed": nn.Linear(D_MODEL, D_MODEL),
            "moe": fastmoe.FMoE(num_expert, D_MODEL, world_size=world_size, top_k=TOP_K, expert=ScaledExpert),
        }
    ).to(torch.float64)


def forward(m: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    return m["moe"](torch.tanh(m["embed"](x)))


def clip_scalar_experts(rank, world_size):
    """EP 2 over the default group: each rank's mean loss on its tokens, reduced by DistributedGroupedDataParallel,
    clipped by its clip_grad_norm_; the one-process model's loss is the mean of the ranks' losses."""
    ref = model(NUM_LOCAL * world_size, 1)
    with torch.no_grad():  # every expert's scalar differs, so each one's gradient does
        for g, expert in enumerate(ref["moe"].experts):
            expert.scale.fill_(0.5 + 0.25 * g)
    local = model(NUM_LOCAL, world_size)
    references = dict(ref.named_parameters())

    def global_name(name: str) -> str:  # rank r's local expert l is global expert NUM_LOCAL * r + l
        if not name.startswith("moe.experts."):
            return name
        _, _, index, rest = name.split(".", 3)
        return f"moe.experts.{NUM_LOCAL * rank + int(index)}.{rest}"

    with torch.no_grad():
        for name, param in local.named_parameters():
            param.copy_(references[global_name(name)])
    ddp = fastmoe.DistributedGroupedDataParallel(local)

    gen = torch.Generator().manual_seed(100)
    x = torch.randn(world_size * TOKENS, D_MODEL, generator=gen, dtype=torch.float64)
    target = torch.randn(world_size * TOKENS, D_MODEL, generator=gen, dtype=torch.float64)
    rows = [slice(r * TOKENS, (r + 1) * TOKENS) for r in range(world_size)]
    ((forward(local, x[rows[rank]]) - target[rows[rank]]) ** 2).mean().backward()
    ddp.allreduce_gradients()
    norm = ddp.clip_grad_norm_(MAX_NORM)
    (sum(((forward(ref, x[r]) - target[r]) ** 2).mean() for r in rows) / world_size).backward()
    scalars = [expert.scale.grad for expert in ref["moe"].experts]
    assert all(g is not None and g.dim() == 0 and g != 0 for g in scalars), f"scalar gradients {scalars}"
    norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
    assert norm_ref > MAX_NORM, f"the threshold should clip: the gradient norm is {float(norm_ref)}"
    torch.testing.assert_close(norm.to(norm_ref), norm_ref, rtol=1e-10, atol=0, msg=f"rank {rank}: the norm")
    for name, param in local.named_parameters():
        want = references[global_name(name)].grad
        want = torch.zeros_like(param) if want is None else want
        got = torch.zeros_like(param) if param.grad is None else param.grad
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14, msg=lambda m, n=name: f"rank {rank} {n}: {m}")
    return float(norm)


def test_clip_grad_norm_with_0d_expert_parameters_matches_one_process():
    norms = run_workers(2, clip_scalar_experts, timeout=120)
    assert norms[0] == norms[1], f"the ranks clipped by different norms: {norms}"
