import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

from fastmoe import _checks, debug, ops
from fastmoe.gates import NaiveGate
from fastmoe.layers import FMoE
from fastmoe.linear import FMoELinear

_NAMED_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``h [N, 2 * d_hidden]`` = ``[gate | up]`` -> ``silu(gate) * up`` ``[N, d_hidden]`` (the op
    :func:`fastmoe.ops.swiglu`: one kernel each way on CUDA)."""
    return ops.swiglu(h)


class _Expert(nn.Module):
    """All experts of one rank fused: ``h4toh(act(htoh4(x)))`` as two grouped GEMMs.

    With ``activation="swiglu"`` ``htoh4`` is ``[E, 2 * d_hidden, d_model]`` (gate rows first, then up rows).
    ``rank`` (the rank in the expert-parallel group) makes local expert ``e`` global expert ``rank * E + e`` for
    the initialisation (``FMoELinear``).
    """

    def __init__(
        self, num_expert: int, d_model: int, d_hidden: int, activation, bias: bool = True, rank: int = 0, ep_mesh=None
    ):
        super().__init__()
        self.gated = activation == "swiglu"
        if isinstance(activation, str):
            if activation == "swiglu":
                self.activation = swiglu
            elif activation in _NAMED_ACTIVATIONS:
                self.activation = _NAMED_ACTIVATIONS[activation]
            else:
                raise ValueError(
                    f"activation must be a callable or one of {sorted(_NAMED_ACTIVATIONS) + ['swiglu']}, "
                    f"got {activation!r}"
                )
        elif callable(activation):
            self.activation = activation
        else:
            raise TypeError(f"activation must be a callable or a name, got {activation!r}")
        hidden_out = 2 * d_hidden if self.gated else d_hidden
        self.htoh4 = FMoELinear(num_expert, d_model, hidden_out, bias=bias, rank=rank, ep_mesh=ep_mesh)
        self.h4toh = FMoELinear(num_expert, d_hidden, d_model, bias=bias, rank=rank, ep_mesh=ep_mesh)

    @property
    def takes_scores(self) -> bool:
        """Whether :meth:`forward` can apply the routing scores itself (``scores``): SwiGLU without a bias in
        ``h4toh``, where ``W2 (s a) = s (W2 a)``, so the scores scale the activation inside the swiglu kernel and the
        layer's combine only sums."""
        return self.activation is swiglu and self.h4toh.bias is None

    def forward(
        self, inp: torch.Tensor, fwd_expert_count: torch.Tensor, expert_offsets=None, scores=None
    ) -> torch.Tensor:
        """``scores [N]``: each row's routing score, applied in the activation (only where :attr:`takes_scores`)."""
        if expert_offsets is None:
            expert_offsets = ops.counts_to_offsets(fwd_expert_count.to(device=inp.device, dtype=torch.int64))
        h = self.htoh4(inp, expert_offsets=expert_offsets)
        if scores is None:
            h = self.activation(h)
        elif self.takes_scores:
            h = ops.swiglu(h, scores)
        else:
            raise ValueError(
                "scores are applied only by SwiGLU experts without a bias in h4toh; these experts have activation "
                f"{getattr(self.activation, '__name__', self.activation)!r} and h4toh.bias "
                f"{'set' if self.h4toh.bias is not None else 'None'}"
            )
        return self.h4toh(h, expert_offsets=expert_offsets)


class FMoETransformerMLP(FMoE):
    """The Transformer FFN as an MoE layer with fused experts (FastMoE's ``FMoETransformerMLP``).

    Input ``[..., d_model]``, output of the same shape. Parameters live in ``self.experts.htoh4`` (weight
    ``[E, d_hidden, d_model]``) and ``self.experts.h4toh`` (weight ``[E, d_model, d_hidden]``), each an
    ``FMoELinear``. ``activation`` is a callable (default GELU), ``"gelu"``, ``"relu"``, ``"silu"`` or
    ``"swiglu"`` (gated: ``htoh4`` then has ``2 * d_hidden`` rows per expert). Each global expert's weights come
    from its own random stream (``FMoELinear``), so with ``world_size=W`` the ranks' experts together equal those
    of the one-rank layer with ``num_expert * W`` experts built from the same seed. With ``moe_group`` a 1-D
    ``DeviceMesh`` the expert weights are DTensors of global shape ``[num_expert * W, ...]`` sharded over the
    experts (``FMoELinear``'s ``ep_mesh``). Other keyword arguments
    (``top_k``, ``gate``, ``world_size``, ``gate_hook``, ...) go to :class:`fastmoe.FMoE`.
    """

    def __init__(
        self,
        num_expert: int = 32,
        d_model: int = 1024,
        d_hidden: int = 4096,
        activation=None,
        expert_dp_comm: str = "none",
        expert_rank: int = 0,
        bias: bool = True,
        **kwargs,
    ):
        super().__init__(num_expert=num_expert, d_model=d_model, **kwargs)
        self.d_hidden = _checks.positive_int("d_hidden", d_hidden)
        # Global expert ids, not local ones, pick the experts' random streams: every rank's experts differ and the
        # layer starts equal to the one-rank layer of num_expert * world_size experts built from the same seed.
        self.experts = _Expert(
            num_expert,
            d_model,
            d_hidden,
            activation if activation is not None else F.gelu,
            bias,
            rank=self.moe_rank,
            ep_mesh=self.moe_mesh,  # a DeviceMesh moe_group: the experts are DTensors sharded over it
        )
        self.experts_fused = True
        self.expert_dp_comm = expert_dp_comm
        self.mark_parallel_comm(expert_dp_comm)

    expert_input_follows_autocast = True  # the experts start with a grouped GEMM, which follows autocast

    # Whether a forward the op fastmoe::moe_ffn covers runs as that one op (one autograd node, the same values bit for
    # bit; docs/ops.md): one process, the built-in NaiveGate and experts with a named activation, nothing hooked. Set
    # it to False to run the composed token path always.
    fused_forward = True

    # What the one op keeps between the forward and the backward: the activation between the experts' GEMMs
    # (tokens * top_k * d_hidden values), freed in the backward once the second GEMM's has read it. True recomputes
    # it in the backward instead (one more elementwise pass; one under 32 MiB is kept all the same), for less memory
    # held across a model's layers. The composed path keeps it, as autograd does.
    recompute_activation = False

    def expert_fn(self, inp, fwd_expert_count, expert_offsets=None):
        return self.experts(inp, fwd_expert_count, expert_offsets)

    def _scored_experts(self) -> bool:
        # The built-in experts with SwiGLU and no second bias apply the routing scores in the activation (as
        # fastmoe::moe_ffn does), unless expert_fn is overridden.
        experts = getattr(self, "experts", None)
        return (
            type(self).expert_fn is FMoETransformerMLP.expert_fn
            and type(experts) is _Expert
            and experts.takes_scores
            and self._io_structure is None
        )

    def _run_scored(self, rows, counts, offsets, scores):
        return self.experts(rows, counts, offsets, scores)

    def forward(self, inp):
        activation = self._fused_activation(inp)
        if activation is None:
            return super().forward(inp)
        gate, experts = self.gate, self.experts
        x = _checks.token_matrix("inp", inp, self.d_model, like=gate.gate.weight)
        gate.reset_stats()
        y, balance, z_loss, counts = torch.ops.fastmoe.moe_ffn(
            x,
            gate.gate.weight,
            gate.gate.bias,
            experts.htoh4.weight,
            experts.htoh4.bias,
            experts.h4toh.weight,
            experts.h4toh.bias,
            gate.top_k,
            activation,
            gate.balance_coef,
            gate.z_loss_coef,
            bool(self.recompute_activation),
        )
        gate._record((None, None, balance, z_loss, _NO_DROP_COUNT))
        if self.replicated_experts:
            self.replicated_experts = []
        self._record_balance(x.shape[0], x.shape[0] * gate.top_k, counts)
        return y.reshape(*inp.shape[:-1], y.shape[-1])

    def _fused_activation(self, inp) -> str | None:
        """The activation's name when this forward may run as fastmoe::moe_ffn, else None (the composed path)."""
        if not (self.fused_forward and isinstance(inp, torch.Tensor) and self.moe_group is None):
            return None
        gate, experts = self.gate, getattr(self, "experts", None)
        if (
            type(gate) is not NaiveGate
            or gate.top_k != self.slots_per_token
            or type(experts) is not _Expert
            or type(self).expert_fn is not FMoETransformerMLP.expert_fn
            or self.gate_hook is not None
            or debug.is_debug()
        ):
            return None
        linears = (type(gate.gate), type(experts.htoh4), type(experts.h4toh))
        if linears != (nn.Linear, FMoELinear, FMoELinear):
            return None
        if _hooked((gate, gate.gate, experts, experts.htoh4, experts.h4toh)):
            return None
        return _FUSED_ACTIVATIONS.get(experts.activation)


# The activations fastmoe::moe_ffn computes, by the function the experts hold.
_FUSED_ACTIVATIONS = {F.gelu: "gelu", F.relu: "relu", F.silu: "silu", swiglu: "swiglu"}

# The gate's drop count for moe_ffn's forward: NaiveGate never drops (BaseGate._record reads a [0] tensor as none).
_NO_DROP_COUNT = torch.empty(0, dtype=torch.int64)


def _hooked(modules) -> bool:
    """Whether a forward hook (of these modules or a global one) would see calls the one op does not make."""
    if _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)
