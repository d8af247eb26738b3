"""Hugging Face MoE models on fastmoe: the experts of a loaded model run on fastmoe's token path and grouped GEMM,
with the model's own routing rule, weights and code around them (docs/integrations.md, "Hugging Face MoE models").

transformers 5 stores the experts of its MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 and the
others whose experts class carries ``@use_experts_implementation``) as 3-D parameters, ``gate_up_proj [E, 2 * I,
H]`` (or ``up_proj [E, I, H]`` without a gate) and ``down_proj [E, H, I]``, and routes their forward through its
experts interface by the name in ``config._experts_implementation``, with the router's ``top_k_index [T, k]`` and
``top_k_weights [T, k]``. fastmoe registers itself there under the name ``"fastmoe"``: the shared experts, the
aux loss and the state dict stay Hugging Face's, and the expert computation changes:

    TokenDispatch (plan, permute) -> grouped_linear(gate_up_proj) -> the module's own gate/activation (fastmoe's
    swiglu op where that gate is transformers' default with SiLU) -> grouped_linear(down_proj) -> the weighted combine

:func:`use_fastmoe` also gives the routers that compute softmax, top k and optional renormalisation (Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE) fastmoe's ``route_topk`` op in bf16 and fp16: the same function, one kernel each way
(see _FusedRouter). Other routers (DeepSeek-V3's, GPT-OSS's) run their own code.

``grouped_linear`` takes ``weight [E, out, in]``, which is Hugging Face's layout, so the parameters are used as
they are: nothing is copied and nothing converted, and :func:`restore_hf` only switches the name (and the
routers' forward) back.

With ``use_fastmoe(model, moe_group=g)`` the experts are split over the W ranks of ``g`` (expert parallelism): each
experts module keeps its rank's block of ``num_experts / W`` experts, and the token path sends each token to the
ranks of its experts and back; :func:`restore_hf` gathers the full experts on every rank again.

transformers is imported only when a function here is called, so ``import fastmoe`` does not need it.
"""

import hashlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastmoe import _groups, debug, ops
from fastmoe._groups import EXPERT_SHARD, ExpertShard

__all__ = [
    "IMPLEMENTATION",
    "experts_forward",
    "find_hf_experts",
    "fused_routers",
    "register_experts_implementation",
    "restore_hf",
    "use_fastmoe",
]

# The name fastmoe is registered under in transformers' experts interface.
IMPLEMENTATION = "fastmoe"
# Where use_fastmoe keeps, on each experts module it switched, the implementation the module had before.
_PREVIOUS = "_fastmoe_previous_experts_implementation"
# transformers' default when a model does not name one (PreTrainedModel.get_correct_experts_implementation).
_HF_DEFAULT = "grouped_mm"
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

# The token path (fastmoe::TokenDispatch, docs/ops.md), registered when fastmoe._C loads.
_TokenDispatch = torch.classes.fastmoe.TokenDispatch


def _autocast_on(device: torch.device) -> bool:
    return torch.is_autocast_enabled(device.type)


def _expert_weights(module: nn.Module):
    """``(w_in, b_in, w_out, b_out)`` of an experts module, each weight as ``[E, out, in]`` (a transposed view for
    the modules that store ``[E, in, out]``), each bias ``[E, out]`` or None."""
    w_in = module.gate_up_proj if module.has_gate else module.up_proj
    b_in = None
    w_out, b_out = module.down_proj, None
    if module.has_bias:
        b_in = module.gate_up_proj_bias if module.has_gate else module.up_proj_bias
        b_out = module.down_proj_bias
    if module.is_transposed:
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    return w_in, b_in, w_out, b_out


def experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The ``"fastmoe"`` entry of transformers' experts interface: the forward of an experts module (``self``)
    given the router's choice. ``hidden_states [T, H]``, ``top_k_index [T, k]`` (ids at or above
    ``self.num_experts`` are the slots transformers' own expert parallelism sends elsewhere; they are dropped, as
    their weights are zero), ``top_k_weights [T, k]``; returns ``[T, H]`` in the dtype of ``hidden_states``.

    The gate between the two GEMMs is the module's own (``self._apply_gate`` on ``[gate | up]``, or
    ``self.act_fn`` without a gate), so any activation or gating a model defines is kept; where it is
    transformers' default gate with SiLU, fastmoe's swiglu op computes that same function (:func:`_gate_of`), and
    without a second bias it also applies the routing scores (``TokenDispatch.row_scores``) so the combine only
    sums."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 2:
        got = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__
        raise ValueError(f"hidden_states must be [tokens, hidden], got {got}")
    if not isinstance(top_k_index, torch.Tensor) or top_k_index.dim() != 2:
        got = tuple(top_k_index.shape) if isinstance(top_k_index, torch.Tensor) else type(top_k_index).__name__
        raise ValueError(f"top_k_index must be [tokens, k], got {got}")
    if top_k_index.is_floating_point() or top_k_index.is_complex() or top_k_index.dtype == torch.bool:
        raise TypeError(f"top_k_index must hold integer expert ids, got dtype {top_k_index.dtype}")
    if not isinstance(top_k_weights, torch.Tensor) or tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        got = tuple(top_k_weights.shape) if isinstance(top_k_weights, torch.Tensor) else type(top_k_weights).__name__
        raise ValueError(f"top_k_weights must be [tokens, k] = {list(top_k_index.shape)} like top_k_index, got {got}")
    num_experts = self.num_experts
    shard = getattr(self, EXPERT_SHARD, None)
    if shard is None or shard.world_size == 1:
        num_local, world, group_name = num_experts, 1, ""
    else:  # expert parallelism: this rank holds experts moe_rank * num_local ...; the token path exchanges the rows
        num_local, world, group_name = shard.num_expert, shard.world_size, shard.group.group_name
    w_in, b_in, w_out, b_out = _expert_weights(self)
    x = hidden_states
    if x.dtype != w_in.dtype and not _autocast_on(x.device):
        x = x.to(w_in.dtype)  # as transformers' grouped_mm does; under autocast the GEMMs cast
    idx = top_k_index.to(torch.int64)
    idx = torch.where(idx >= num_experts, -1, idx)
    name = debug.name_of(self) if debug.is_debug() else ""
    with debug.raising_non_finite():
        tokens = _TokenDispatch(x, idx, top_k_weights, num_local, world, group_name, 1, True, name)
        offsets = tokens.expert_offsets(0)
        h = ops.grouped_linear(tokens.rows(0), offsets, w_in, b_in)
        gate = _gate_of(self) if self.has_gate else self.act_fn
        if gate is ops.swiglu and b_out is None:
            # Each row's routing score scales its activation inside the swiglu kernel: without a second bias,
            # W2 (s a) = s (W2 a), so the combine only sums, and its backward reads neither the experts' output
            # (the score's gradient comes out of swiglu's backward) nor writes weighted rows.
            y = ops.grouped_linear(ops.swiglu(h, tokens.row_scores(0)), offsets, w_out, None)
            tokens.give(0, y, True)
        else:
            tokens.give(0, ops.grouped_linear(gate(h), offsets, w_out, b_out))
        return tokens.combine().to(hidden_states.dtype)


# Where experts_forward keeps, on an experts module, what its gate was decided from and the decision: see _gate_of.
_SWIGLU_GATE = "_fastmoe_swiglu_gate"


def _default_gate():
    """transformers' default gate function of an experts class (``act_fn(gate) * up`` on the concatenated
    halves), or None where this transformers has none by that name."""
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return None
    return _default_apply_gate


def _gate_of(module: nn.Module):
    """The function between a gated experts module's two GEMMs: fastmoe's :func:`fastmoe.ops.swiglu` (one kernel
    each way on CUDA, only ``[gate | up]`` saved) where the module's ``_apply_gate`` is transformers' default
    (``act_fn(gate) * up`` on the concatenated halves; not overridden by its class or on the instance) and its
    ``act_fn`` computes SiLU; the module's own ``_apply_gate`` otherwise (any other activation or gating a model
    defines). The decision is kept on the module and taken again when ``act_fn``, the gate function or the layout
    changes."""
    gate = module._apply_gate
    act = getattr(module, "act_fn", None)
    key = (act, getattr(gate, "__func__", gate), getattr(module, "is_concatenated", True))
    kept = module.__dict__.get(_SWIGLU_GATE)
    if kept is None or any(a is not b for a, b in zip(kept[0], key, strict=True)):
        from fastmoe.integrations.transformers import _named_activation

        default = _default_gate()
        swiglu = (
            default is not None
            and key[1] is default
            and key[2] is True
            and act is not None
            and _named_activation(act, True) == "swiglu"
        )
        kept = (key, swiglu)
        module.__dict__[_SWIGLU_GATE] = kept
    return ops.swiglu if kept[1] else gate


def register_experts_implementation() -> str:
    """Registers :func:`experts_forward` in transformers' experts interface under ``"fastmoe"`` (once per process;
    again is harmless) and returns that name, so ``from_pretrained(..., experts_implementation="fastmoe")`` and
    ``model.set_experts_implementation("fastmoe")`` work. Raises ``ImportError`` when the installed transformers
    has no experts interface (it came with transformers 5)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as error:
        raise ImportError(
            "fastmoe runs Hugging Face MoE models through transformers' experts interface "
            "(transformers.integrations.moe.ExpertsInterface, transformers >= 5), which cannot be imported: "
            f"{error}"
        ) from error
    ExpertsInterface.register(IMPLEMENTATION, experts_forward)
    return IMPLEMENTATION


def _is_experts_module(module: nn.Module) -> bool:
    """An experts class decorated with transformers' ``use_experts_implementation``: its forward is the
    decorator's dispatcher and the decorator's flags are set on the instance."""
    forward = getattr(type(module), "forward", None)
    return (
        getattr(forward, "__wrapped__", None) is not None
        and all(hasattr(module, flag) for flag in ("has_gate", "has_bias", "is_transposed", "config"))
        and hasattr(module.config, "_experts_implementation")
    )


def _expert_names(module: nn.Module) -> list:
    """The names of the expert tensors of an experts module: the weights, then the biases."""
    names = ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]
    if module.has_bias:
        names += ["gate_up_proj_bias" if module.has_gate else "up_proj_bias", "down_proj_bias"]
    return names


def _layout_problem(module: nn.Module) -> str | None:
    """Why fastmoe cannot run this experts module (None when it can)."""
    num_experts = getattr(module, "num_experts", None)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        return f"it has no positive int num_experts (got {num_experts!r})"
    shard = getattr(module, EXPERT_SHARD, None)
    held = num_experts if shard is None else shard.num_expert  # a block of them when split over ranks
    for name in _expert_names(module):
        tensor = getattr(module, name, None)
        if not isinstance(tensor, torch.Tensor):
            return f"its {name} is {type(tensor).__name__}, not a tensor"
        want = 3 if not name.endswith("_bias") else 2
        if tensor.dim() != want or tensor.shape[0] != held:
            return f"its {name} has shape {list(tensor.shape)}, not [num_experts={held}, ...] with {want} dims"
        if tensor.dtype not in _FLOAT_DTYPES:
            return f"its {name} has dtype {tensor.dtype} (fastmoe's grouped GEMM takes fp64, fp32, bf16 and fp16)"
    return None


def find_hf_experts(model: nn.Module) -> list:
    """The experts modules of ``model`` that dispatch through transformers' experts interface, in module order,
    as ``(path, module)`` pairs (``model`` itself has path ``""``). Raises ``TypeError`` naming ``model`` when it
    is not an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got model of type {type(model).__name__}")
    return [(path, module) for path, module in model.named_modules() if _is_experts_module(module)]


# Routers ------------------------------------------------------------------------------------------------------
# The routers of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE compute, from logits = linear(h, weight), the softmax in
# fp32, its top k, optionally the k probabilities renormalised (norm_topk_prob), and the scores cast back to the
# logits' dtype (Mixtral keeps them fp32). That is fastmoe's route_topk: "topk_softmax" with the renormalisation
# (the k picks' probabilities over their sum are the softmax of the k picked logits), "softmax_topk" without. One
# kernel each way replaces about five forward and eight backward launches, among them torch.topk's.

_HALF_DTYPES = (torch.bfloat16, torch.float16)
_PROBE_TOKENS = 3


class _FusedRouter:
    """The forward of a router that :func:`_router_rule` recognised, as an instance attribute ``forward`` of the
    router (so its hooks, which record ``router_logits`` for the aux loss, still run). In bf16 and fp16, where the
    router computes its softmax in fp32 and rounds the scores to 16 bits, route_topk computes the same in fp32:
    the same experts (where two logits tie for the k-th place, torch.topk's pick is unspecified and route_topk's
    is the lower id) and the same scores up to the rounding of fp32 sums. In fp32 and fp64 the router's own
    forward runs (its fp32 softmax is what those models compute, and route_topk's would be more exact)."""

    def __init__(self, router: nn.Module, score_fn: str, float_scores: bool):
        self.router = router
        self.score_fn = score_fn
        self.float_scores = float_scores  # the router returns fp32 scores (Mixtral), not the logits' dtype

    def __call__(self, hidden_states: torch.Tensor):
        router = self.router
        weight = router.weight
        if _logits_dtype(hidden_states, weight) not in _HALF_DTYPES:
            return type(router).forward(router, hidden_states)
        logits = F.linear(hidden_states.reshape(-1, weight.shape[1]), weight)
        topk_idx, topk_score = ops.route_topk(
            logits.float() if self.float_scores else logits, router.top_k, self.score_fn
        )
        return logits, topk_score, topk_idx


def _logits_dtype(hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden_states.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden_states.dtype, weight.dtype)


def _router_candidates(block: nn.Module, experts: nn.Module) -> list:
    """Children of an MoE block that look like its router: an int ``top_k``, one parameter ``weight [E, H]`` with E
    the experts' count and nothing else (a router with a bias or a score-correction buffer is not one of the
    routers _FusedRouter computes)."""
    found = []
    for router in block.children():
        top_k = getattr(router, "top_k", None)
        if router is experts or isinstance(top_k, bool) or not isinstance(top_k, int):
            continue
        params = dict(router.named_parameters())
        weight = params.get("weight")
        if list(params) != ["weight"] or any(True for _ in router.buffers()) or weight.dim() != 2:
            continue
        if weight.shape[0] == experts.num_experts and 1 <= top_k <= weight.shape[0]:
            found.append(router)
    return found


@torch.no_grad()
def _router_rule(router: nn.Module):
    """``(score_fn, float_scores)`` when the router's own forward, run on a probe, computes what route_topk does;
    None when it does not (another score function, noise, another output). The probe is a shallow copy of the
    router with a weight whose logits are exact in bf16 and 1/16 apart, so there are no ties and each of the two
    score functions gives other scores; it runs in bf16 (where _FusedRouter computes) and fp64, in training and
    eval mode, on the CPU, and leaves the router and the random number generator as they were."""
    num_experts, hidden = router.weight.shape
    if num_experts > 256 or hidden < 2:  # (e + 1) / 16 for e < 256 is exact in bf16
        return None
    rule = None
    with torch.random.fork_rng(devices=[]):
        for dtype in (torch.bfloat16, torch.float64):
            order = torch.arange(1, num_experts + 1, dtype=torch.float64) / 16
            weight = torch.zeros(num_experts, hidden, dtype=torch.float64)
            weight[:, 0] = order
            weight[:, 1] = order[torch.randperm(num_experts, generator=torch.Generator().manual_seed(0))]
            h = torch.zeros(_PROBE_TOKENS, hidden, dtype=torch.float64)
            h[0, 0], h[1, 0], h[2, 1] = 1.0, -1.0, 1.0  # ascending, descending, shuffled logits
            probe = object.__new__(type(router))
            probe.__dict__ = dict(router.__dict__)
            probe._parameters = {"weight": nn.Parameter(weight.to(dtype), requires_grad=False)}
            probe.__dict__.pop("forward", None)
            h = h.to(dtype)
            for training in (True, False):
                probe.training = training
                try:
                    out = type(router).forward(probe, h)
                except Exception:  # noqa: BLE001 - a forward this probe cannot run is not a router fastmoe computes
                    return None
                found = _probe_rule(out, h, probe.weight, router.top_k)
                if found is None or (rule is not None and found != rule):
                    return None
                rule = found
    return rule


def _probe_rule(out, h: torch.Tensor, weight: torch.Tensor, k: int):
    """The (score_fn, float_scores) of route_topk that reproduces a router's probe output, or None."""
    if not isinstance(out, tuple) or len(out) != 3 or not all(isinstance(t, torch.Tensor) for t in out):
        return None
    logits, scores, idx = out
    want_logits = F.linear(h, weight)
    if logits.dtype != want_logits.dtype or logits.shape != want_logits.shape or not torch.equal(logits, want_logits):
        return None
    float_scores = scores.dtype == torch.float32 and logits.dtype != torch.float32
    if not float_scores and scores.dtype != logits.dtype:
        return None
    source = logits.float() if float_scores else logits
    for score_fn in ("topk_softmax", "softmax_topk"):
        got_idx, got_scores = ops.route_topk(source, k, score_fn)
        if idx.shape != got_idx.shape or not torch.equal(idx.to(torch.int64), got_idx):
            continue
        tol = 2.0**-7 if scores.dtype in _HALF_DTYPES else 1e-6  # scores rounded alike from fp32 values
        if torch.allclose(scores.double(), got_scores.double(), rtol=tol, atol=0.0):
            return score_fn, float_scores
    return None


def _fuse_routers(model: nn.Module, experts: list) -> None:
    """Gives every router of an MoE block in ``experts`` that _router_rule recognises fastmoe's forward."""
    modules = dict(model.named_modules())
    for path, module in experts:
        block = modules.get(path.rpartition(".")[0]) if path else None
        if block is None:
            continue
        for router in _router_candidates(block, module):
            if _is_fused(router):
                continue
            rule = _router_rule(router)
            if rule is not None:
                router.forward = _FusedRouter(router, *rule)


def _is_fused(module: nn.Module) -> bool:
    """Whether the module's forward is a _FusedRouter (an instance attribute, over its class's forward)."""
    return isinstance(vars(module).get("forward"), _FusedRouter)


def _unfuse_routers(model: nn.Module) -> None:
    for module in model.modules():
        if _is_fused(module):
            del module.forward


def fused_routers(model: nn.Module) -> list:
    """The paths of the routers of ``model`` whose forward fastmoe computes (route_topk), in module order.

    :func:`use_fastmoe` looks at the children of each MoE block (the parent of an experts module) with an int
    ``top_k`` and one parameter, ``weight [num_experts, hidden]``, and runs each one's own forward on a probe in
    bf16 and fp64, training and eval mode. A router whose logits, ids and scores there are route_topk's
    ``"topk_softmax"`` (softmax, top k, renormalised) or ``"softmax_topk"`` (not renormalised) is fused; any other
    (a bias, sigmoid scores, groups, noise, more than 256 experts) keeps its own forward."""
    return [path for path, m in model.named_modules() if _is_fused(m)]


def _describe(module) -> str:
    kind = type(module)
    return f"{kind.__module__}.{kind.__qualname__}"


def _resolve_group(moe_group):
    """``(group, world size, rank)`` for ``use_fastmoe(model, moe_group=...)``; ``(None, 1, 0)`` for None."""
    if moe_group is None:
        return None, 1, 0
    if _groups.is_device_mesh(moe_group):
        raise NotImplementedError(
            "use_fastmoe(model, moe_group=<DeviceMesh>) is not supported: the experts of a Hugging Face model are "
            "split as plain per-rank tensors over a process group; pass moe_group=mesh.get_group() (for a 2-D mesh, "
            f"mesh['ep'].get_group()), got moe_group={moe_group!r}"
        )
    if dist.is_available() and moe_group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            f"this rank ({dist.get_rank()}) is not in moe_group (torch.distributed.new_group returned "
            f"GroupMember.NON_GROUP_MEMBER, {moe_group!r}, here): call use_fastmoe on the ranks of the group only"
        )
    if not isinstance(moe_group, dist.ProcessGroup):
        raise TypeError(f"moe_group must be a torch.distributed ProcessGroup or None, got moe_group={moe_group!r}")
    world = dist.get_world_size(moe_group)
    group, rank = _groups.resolve_moe_group(world, moe_group)
    return group, world, rank


def _values_digest(module: nn.Module) -> str:
    """A short digest of 16 evenly spaced values of each expert tensor: ranks that built or loaded the model alike
    have the same one (no reduction, so bitwise), and ranks seeded differently almost surely not."""
    pieces = []
    for name in _expert_names(module):
        flat = getattr(module, name).detach().reshape(-1)
        count = min(16, flat.numel())
        index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
        pieces.append(flat[index].double())
    values = torch.cat(pieces).cpu().tolist()
    return hashlib.sha256(repr(values).encode()).hexdigest()[:16]


def _check_same_experts(experts: list, group, world: int) -> None:
    """Every rank of ``group`` holds the same experts modules, of the same shapes, dtypes and values (a collective,
    bounded by FASTMOE_COMM_TIMEOUT): a rank with another model, or built from another seed, makes every rank raise
    ``ValueError`` naming the module and the values."""
    config = {"experts modules": len(experts)}
    for path, module in experts:
        where = path or "<model>"
        config[f"{where}.num_experts"] = module.num_experts
        for name in _expert_names(module):
            tensor = getattr(module, name)
            config[f"{where}.{name}"] = (list(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        config[f"{where} expert values (digest)"] = _values_digest(module)
    what = f"the model of fastmoe.use_fastmoe(model, moe_group=<group of {world} ranks>) (build or load it alike)"
    _groups.check_same_config(group, config, what=what)


@torch.no_grad()
def _keep_block(module: nn.Module, group, world: int, rank: int) -> None:
    """Keeps this rank's contiguous block of the experts of ``module`` as new parameters (the full tensors are
    freed) and records the ExpertShard."""
    num_local = module.num_experts // world
    lo, hi = rank * num_local, (rank + 1) * num_local
    for name in _expert_names(module):
        full = getattr(module, name)
        block = nn.Parameter(full[lo:hi].clone(), requires_grad=full.requires_grad)
        block.dp_comm = "none"  # FastMoE's tag of experts that are not averaged over data-parallel ranks
        setattr(module, name, block)
    setattr(module, EXPERT_SHARD, ExpertShard(num_local, world, rank, group))


def use_fastmoe(model: nn.Module, *, moe_group=None, fuse_routers: bool = True) -> nn.Module:
    """Runs the experts of a Hugging Face MoE model on fastmoe, in place, and returns ``model``.

    Every experts module that dispatches through transformers' experts interface (Mixtral, Qwen2-MoE, Qwen3-MoE,
    OLMoE, DeepSeek-V3, ...) switches its config's ``_experts_implementation`` to ``"fastmoe"``; the
    implementation it had before is kept for :func:`restore_hf`. A router that computes softmax, top k and
    optionally renormalises the k probabilities (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; recognised by running its
    forward on a probe, see :func:`fused_routers`) computes that with fastmoe's ``route_topk`` in bf16 and fp16; the
    other routers, the shared experts and the dense layers run Hugging Face's code, and ``output_router_logits``
    and the aux loss work as before. ``fuse_routers=False`` keeps (or puts back) every router's own forward.
    Calling it again with the same ``moe_group`` is harmless; calling it with a group after ``moe_group=None``
    splits the experts.

    ``moe_group=None`` (one process): the parameters, buffers and state dict are left as they are (the same
    tensors). ``moe_group=g``, a ``torch.distributed`` ProcessGroup of W ranks, splits the experts over them
    (expert parallelism; a collective, every rank of ``g`` calls it on the same model): each experts module keeps
    global experts ``rank * E / W ...`` of its ``E = num_experts`` as new parameters ``[E / W, ...]`` (the full
    tensors are freed), and its forward sends each token to the ranks of its experts and back. Everything else stays
    replicated; train with :class:`fastmoe.DistributedGroupedDataParallel`, which averages the replicated parameters
    and knows these experts, as ``fastmoe.checkpoint`` does. The ranks must hold the same model before the call
    (built from the same seed, or loaded from the same checkpoint); that is checked. Call it before making the
    optimizer. :func:`restore_hf` gathers the experts back.

    Raises ``TypeError`` naming ``model`` for a non-module, ``moe_group`` when it is not a ProcessGroup, or
    ``fuse_routers`` when it is not a bool; ``NotImplementedError`` for a DeviceMesh; ``ValueError`` naming the
    model's class when it has no such experts module (a transformers 4 model, a dense model), or naming the module
    path when an experts module stores its weights in a way fastmoe's grouped GEMM cannot take (quantized weights,
    for example), when W does not divide its expert count, or when it was split over another group; nothing is
    changed then.
    """
    experts = find_hf_experts(model)
    if not isinstance(fuse_routers, bool):
        raise TypeError(f"fuse_routers must be True or False, got fuse_routers={fuse_routers!r}")
    if not experts:
        raise ValueError(
            f"model ({_describe(model)}) has no experts module that dispatches through transformers' experts "
            "interface (a class decorated with transformers.integrations.moe.use_experts_implementation, as the MoE "
            "models of transformers >= 5 have); for a dense model see fastmoe.moefy"
        )
    group, world, rank = _resolve_group(moe_group)
    for path, module in experts:
        where = f"{path or '<model>'} ({_describe(module)})"
        problem = _layout_problem(module)
        if problem is not None:
            raise ValueError(f"cannot run the experts {where} on fastmoe: {problem}")
        shard = getattr(module, EXPERT_SHARD, None)
        if shard is not None and shard.world_size > 1:  # already split: only the same group again is harmless
            if world != shard.world_size or group.group_name != shard.group.group_name:
                wanted = "one process" if world == 1 else f"a group of {world} ranks"
                raise ValueError(
                    f"the experts {where} are split over a group of {shard.world_size} ranks; call "
                    f"fastmoe.restore_hf(model) before use_fastmoe with moe_group={moe_group!r} ({wanted})"
                )
    # the modules that hold all their experts (not yet on fastmoe, or on one process)
    to_split = [(p, m) for p, m in experts if getattr(getattr(m, EXPERT_SHARD, None), "world_size", 1) == 1]
    if world > 1 and to_split:
        for path, module in to_split:
            names = set(_expert_names(module))
            others = [n for n, _ in module.named_parameters() if n not in names]
            others += [n for n, _ in module.named_buffers() if n not in names]
            if others:
                raise ValueError(
                    f"cannot split the experts {path or '<model>'} ({_describe(module)}) over moe_group: it holds "
                    f"{others} besides its expert tensors {sorted(names)}"
                )
        _check_same_experts(to_split, group, world)
        for path, module in to_split:
            if module.num_experts % world:
                raise ValueError(
                    f"cannot split the experts {path or '<model>'} ({_describe(module)}) over moe_group: its "
                    f"num_experts={module.num_experts} is not a multiple of the group's {world} ranks"
                )
    register_experts_implementation()
    for _, module in to_split:
        if world > 1:
            _keep_block(module, group, world, rank)
        else:
            setattr(module, EXPERT_SHARD, ExpertShard(module.num_experts))
    for _, module in experts:
        current = module.config._experts_implementation
        if current != IMPLEMENTATION:
            setattr(module, _PREVIOUS, current)
    # The configs are shared (every layer's experts hold the model's config), so switch each once, after every
    # module has recorded what its config had.
    for _, module in experts:
        module.config._experts_implementation_internal = IMPLEMENTATION
    if fuse_routers:
        _fuse_routers(model, experts)
    else:
        _unfuse_routers(model)
    return model


@torch.no_grad()
def _gather_experts(path: str, module: nn.Module, shard: ExpertShard) -> None:
    """Replaces the block of experts this rank holds by the full tensors, gathered from the ranks of the shard's
    group (each all_gather bounded by FASTMOE_COMM_TIMEOUT)."""
    device = _groups._object_device(shard.group)  # where the group's backend takes tensors (gloo: the CPU)
    for name in _expert_names(module):
        block = getattr(module, name)
        local = block.detach().to(device).contiguous()
        pieces = [torch.empty_like(local) for _ in range(shard.world_size)]
        work = dist.all_gather(pieces, local, group=shard.group, async_op=True)
        _groups._wait(work, f"all_gather of {path}.{name} (fastmoe.restore_hf)", shard.group)
        full = torch.cat(pieces).to(block.device)
        setattr(module, name, nn.Parameter(full, requires_grad=block.requires_grad))


def restore_hf(model: nn.Module) -> nn.Module:
    """Undoes :func:`use_fastmoe`, in place, and returns ``model``: every experts module running on fastmoe goes
    back to the implementation it had before (transformers' default, ``"grouped_mm"``, for a model loaded with
    ``experts_implementation="fastmoe"``). On one process the weights were never copied, so the state dict is the
    one the model has now, trained or not: ``save_pretrained`` writes a checkpoint that transformers loads without
    fastmoe. The routers run their own forward again. After ``use_fastmoe(model, moe_group=g)`` it is a
    collective over ``g``: every rank gets the full experts back (all-gathered, as new parameters), so rank 0 can
    ``save_pretrained``.

    Raises ``TypeError`` naming ``model`` for a non-module and ``ValueError`` naming its class when none of its
    experts modules runs on fastmoe."""
    converted = [
        (p, m)
        for p, m in find_hf_experts(model)
        if m.config._experts_implementation == IMPLEMENTATION or hasattr(m, EXPERT_SHARD)
    ]
    if not converted:
        raise ValueError(
            f"model ({_describe(model)}) has no experts module running on fastmoe (call fastmoe.use_fastmoe(model) "
            "first)"
        )
    for path, module in converted:
        shard = getattr(module, EXPERT_SHARD, None)
        if shard is not None and shard.world_size > 1:
            _gather_experts(path or "<model>", module, shard)
    previous = [getattr(module, _PREVIOUS, _HF_DEFAULT) for _, module in converted]
    for (_, module), implementation in zip(converted, previous, strict=True):
        if module.config._experts_implementation == IMPLEMENTATION:
            module.config._experts_implementation_internal = implementation
        for attribute in (_PREVIOUS, EXPERT_SHARD):
            if hasattr(module, attribute):
                delattr(module, attribute)
    _unfuse_routers(model)
    return model
