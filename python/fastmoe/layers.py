import torch
from torch import nn

from fastmoe import _checks, debug, distributed, ops
from fastmoe.balance import BalanceRecord, read_records
from fastmoe.gates import NaiveGate


class FMoE(nn.Module):
    """A Mixture-of-Experts layer with any expert modules (FastMoE's ``FMoE``).

    Forward, for ``inp [..., d_model]`` viewed as ``x [T, d_model]``:
      1. the gate gives ``topk_idx [T, k]`` and ``topk_score [T, k]``;
      2. ``make_plan`` orders the T*k (token, slot) pairs by expert;
      3. ``permute`` gathers the rows in that order;
      4. ``expert_fn`` runs each expert on its contiguous block of rows;
      5. ``unpermute_combine`` adds each token's k expert outputs weighted by its scores.

    Args:
        num_expert: experts on this rank (the global count is ``num_expert * world_size``).
        d_model: feature width of the input.
        world_size: size of the expert-parallel group: the layer holds ``num_expert`` of the
            ``num_expert * world_size`` experts, global expert ``e`` on rank ``e // num_expert`` of ``moe_group``.
            Needs torch.distributed; the configuration is checked to be the same on every rank at construction.
        moe_group: the expert-parallel process group (``None``: the default group, which must then have
            ``world_size`` ranks).
        top_k: experts per token.
        gate: a gate class built as ``gate(d_model, num_expert, world_size, top_k)``, or a gate instance (see
            ``fastmoe.gates``). A gate whose routing is wider than ``top_k`` (expert choice) says so in its
            ``slots_per_token`` attribute.
        expert: a callable ``expert(d_model) -> nn.Module`` instantiated ``num_expert`` times, or a list of such
            callables (one per expert). Each expert module is called as ``module(x_rows)`` with the
            ``[rows, d_model]`` block routed to it. ``None`` means the subclass sets a fused ``self.experts``
            called as ``self.experts(x_sorted, fwd_expert_count)``.
        gate_hook: called as ``gate_hook(topk_idx, topk_score, None)`` after gating.
        gate_bias: passed to NaiveGate-family gates.

    The per-expert loop reads the expert counts on the host once per forward (one device sync); fused experts
    (``FMoETransformerMLP``) do not.

    Each forward keeps ``balance_record`` (device tensors: the plan's expert counts, the gate's capacity-drop
    count and loss terms); :meth:`balance_stats` and ``fastmoe.balance.collect`` read them on the host.
    """

    def __init__(
        self,
        num_expert: int = 32,
        d_model: int = 1024,
        world_size: int = 1,
        mp_group=None,
        slice_group=None,
        moe_group=None,
        top_k: int = 2,
        gate=NaiveGate,
        expert=None,
        gate_hook=None,
        mask=None,
        mask_dict=None,
        gate_bias: bool = True,
    ):
        super().__init__()
        self.num_expert = _checks.positive_int("num_expert", num_expert)
        self.d_model = _checks.positive_int("d_model", d_model)
        self.world_size = _checks.positive_int("world_size", world_size)
        self.moe_group, self.moe_rank = None, 0
        if world_size != 1 or moe_group is not None:
            self.moe_group, self.moe_rank = distributed.resolve_moe_group(world_size, moe_group)
        for name, value in (
            ("mp_group", mp_group),
            ("slice_group", slice_group),
            ("mask", mask),
            ("mask_dict", mask_dict),
        ):
            if value is not None:
                raise NotImplementedError(f"{name} is not supported by fastmoe.FMoE, got {name}={value!r}")
        self.num_experts_total = self.num_expert * self.world_size
        self.top_k = _checks.top_k_in_range(top_k, self.num_experts_total)
        self.gate_hook = gate_hook
        self.balance_record: BalanceRecord | None = None

        if isinstance(gate, nn.Module):
            self.gate = gate
        elif isinstance(gate, type) and issubclass(gate, NaiveGate):
            self.gate = gate(d_model, num_expert, world_size, top_k, gate_bias=gate_bias)
        elif callable(gate):
            self.gate = gate(d_model, num_expert, world_size, top_k)
        else:
            raise TypeError(f"gate must be a gate class, a callable or an nn.Module, got {gate!r}")
        slots = getattr(self.gate, "slots_per_token", self.top_k)
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"the gate's slots_per_token must be a positive int, got {slots!r}")
        self.slots_per_token = slots

        self.experts_fused = expert is None
        if isinstance(expert, (list, tuple)):
            if len(expert) != num_expert:
                raise ValueError(f"expert is a list of {len(expert)} callables but num_expert={num_expert}")
            self.experts = nn.ModuleList([make(d_model) for make in expert])
        elif expert is not None:
            if not callable(expert):
                raise TypeError(f"expert must be a callable expert(d_model) -> nn.Module, got {expert!r}")
            self.experts = nn.ModuleList([expert(d_model) for _ in range(num_expert)])
        if self.moe_group is not None:
            distributed.check_same_config(
                self.moe_group,
                {
                    "layer": type(self).__name__,
                    "num_expert": self.num_expert,
                    "d_model": self.d_model,
                    "top_k": self.top_k,
                    "gate": type(self.gate).__qualname__,
                    "slots_per_token": self.slots_per_token,
                    "experts_fused": self.experts_fused,
                },
                what=f"{type(self).__name__}(world_size={self.world_size})",
            )

    def mark_parallel_comm(self, expert_dp_comm: str = "none"):
        """Tags parameters as FastMoE does (``p.dp_comm``): experts with ``expert_dp_comm``, the gate with
        ``"gate"``. fastmoe's DistributedGroupedDataParallel decides from the layer layout instead, so the tags
        are informational."""
        if hasattr(self, "experts"):
            for param in self.experts.parameters():
                param.dp_comm = expert_dp_comm
        for param in self.gate.parameters():
            param.dp_comm = "gate"

    def expert_fn(self, inp: torch.Tensor, fwd_expert_count: torch.Tensor, expert_offsets=None):
        """Runs the local experts on ``inp [N, d_model]`` (rows grouped by expert, zero rows at the tail).
        ``expert_offsets`` is the ``[num_expert + 1]`` prefix sum, a tensor or (for the module loop) a list."""
        if self.experts_fused:
            return self.experts(inp, fwd_expert_count)
        if expert_offsets is None:
            expert_offsets = ops.counts_to_offsets(fwd_expert_count)
        # host sync (unless given as a list): a Python loop over modules needs the row ranges
        bounds = expert_offsets.tolist() if isinstance(expert_offsets, torch.Tensor) else list(expert_offsets)
        outputs = [
            self.experts[e](inp[bounds[e] : bounds[e + 1]]) for e in range(self.num_expert) if bounds[e + 1] > bounds[e]
        ]
        routed = bounds[self.num_expert]
        width = outputs[0].shape[-1] if outputs else self.d_model
        tail = inp.new_zeros(inp.shape[0] - routed, width)
        if not outputs:
            return tail
        return torch.cat(outputs + [tail.to(outputs[0].dtype)], dim=0)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        if self.experts_fused and not hasattr(self, "experts"):
            raise AttributeError(
                "FMoE was built with expert=None, which means a subclass must assign self.experts (fused experts "
                "called as experts(x_sorted, fwd_expert_count)); pass expert=callable to use per-expert modules"
            )
        x = _checks.token_matrix("inp", inp, self.d_model, like=_checks.first_parameter(self.gate))
        topk_idx, topk_score = self.gate(x)
        if topk_idx.shape != (x.shape[0], self.slots_per_token):
            expected = "top_k" if self.slots_per_token == self.top_k else "gate.slots_per_token"
            raise ValueError(
                f"the gate returned topk_idx of shape {tuple(topk_idx.shape)}, expected [tokens, {expected}] = "
                f"{[x.shape[0], self.slots_per_token]}"
            )
        debug.check_routing(self, topk_idx, topk_score, self.num_experts_total)
        if self.gate_hook is not None:
            self.gate_hook(topk_idx, topk_score, None)
        plan = ops.make_plan(topk_idx, self.num_experts_total)
        self._record_balance(x.shape[0], topk_idx.numel(), plan.expert_counts)
        x_sorted = ops.permute(x, plan)
        if self.moe_group is None:
            y_sorted = self.expert_fn(x_sorted, plan.expert_counts, plan.expert_offsets)
        else:
            y_sorted = self._global_expert_fn(x_sorted, plan.expert_counts)
        debug.check_finite(self, "expert outputs (y_sorted)", y_sorted)
        y = ops.unpermute_combine(y_sorted, plan, topk_score)
        return y.reshape(*inp.shape[:-1], y.shape[-1])

    def _global_expert_fn(self, x_sorted: torch.Tensor, expert_counts: torch.Tensor) -> torch.Tensor:
        """Expert parallelism: rows go to the ranks owning their experts, through the local experts, and back.

        ``x_sorted`` is ordered by global expert, i.e. by (owner rank, local expert). One host sync reads the
        counts, because the all-to-all needs its split sizes on the host.
        """
        world, local = self.world_size, self.num_expert
        received_counts = ops.exchange_counts(expert_counts, self.moe_group)  # [world * local], [source][expert]
        send, recv, local_bounds = _exchange_splits_sync(expert_counts, received_counts, world, local)
        x_recv = ops.exchange(x_sorted, send, recv, self.moe_group)
        x_local = ops.regroup(x_recv, received_counts, world)
        local_counts = received_counts.view(world, local).sum(0)
        offsets = local_bounds if not self.experts_fused else ops.counts_to_offsets(local_counts)
        y_local = self.expert_fn(x_local, local_counts, offsets)
        y_recv = ops.regroup(y_local, received_counts, world, inverse=True)
        return ops.exchange(y_recv, recv, send, self.moe_group, out_rows=x_sorted.shape[0])

    def _record_balance(self, num_tokens: int, num_slots: int, expert_counts: torch.Tensor) -> None:
        """Keeps what balance_stats() needs, as device tensors (no host read here)."""
        gate = self.gate
        if hasattr(gate, "get_losses"):
            losses = gate.get_losses()
        else:
            loss = getattr(gate, "loss", None)
            losses = {"loss": loss} if isinstance(loss, torch.Tensor) else {}
        num_dropped = getattr(gate, "num_dropped", None)
        self.balance_record = BalanceRecord(
            num_tokens=num_tokens,
            num_slots=num_slots,
            expert_counts=expert_counts.detach(),
            num_dropped=num_dropped.detach() if isinstance(num_dropped, torch.Tensor) else None,
            losses={name: loss.detach() for name, loss in losses.items()},
        )

    def balance_stats(self) -> dict:
        """The load statistics of the last forward, read on the host (one sync): ``expert_counts`` (per global
        expert), ``num_tokens``, ``num_slots``, ``routed``, ``dropped``, ``drop_rate`` (capacity drops / slots),
        ``unrouted_rate`` (empty slots / slots), ``load_cv``, ``max_load``, ``max_over_mean``, ``losses`` (the
        gate's loss terms by name) and ``loss`` (their sum). See ``fastmoe.balance.summarize``."""
        if self.balance_record is None:
            raise RuntimeError("balance_stats() reports the last forward, but this layer has not run a forward yet")
        return read_records([self.balance_record])[0]

    def get_loss(self, clear: bool = True) -> torch.Tensor:
        """The sum of the gate's loss terms of the last forward, or a zero scalar if the gate has none, so
        ``loss = task_loss + layer.get_loss()`` always works."""
        loss = self.gate.get_loss(clear=clear) if hasattr(self.gate, "get_loss") else None
        if loss is None:
            param = next(self.gate.parameters(), None)
            device = param.device if param is not None else None
            return torch.zeros((), device=device)
        return loss


def _exchange_splits_sync(sent_counts: torch.Tensor, received_counts: torch.Tensor, world: int, local: int):
    """Reads both count vectors on the host (one sync) and returns the rows sent to each rank, the rows received
    from each rank, and the local experts' row bounds (``[local + 1]`` prefix sum, expert-major)."""
    both = torch.cat([sent_counts, received_counts]).tolist()
    sent, received = both[: world * local], both[world * local :]
    send = [sum(sent[p * local : (p + 1) * local]) for p in range(world)]
    recv = [sum(received[p * local : (p + 1) * local]) for p in range(world)]
    bounds = [0]
    for e in range(local):
        bounds.append(bounds[-1] + sum(received[p * local + e] for p in range(world)))
    return send, recv, bounds
