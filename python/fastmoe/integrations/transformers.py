"""Sparse upcycling: the dense feed-forward (FFN) blocks of a Transformer become fastmoe MoE layers whose experts
all start as copies of the dense FFN (docs/integrations.md).

FFN blocks are found by their module structure, so no import of Hugging Face ``transformers`` is needed:

- **gated** (Llama, Qwen2, Mistral, ...): children ``gate_proj``, ``up_proj`` (``[d_hidden, d_model]``) and
  ``down_proj`` (``[d_model, d_hidden]``), each an ``nn.Linear``, and an activation ``act_fn``; the block computes
  ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``;
- **two-layer** (GPT-2): children ``c_fc`` and ``c_proj``, each an ``nn.Linear`` or a ``Conv1D`` (a linear layer
  that keeps its weight transposed, ``[in, out]``, and says so in its ``nx``/``nf`` attributes), an activation
  ``act`` and optionally a ``dropout``; the block computes ``dropout(c_proj(act(c_fc(x))))``.

Each block found is checked numerically before it is replaced: its own forward on a small fixed input must equal
the formula above computed from its weights, so a block that has these names but computes something else is
refused, not silently changed.
"""

import copy
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from fastmoe import _rng
from fastmoe.layers import FMoE
from fastmoe.transformer import FMoETransformerMLP

__all__ = ["FFN_NAMES", "UpcycledExperts", "UpcycledMLP", "find_ffn_blocks", "moefy"]

# Child names under which a Transformer layer keeps its FFN. A module under one of these names that moefy cannot
# convert is reported as an FFN it cannot convert (not silently left dense); one found by its structure under any
# other name is converted all the same.
FFN_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block")

_GATED = ("gate_proj", "up_proj", "down_proj")
_TWO_LAYER = ("c_fc", "c_proj")
# Arguments of the MoE layer that moefy takes from the dense block, not from the caller.
_FROM_THE_BLOCK = ("d_model", "d_hidden", "activation", "bias", "expert")


class _Upcycled:
    """What the upcycled layers add to their fastmoe base class: the dense block's dropout after the combine
    (``None`` when the block had none) and ``upcycled_from``, the qualified class name of the replaced block."""

    def _init_upcycled(self, dropout: nn.Module | None, upcycled_from: str) -> None:
        self.dropout = dropout
        self.upcycled_from = upcycled_from

    def forward(self, inp):
        out = super().forward(inp)
        return out if self.dropout is None else self.dropout(out)


class UpcycledMLP(_Upcycled, FMoETransformerMLP):
    """An :class:`fastmoe.FMoETransformerMLP` (fused experts) made by :func:`moefy` from a dense FFN block, plus
    that block's dropout (``self.dropout``, ``None`` if it had none) applied to the layer's output. Input and
    output ``[..., d_model]``."""

    def __init__(self, *args, dropout: nn.Module | None = None, upcycled_from: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_upcycled(dropout, upcycled_from)


class UpcycledExperts(_Upcycled, FMoE):
    """An :class:`fastmoe.FMoE` whose experts are copies of a dense FFN block, for the blocks whose shape the fused
    :class:`fastmoe.FMoETransformerMLP` cannot hold (a gated FFN with an activation other than SiLU). The experts
    run one after the other (``FMoE``'s per-expert loop)."""

    def __init__(self, *args, dropout: nn.Module | None = None, upcycled_from: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_upcycled(dropout, upcycled_from)


class _Spec:
    """A dense FFN block as moefy reads it: ``ins``, the first linear layer as ``(weight [d_hidden, d_model], bias
    or None)`` pairs (gated: the gate projection, then the up projection), ``out = (weight [d_model, d_hidden],
    bias or None)``, the activation as the block applies it, and the dropout after the second linear layer.
    Weights are views of the block's own (nothing is copied until the experts are filled)."""

    def __init__(self, kind, d_model, d_hidden, ins, out, act, dropout):
        self.kind, self.d_model, self.d_hidden = kind, d_model, d_hidden
        self.ins, self.out, self.act, self.dropout = ins, out, act, dropout

    @property
    def gated(self) -> bool:
        return self.kind == "gated"

    @property
    def weight(self) -> torch.Tensor:
        return self.ins[0][0]

    @property
    def has_bias(self) -> bool:
        return any(b is not None for _, b in self.ins) or self.out[1] is not None

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The block's formula on ``x [N, d_model]``, in plain torch, with dropout as in eval."""
        hs = [F.linear(x, w, b) for w, b in self.ins]
        h = self.act(hs[0]) * hs[1] if self.gated else self.act(hs[0])
        return F.linear(h, *self.out)


class _Block:
    """One FFN block of a model: where it is, and either its ``_Spec``, or why it cannot be converted, or that it
    already is a fastmoe MoE layer."""

    def __init__(self, path: str, parent: nn.Module, name: str, module: nn.Module, spec=None, reason=None):
        self.path, self.parent, self.name, self.module = path, parent, name, module
        self.spec, self.reason = spec, reason

    @property
    def is_moe(self) -> bool:
        return isinstance(self.module, FMoE)


def _describe(module) -> str:
    kind = type(module)
    return f"{kind.__module__}.{kind.__qualname__}"


def _linear_like(module):
    """``(weight [out, in], bias or None)`` of an ``nn.Linear`` or of a ``Conv1D`` (weight ``[nx, nf]`` = ``[in,
    out]``, read transposed), else None."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    nf, nx = getattr(module, "nf", None), getattr(module, "nx", None)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if (
        isinstance(nf, int)
        and isinstance(nx, int)
        and isinstance(weight, torch.Tensor)
        and tuple(weight.shape) == (nx, nf)
        and (bias is None or (isinstance(bias, torch.Tensor) and tuple(bias.shape) == (nf,)))
    ):
        return weight.t(), bias
    return None


def _child_summary(module: nn.Module) -> str:
    children = [f"{name} ({type(child).__name__})" for name, child in module.named_children()]
    return ", ".join(children) or "no children"


_SUPPORTED = (
    "moefy converts gated FFNs (gate_proj, up_proj, down_proj: nn.Linear, and act_fn; Llama, Qwen2) and two-layer "
    "FFNs (c_fc, c_proj: nn.Linear or Conv1D, act and an optional dropout; GPT-2)"
)


def _recognise(module: nn.Module):
    """``(spec, None)`` for a block moefy converts, ``(None, reason)`` for a module that has the names of one but
    does not fit, ``(None, None)`` for any other module."""
    names = dict(module.named_children())
    # A layout is recognised by all of its linear layers' names (GPT-2's attention has a c_proj too).
    if all(hasattr(module, n) for n in _GATED):
        layout, linears, act_name, allowed = "gated", _GATED, "act_fn", set(_GATED) | {"act_fn"}
    elif all(hasattr(module, n) for n in _TWO_LAYER):
        layout, linears, act_name, allowed = "two_layer", _TWO_LAYER, "act", set(_TWO_LAYER) | {"act", "dropout"}
    else:
        return None, None
    found = {}
    for name in linears:
        child = getattr(module, name, None)
        read = _linear_like(child) if isinstance(child, nn.Module) else None
        if read is None:
            what = "missing" if child is None else type(child).__name__
            return None, f"its {name} must be an nn.Linear or a Conv1D, got {what}"
        found[name] = read
    act = getattr(module, act_name, None)
    if not callable(act):
        return None, f"it has no callable activation {act_name} (got {type(act).__name__})"
    extra = sorted(set(names) - allowed)
    if extra:
        return None, f"it has children moefy does not know where to place: {extra}"
    dropout = names.get("dropout")
    if dropout is not None and not isinstance(dropout, nn.Dropout):
        return None, f"its dropout must be an nn.Dropout, got {type(dropout).__name__}"
    if layout == "gated":
        (w_gate, b_gate), (w_up, b_up), (w_out, b_out) = (found[n] for n in _GATED)
        d_hidden, d_model = w_gate.shape
        if tuple(w_up.shape) != (d_hidden, d_model) or tuple(w_out.shape) != (d_model, d_hidden):
            return None, (
                f"its shapes do not form an FFN: gate_proj {list(w_gate.shape)}, up_proj {list(w_up.shape)}, "
                f"down_proj {list(w_out.shape)} (as [out, in])"
            )
        ins = [(w_gate, b_gate), (w_up, b_up)]
    else:
        (w_in, b_in), (w_out, b_out) = found["c_fc"], found["c_proj"]
        d_hidden, d_model = w_in.shape
        if tuple(w_out.shape) != (d_model, d_hidden):
            return None, (
                f"its shapes do not form an FFN: c_fc {list(w_in.shape)}, c_proj {list(w_out.shape)} (as [out, in])"
            )
        ins = [(w_in, b_in)]
    known = {id(p) for name in linears for p in getattr(module, name).parameters()}
    stray = [name for name, p in module.named_parameters() if id(p) not in known]
    unknown = sorted(name for name in stray if not name.startswith(act_name + "."))
    if unknown:
        return None, f"it has parameters moefy does not know where to place: {unknown}"
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    ins = [(detach(w), detach(b)) for w, b in ins]
    return _Spec(layout, d_model, d_hidden, ins, (detach(w_out), detach(b_out)), act, dropout), None


def _walk(module: nn.Module, prefix: str, blocks: list) -> None:
    for name, child in module.named_children():
        path = prefix + name
        if isinstance(child, FMoE):
            blocks.append(_Block(path, module, name, child))
            continue
        spec, reason = _recognise(child)
        if spec is not None or reason is not None:
            blocks.append(_Block(path, module, name, child, spec=spec, reason=reason))
            continue
        if name in FFN_NAMES:
            reason = f"it has {_child_summary(child)}"
            blocks.append(_Block(path, module, name, child, reason=reason))
            continue
        _walk(child, path + ".", blocks)


def _find_blocks(model: nn.Module) -> list:
    blocks: list = []
    _walk(model, "", blocks)
    return blocks


def find_ffn_blocks(model: nn.Module) -> list:
    """The FFN blocks of ``model`` in module order, as ``(index, path, status)``: ``status`` is ``"dense"`` (moefy
    converts it), ``"moe"`` (already a fastmoe MoE layer) or ``"unsupported: <why>"``. ``index`` is what
    ``moefy(layers=...)`` takes: for the usual decoder the FFN of layer i has index i."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    out = []
    for index, block in enumerate(_find_blocks(model)):
        status = "moe" if block.is_moe else "dense" if block.spec is not None else f"unsupported: {block.reason}"
        out.append((index, block.path, status))
    return out


# ----------------------------------------------------------------------------------------------- checks


def _tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the block check: the block's own forward and the formula run the same math in
    another order (a fused addmm against a linear), so they differ by rounding only."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-4
    return 3e-2


def _check_block(block: _Block) -> None:
    """Runs the block on a fixed small input (its own generator, so the caller's random streams are left alone)
    and compares it with the formula moefy will give the experts."""
    spec = block.spec
    weight = spec.weight
    if weight.device.type == "meta" or not weight.is_floating_point():
        return
    probe = torch.randn(1, 7, spec.d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probe = probe.to(device=weight.device, dtype=weight.dtype)
    module = block.module
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            try:
                got = module(probe)
            except Exception as error:  # noqa: BLE001 - reported with the block's path below
                raise ValueError(
                    f"cannot convert {block.path} ({_describe(module)}): its forward failed on a [1, 7, "
                    f"{spec.d_model}] input: {type(error).__name__}: {error}"
                ) from error
            want = spec.reference(probe[0])
    finally:
        module.train(was_training)
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != (1, 7, spec.d_model):
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise ValueError(
            f"cannot convert {block.path} ({_describe(module)}): it returned {shape} for a [1, 7, {spec.d_model}] "
            f"input, but moefy's layer returns the input's shape"
        )
    err = (got[0].double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)
    if not err <= _tolerance(weight.dtype):
        formula = "down_proj(act_fn(gate_proj(x)) * up_proj(x))" if spec.gated else "dropout(c_proj(act(c_fc(x))))"
        raise ValueError(
            f"cannot convert {block.path} ({_describe(module)}): it has the structure of a {spec.kind} FFN but does "
            f"not compute {formula} (relative difference {float(err):.3g} on a test input)"
        )


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    return value


def _noise(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"noise must be a finite number >= 0 (relative noise per weight), got noise={value!r}")
    return float(value)


def _choose(blocks: list, layers, every: int) -> list:
    """The indices into ``blocks`` that ``layers``/``every`` select."""
    count = len(blocks)
    if layers is None:
        if every == 1:
            return list(range(count))
        return [i for i in range(count) if (i + 1) % every == 0]
    if every != 1:
        raise ValueError(f"pass layers= or every=, not both; got layers={layers!r} and every={every!r}")
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"layers must be a list of FFN block indices, got layers={layers!r}")
    chosen = []
    listing = ", ".join(f"{i}: {b.path}" for i, b in enumerate(blocks))
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"layers must hold ints (FFN block indices), got {index!r} in layers={layers!r}")
        if not -count <= index < count:
            raise ValueError(
                f"layers has {index}, but the model has {count} FFN blocks ({listing}); an index must be in "
                f"[{-count}, {count})"
            )
        index %= count
        if index in chosen:
            raise ValueError(f"layers names FFN block {index} ({blocks[index].path}) twice: layers={layers!r}")
        chosen.append(index)
    return sorted(chosen)


# ----------------------------------------------------------------------------------------------- building


def _named_activation(act, gated: bool):
    """The activation argument of FMoETransformerMLP that computes what ``act`` computes: a name where ``act``
    gives the same bits as fastmoe's named activation on a test vector (so the named path changes nothing), else
    a copy of ``act`` itself. For a gated block only SiLU has a fused form ("swiglu"); None then means the fused
    layer cannot hold the block."""
    candidates = {"silu": F.silu} if gated else {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
    has_params = isinstance(act, nn.Module) and any(True for _ in act.parameters())
    if not has_params:  # an activation with parameters is not one of the named ones
        t = torch.linspace(-8.0, 8.0, 129, dtype=torch.float32)
        with torch.no_grad():
            try:
                got = act(t)
            except Exception:  # noqa: BLE001 - an activation that cannot run on a CPU vector is kept as it is
                got = None
        if isinstance(got, torch.Tensor) and got.shape == t.shape and got.dtype == t.dtype:
            for name, fn in candidates.items():
                if torch.equal(got, fn(t)):
                    return "swiglu" if gated else name
    if gated:
        return None
    return copy.deepcopy(act) if isinstance(act, nn.Module) else act


def _noise_generator(layer_seed: int, global_expert: int) -> torch.Generator:
    """The CPU stream of one global expert of one converted block (fastmoe's per-expert seeding, fastmoe._rng)."""
    return torch.Generator().manual_seed(_rng.expert_seed(layer_seed, global_expert))


def _perturb_(tensor: torch.Tensor, noise: float, generator: torch.Generator) -> None:
    """``tensor *= 1 + noise * eps`` with ``eps ~ N(0, 1)`` drawn in fp32 on the CPU from ``generator`` (so the
    values do not depend on the device or dtype of the model)."""
    eps = torch.randn(tuple(tensor.shape), generator=generator, dtype=torch.float32)
    tensor.mul_(1 + noise * eps.to(device=tensor.device, dtype=tensor.dtype))


def _copy_or_zero_(target: torch.Tensor, source) -> None:
    if source is None:
        target.zero_()
    else:
        target.copy_(source)


def _fill_fused_(layer: UpcycledMLP, spec: _Spec, first: int, noise: float, layer_seed) -> None:
    """Copies the block into every local expert of the fused layer (``htoh4 [E, rows, d_model]``: the gate rows,
    then the up rows; ``h4toh [E, d_model, d_hidden]``), zeros for a bias the block lacks, then the noise."""
    experts = layer.experts
    w1, b1, w2, b2 = experts.htoh4.weight, experts.htoh4.bias, experts.h4toh.weight, experts.h4toh.bias
    rows = spec.d_hidden
    for e in range(layer.num_expert):
        for part, (w, b) in enumerate(spec.ins):
            w1[e, part * rows : (part + 1) * rows].copy_(w)
            if b1 is not None:
                _copy_or_zero_(b1[e, part * rows : (part + 1) * rows], b)
        w2[e].copy_(spec.out[0])
        if b2 is not None:
            _copy_or_zero_(b2[e], spec.out[1])
        if layer_seed is not None:
            generator = _noise_generator(layer_seed, first + e)
            for tensor in (w1, b1, w2, b2):
                if tensor is not None:
                    _perturb_(tensor[e], noise, generator)


def _build(block: _Block, num_expert: int, noise: float, layer_kwargs: dict) -> nn.Module:
    """The MoE layer for one block: built on the block's device, cast to its dtype, filled with its copies."""
    spec = block.spec
    weight = spec.weight
    activation = _named_activation(spec.act, spec.gated)
    dropout = copy.deepcopy(spec.dropout)
    origin = _describe(block.module)
    with torch.device(weight.device):
        if activation is not None:
            layer = UpcycledMLP(
                num_expert=num_expert,
                d_model=spec.d_model,
                d_hidden=spec.d_hidden,
                activation=activation,
                bias=spec.has_bias,
                dropout=dropout,
                upcycled_from=origin,
                **layer_kwargs,
            )
        else:
            template = block.module
            layer = UpcycledExperts(
                num_expert=num_expert,
                d_model=spec.d_model,
                expert=lambda d_model: copy.deepcopy(template),
                dropout=dropout,
                upcycled_from=origin,
                **layer_kwargs,
            )
    layer.to(device=weight.device, dtype=weight.dtype)
    layer.train(block.module.training)
    first = layer.moe_rank * num_expert
    # Drawn only when needed, so noise=0 leaves the caller's random streams as the layer's construction left them.
    layer_seed = _rng.draw_base_seed() if noise > 0 else None
    trainable = any(p.requires_grad for p in block.module.parameters())
    with torch.no_grad():
        if activation is not None:
            _fill_fused_(layer, spec, first, noise, layer_seed)
            expert_params = list(layer.experts.parameters())
        else:
            # the experts are copies of the block already; only the noise is left to add
            if layer_seed is not None:
                for e, expert in enumerate(layer.experts):
                    generator = _noise_generator(layer_seed, first + e)
                    for param in expert.parameters():
                        _perturb_(param, noise, generator)
            expert_params = list(layer.experts.parameters())
    for param in expert_params:
        param.requires_grad_(trainable)
    return layer


def _layer_kwargs(top_k, gate, world_size, moe_group, extra: dict) -> dict:
    for name in _FROM_THE_BLOCK:
        if name in extra:
            raise TypeError(
                f"moefy takes {name} from each dense FFN block (the experts are its copies), got {name}={extra[name]!r}"
            )
    if isinstance(gate, nn.Module):
        raise TypeError(
            f"gate must be a gate class or a callable that builds one (each MoE layer gets its own gate), got the "
            f"instance gate={gate!r}"
        )
    if gate is not None and not callable(gate):
        raise TypeError(f"gate must be a gate class or a callable that builds one, got gate={gate!r}")
    kwargs = dict(extra)
    kwargs.update(top_k=top_k, world_size=world_size, moe_group=moe_group)
    if gate is not None:
        kwargs["gate"] = gate
    return kwargs


def moefy(
    model: nn.Module,
    num_expert: int,
    top_k: int = 2,
    gate=None,
    layers=None,
    every: int = 1,
    noise: float = 0.0,
    world_size: int = 1,
    moe_group=None,
    **layer_kwargs,
) -> nn.Module:
    """Replaces dense FFN blocks of ``model`` with fastmoe MoE layers whose experts are copies of the block
    (sparse upcycling), in place, and returns ``model``.

    Args:
        model: any ``nn.Module``; its FFN blocks are found by structure (module docstring, docs/integrations.md).
        num_expert: experts per rank (the global count is ``num_expert * world_size``), each a copy of the block.
        top_k: experts per token.
        gate: a gate class (or callable) built per layer as ``gate(d_model, num_expert, world_size, top_k)``;
            ``None`` is :class:`fastmoe.gates.NaiveGate`. The router is freshly initialised (random, from the
            default generators), as in sparse upcycling.
        layers: indices of the FFN blocks to convert (in module order: the FFN of decoder layer i has index i;
            negative indices count from the end), or ``None`` for all of them.
        every: convert every n-th block, block i when ``(i + 1) % every == 0`` (as ``fastmoe-train --moe-every``).
            Not together with ``layers``.
        noise: 0 gives exact copies. Above 0 every expert tensor is multiplied elementwise by ``1 + noise * eps``,
            ``eps ~ N(0, 1)``: one seed per converted block is drawn from torch's default CPU generator (so
            ``torch.manual_seed`` makes it reproducible), then global expert g draws from its own stream of that
            seed, in fp32 on the CPU. The values do not depend on the device, the dtype or the expert-parallel
            split.
        world_size, moe_group: expert parallelism, passed to the layer (``fastmoe.FMoE``): this rank keeps global
            experts ``rank * num_expert ...`` of the copies. Every rank must call moefy on the same dense model
            with the same default-generator state (so the routers, and the noise, agree).
        **layer_kwargs: other arguments of :class:`fastmoe.FMoETransformerMLP` / :class:`fastmoe.FMoE`
            (``gate_bias``, ``ep_chunks``, ``gate_hook``, ``expert_dp_comm``); not ``d_model``, ``d_hidden``,
            ``activation``, ``bias``, which come from the block.

    Each converted block becomes an :class:`UpcycledMLP` (fused experts; SwiGLU for a gated block with SiLU)
    or, for a gated block with another activation, an :class:`UpcycledExperts` (a per-expert loop over copies of
    the block), at the block's place in the module tree, on its device and in its dtype, in its training mode and
    with its ``requires_grad``. A block's dropout (GPT-2) is kept, after the experts' combine.

    At initialisation (``noise=0``) every expert computes the dense block, so the layer's output is
    ``sum_k score_k * dense(x)``: it equals the dense block wherever the gate's scores of a token sum to 1 and no
    slot is dropped (NaiveGate, NoisyGate, SigmoidGate with its defaults, SwipeGate in eval, ZeroGate; see
    docs/integrations.md for the others).

    Raises ``ValueError`` / ``TypeError`` naming the argument and its value for bad arguments, and naming the
    module path and type for a chosen block it cannot convert. Blocks that already are fastmoe MoE layers are
    left alone (an error when ``layers`` names one).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got model of type {type(model).__name__}")
    _positive_int("num_expert", num_expert)
    _positive_int("world_size", world_size)
    _positive_int("every", every)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_expert * world_size:
        raise ValueError(
            f"top_k must be an int in [1, num_expert * world_size = {num_expert * world_size}], got top_k={top_k!r}"
        )
    return _upcycle(
        model, num_expert, layers, every, noise, _layer_kwargs(top_k, gate, world_size, moe_group, layer_kwargs)
    )


def _upcycle(model, num_expert, layers, every, noise, kwargs, expect_d_hidden=None) -> nn.Module:
    """moefy after its argument checks; ``expect_d_hidden`` is fmoefy's ``hidden_hidden_size``."""
    noise = _noise(noise)
    blocks = _find_blocks(model)
    if not blocks:
        raise ValueError(
            f"found no FFN block in the model ({_describe(model)}): {_SUPPORTED}, found by those child names or "
            f"under a child named one of {list(FFN_NAMES)}"
        )
    chosen = _choose(blocks, layers, every)
    todo = []
    seen = {}
    for index in chosen:
        block = blocks[index]
        if block.is_moe:
            if layers is not None:
                raise ValueError(
                    f"layers names FFN block {index} ({block.path}), which already is a fastmoe MoE layer "
                    f"({type(block.module).__name__})"
                )
            continue
        if block.spec is None:
            raise ValueError(
                f"cannot convert the FFN block {block.path} ({_describe(block.module)}): {block.reason}. "
                f"{_SUPPORTED}. Choose other blocks with layers= or every="
            )
        if id(block.module) in seen:
            raise ValueError(
                f"{block.path} and {seen[id(block.module)]} are the same module ({_describe(block.module)}); moefy "
                f"converts each FFN block once, so it cannot convert a block shared between layers"
            )
        seen[id(block.module)] = block.path
        if expect_d_hidden is not None and expect_d_hidden != block.spec.d_hidden:
            raise ValueError(
                f"hidden_hidden_size={expect_d_hidden}, but {block.path} ({_describe(block.module)}) has d_hidden="
                f"{block.spec.d_hidden}: the experts are copies of the dense FFN, so they keep its width"
            )
        _check_block(block)
        todo.append(block)
    # Every block is checked before the first is replaced, so an error leaves the model as it was.
    for block in todo:
        setattr(block.parent, block.name, _build(block, num_expert, noise, kwargs))
    return model
