import torch
import torch.utils._pytree as pytree
from torch import nn

from fastmoe import _checks, _groups, _rng, debug, ops
from fastmoe import _fastmoe_api as _api
from fastmoe._fastmoe_api import mark_module_parallel_comm  # noqa: F401  (FastMoE's fmoe.layers has it)
from fastmoe.balance import BalanceRecord, read_records
from fastmoe.gates import NaiveGate
from fastmoe.linear import _local

# The token path (fastmoe::TokenDispatch, include/fastmoe/token_dispatch.h), registered when fastmoe._C loads.
_TokenDispatch = torch.classes.fastmoe.TokenDispatch


class FMoE(nn.Module):
    """A Mixture-of-Experts layer with any expert modules (FastMoE's ``FMoE``).

    Forward, for ``inp [..., d_model]`` viewed as ``x [T, d_model]``: the gate gives ``topk_idx [T, k]`` and
    ``topk_score [T, k]``; the C++ token path (``fastmoe::TokenDispatch``, docs/architecture.md) groups the rows by
    expert (and, with expert parallelism, sends them to the experts' ranks); ``expert_fn`` runs each local expert
    on its block of rows; the token path adds each token's k outputs weighted by its scores.

    Args:
        num_expert: experts on this rank (``num_expert * world_size`` in all). With ``expert=[...]`` it may be
            ``None`` or left at its default and is then the list's length (FastMoE's rule).
        d_model: feature width of the input.
        world_size, moe_group: expert parallelism over the ``world_size`` ranks of ``moe_group`` (``None``: the
            default group): global expert ``e`` lives on rank ``e // num_expert``. Construction checks that every
            rank has the same configuration (a collective). ``moe_group`` may be a 1-D ``DeviceMesh`` (or one
            dimension of a larger mesh, ``mesh["ep"]``): the fused experts are then DTensors of the whole layer's
            shape sharded over the expert dimension (``Shard(0)``), kept in ``self.moe_mesh``
            (docs/distributed.md, "DeviceMesh and DTensor experts").
        top_k: experts per token.
        gate: a gate class built as ``gate(d_model, num_expert, world_size, top_k)``, or a gate instance
            (``fastmoe.gates``; a gate routing wider than ``top_k`` says so in ``slots_per_token``; a gate whose
            ``moe_group`` is ``None``, such as ``DCGate``, gets the layer's group).
        expert: a callable ``expert(d_model) -> nn.Module`` built ``num_expert`` times, or a list of such
            callables, one per expert. Each module gets its ``[rows, d_model]`` block (experts without rows are not
            called, except expert 0 on an empty block when no row is routed here at all), as ``module(rows)``, or
            as ``module(rows, count)`` (``count`` a 1-element int64 CPU tensor) when its ``forward`` has a required
            second parameter or one named ``fwd_expert_count``. Global expert ``g`` is built in its own random
            stream (docs/distributed.md, "Initialisation"). ``None``: a subclass sets fused ``self.experts``,
            called as ``self.experts(x_sorted, fwd_expert_count)``.
        gate_hook: called as ``gate_hook(topk_idx, topk_score, None)`` after gating.
        gate_bias: passed to NaiveGate-family gates.
        ep_chunks: with expert parallelism, cut the tokens into this many chunks, each chunk's exchanges and
            experts on its own CUDA stream, so they overlap (docs/distributed.md). The result does not depend on it.
        ep_exchange, ep_local_size: with expert parallelism, how rows travel: ``"flat"`` (one all-to-all over the
            group), ``"hierarchical"`` (within each node of ``ep_local_size`` consecutive ranks of the group to the
            rank on the destination's rail, then across nodes over the rail; ``ep_local_size`` defaults to the
            launcher's ``LOCAL_WORLD_SIZE``) or ``"auto"`` (hierarchical when the group spans several nodes with
            several of its ranks on each). Default ``"flat"``: the hierarchical exchange has not yet run over NCCL
            on several nodes. The result is the same bit for bit (docs/distributed.md, "Hierarchical
            exchange").
        ep_replicate: with expert parallelism and fused experts, hot-expert replication: each forward, copy up to
            this many experts to every rank where a cost model finds it cheaper than moving their tokens; each rank
            then computes its own tokens' slots of a copied expert, and the copies' gradients are summed back into
            the owner's weights (docs/distributed.md, "Hot-expert replication"). ``0`` (default): off. The result
            equals the layer without copies within the numerics policy (the slots are added in another order).
        ep_replicate_rates: ``(gemm_flops, link_bytes)``, the experts' GEMM rate in FLOP/s and the bytes/s a rank
            sends to each other rank, for the cost model; ``None``: defaults for the device (H200 over NVLink on
            CUDA).

    The per-expert module loop reads the expert counts on the host once per forward; fused experts do not. A
    subclass may override ``expert_fn(inp, fwd_expert_count, expert_offsets)``, or FastMoE's two-parameter form,
    which gets the routed rows only. The input may also be a tuple, list or dict of tensors ``[..., d_i]`` (any
    pytree; FastMoE's multi-input layers): routed together, each expert gets and returns such a structure, and so
    does the layer (docs/porting-from-fastmoe.md). Each forward keeps ``balance_record`` (device tensors), read by
    :meth:`balance_stats` and ``fastmoe.balance.collect``.
    """

    def __init__(
        self,
        num_expert: int | None = _api.DEFAULT_NUM_EXPERT,
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
        ep_chunks: int = 1,
        ep_exchange: str = "flat",
        ep_local_size: int | None = None,
        ep_replicate: int = 0,
        ep_replicate_rates: tuple | None = None,
    ):
        super().__init__()
        num_expert = _api.num_expert_for(num_expert, expert)
        self.num_expert = _checks.positive_int("num_expert", num_expert)
        self.d_model = _checks.positive_int("d_model", d_model)
        self.world_size = _checks.positive_int("world_size", world_size)
        self.moe_group, self.moe_rank, self.moe_mesh = None, 0, None
        if _groups.is_device_mesh(moe_group):
            if expert is not None:
                raise NotImplementedError(
                    "expert= (a module per expert) with moe_group=<DeviceMesh> is not supported yet: only fused "
                    "experts (FMoETransformerMLP) become DTensors; pass moe_group=mesh.get_group() to keep plain "
                    f"per-rank experts, got expert={expert!r}"
                )
            self.moe_mesh, self.moe_group, self.moe_rank = _groups.resolve_moe_mesh(world_size, moe_group)
        elif world_size != 1 or moe_group is not None:
            self.moe_group, self.moe_rank = _groups.resolve_moe_group(world_size, moe_group)
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
        self.ep_chunks = _checks.positive_int("ep_chunks", ep_chunks)
        # ranks per node of the hierarchical exchange, None for the flat one
        self.ep_local_size = _groups.resolve_ep_exchange(self.moe_group, ep_exchange, ep_local_size)
        self.ep_exchange = "flat" if self.ep_local_size is None else "hierarchical"
        self._ep_subgroups = ("", "")  # names of the hierarchical exchange's node and rail groups
        self.ep_replicate = _checks.non_negative_int("ep_replicate", ep_replicate)
        self.ep_replicate_rates = _checks.replicate_rates(ep_replicate_rates)
        if self.ep_replicate_rates is not None and not self.ep_replicate:
            raise ValueError(
                f"ep_replicate_rates={ep_replicate_rates!r} prices hot-expert replication, which ep_replicate=0 turns "
                "off; pass ep_replicate > 0 or leave the rates out"
            )
        if self.ep_replicate and self.moe_group is None:
            raise ValueError(
                f"ep_replicate={ep_replicate} copies experts between the ranks of expert parallelism, but this layer "
                "has none (world_size=1 and no moe_group)"
            )
        self.balance_record: BalanceRecord | None = None
        self.replicated_experts: list = []  # the experts the last forward copied (ep_replicate)

        if isinstance(gate, nn.Module):
            self.gate = gate
        elif _api.builds_naive_gate(gate):
            self.gate = gate(d_model, num_expert, world_size, top_k, gate_bias=gate_bias)
        elif callable(gate):
            self.gate = gate(d_model, num_expert, world_size, top_k)
        else:
            raise TypeError(f"gate must be a gate class, a callable or an nn.Module, got {gate!r}")
        if getattr(self.gate, "moe_group", False) is None and self.moe_group is not None:
            # a gate that needs the expert-parallel group (DCGate) and was not given one gets the layer's
            self.gate.moe_group = self.moe_group
        _checks.gate_matches(self.gate, self.num_experts_total, self.d_model)
        slots = getattr(self.gate, "slots_per_token", self.top_k)
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"the gate's slots_per_token must be a positive int, got {slots!r}")
        self.slots_per_token = slots

        self.experts_fused = expert is None
        if self.ep_replicate and not self.experts_fused:
            raise NotImplementedError(
                f"ep_replicate={ep_replicate} copies the weights of fused experts (FMoETransformerMLP, or a "
                f"subclass's self.experts with a leading expert dimension); a module per expert is not supported, got "
                f"expert={expert!r}"
            )
        if expert is not None:
            makers = list(expert) if isinstance(expert, (list, tuple)) else [expert] * self.num_expert
            for i, make in enumerate(makers):
                if not callable(make):
                    where = f"expert[{i}]" if isinstance(expert, (list, tuple)) else "expert"
                    raise TypeError(f"{where} must be a callable expert(d_model) -> nn.Module, got {make!r}")
            # Each global expert is built inside its own random stream (fastmoe._rng), so the ranks' experts differ
            # and together equal the experts of a one-rank layer of num_expert * world_size built from the same seed.
            self.experts = nn.ModuleList(_rng.build_experts(makers, d_model, self.moe_rank * self.num_expert))
        if self.moe_group is not None:
            _groups.check_same_config(
                self.moe_group,
                {
                    "layer": type(self).__name__,
                    "num_expert": self.num_expert,
                    "d_model": self.d_model,
                    "top_k": self.top_k,
                    "gate": type(self.gate).__qualname__,
                    "slots_per_token": self.slots_per_token,
                    "experts_fused": self.experts_fused,
                    # ranks that cut their tokens differently exchange count tables of different sizes
                    "ep_chunks": self.ep_chunks,
                    # ranks that disagree would join different sub-groups and exchanges
                    "ep_exchange": self.ep_exchange,
                    "ep_local_size": self.ep_local_size,
                    # ranks that disagree would gather loads on some ranks only, or choose different copies
                    "ep_replicate": self.ep_replicate,
                    "ep_replicate_rates": self.ep_replicate_rates,
                    # the rows would differ in size; a later .to() on one rank is caught by the exchange headers
                    "param_dtype": ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in self.parameters()})),
                },
                what=f"{type(self).__name__}(world_size={self.world_size})",
            )
        if self.ep_local_size is not None:
            self._ep_subgroups = _groups.hierarchical_groups(self.moe_group, self.ep_local_size)
        # Decided once: whether expert_fn takes fastmoe's third argument (expert_offsets) or is an override with
        # FastMoE's two (inp, fwd_expert_count), which _run_experts then calls the FastMoE way.
        self._expert_fn_takes_offsets = _api.expert_fn_takes_offsets(self, FMoE.expert_fn)
        self._io_structure = None  # set during a forward whose input is a tuple/list/dict of tensors
        if not self.experts_fused:
            self._expert_call_modes()

    def mark_parallel_comm(self, expert_dp_comm: str = "none"):
        """Tags parameters as FastMoE does (``p.dp_comm``): experts with ``expert_dp_comm``, the gate with
        ``"gate"``. fastmoe's DistributedGroupedDataParallel decides from the layer layout instead, so the tags
        are informational."""
        if hasattr(self, "experts"):
            mark_module_parallel_comm(self.experts, expert_dp_comm)
        mark_module_parallel_comm(self.gate, "gate")

    def expert_fn(self, inp, fwd_expert_count: torch.Tensor, expert_offsets=None):
        """Runs the local experts on ``inp [N, d_model]`` (rows grouped by expert, zero rows at the tail), or on a
        structure of such tensors in a multi-input forward. ``expert_offsets`` is the ``[num_expert + 1]`` prefix
        sum, a tensor or (for the module loop) a list. Each expert module gets (the structure of) its rows and
        returns (a structure of) ``[rows, d_out_j]`` tensors; the result holds zero rows for the unrouted tail."""
        if self.experts_fused:
            return self.experts(inp, fwd_expert_count)
        if expert_offsets is None:
            expert_offsets = ops.counts_to_offsets(fwd_expert_count)
        # host sync (unless given as a list): a Python loop over modules needs the row ranges
        bounds = expert_offsets.tolist() if isinstance(expert_offsets, torch.Tensor) else list(expert_offsets)
        modes = self._expert_call_modes()
        outputs = []
        for e in range(self.num_expert):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo or (e == 0 and bounds[self.num_expert] == 0):
                # With no row here at all, expert 0 runs on an empty block: that gives the output's shape
                # and keeps it on the input's autograd graph (with expert parallelism the backward of the exchange
                # that delivered the rows is a collective every rank must reach).
                rows = pytree.tree_map(lambda t, lo=lo, hi=hi: t[lo:hi], inp)
                # FastMoE's experts take forward(rows, count), the count a 1-element int64 CPU tensor
                outputs.append(self.experts[e](rows, torch.tensor([hi - lo])) if modes[e] else self.experts[e](rows))
        flat = [pytree.tree_flatten(out) for out in outputs]
        spec = flat[0][1]
        for e, (_, other) in enumerate(flat):
            if other != spec:
                raise ValueError(f"the experts returned different structures: {spec} and {other} (expert output {e})")
        num_rows, columns = pytree.tree_leaves(inp)[0].shape[0], []
        for j in range(len(flat[0][0])):
            pieces = [leaves[j] for leaves, _ in flat]
            tail = pieces[0].new_zeros(num_rows - sum(piece.shape[0] for piece in pieces), *pieces[0].shape[1:])
            columns.append(torch.cat(pieces + [tail], dim=0))
        return pytree.tree_unflatten(columns, spec)

    def _expert_call_modes(self) -> tuple:
        """Per local expert module, whether it is called with FastMoE's ``(rows, count)`` (``_takes_count``).
        Read from the signatures once, and again only if ``self.experts`` was replaced by another object."""
        cached = getattr(self, "_expert_modes_cache", None)
        if cached is None or cached[0] is not self.experts or len(cached[1]) != len(self.experts):
            cached = (self.experts, tuple(_api.takes_count(module) for module in self.experts))
            self._expert_modes_cache = cached
        return cached[1]

    def _run_experts(self, x: torch.Tensor, counts: torch.Tensor, offsets) -> torch.Tensor:
        """``expert_fn`` on the permuted rows ``x [N, width]``, returning ``[N, width_out]``. For a multi-input
        forward, ``x`` holds the tensors' columns side by side and expert_fn sees the structure. A two-argument
        ``expert_fn`` (FastMoE's) gets the routed rows only, and its output gets zero rows for the tail."""
        structure = self._io_structure
        if structure is None and self._expert_fn_takes_offsets:
            return self.expert_fn(x, counts, offsets)
        num_rows = x.shape[0]
        if not self._expert_fn_takes_offsets:
            routed = offsets[-1] if isinstance(offsets, list) else int(offsets[-1])  # host sync (FastMoE: several)
            x = x[:routed]
        inp = x if structure is None else structure.split_input(x)
        y = self.expert_fn(inp, counts, offsets) if self._expert_fn_takes_offsets else self.expert_fn(inp, counts)
        if structure is not None:
            y = structure.join_output(y, x.shape[0])
        elif not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != x.shape[0]:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"expert_fn must return a [{x.shape[0]}, d_out] tensor (one row per input row), got {got}")
        if y.shape[0] < num_rows:
            y = torch.cat([y, y.new_zeros(num_rows - y.shape[0], y.shape[1])])
        return y

    def forward(self, inp):
        if self.experts_fused and not hasattr(self, "experts"):
            raise AttributeError(
                "FMoE was built with expert=None, which means a subclass must assign self.experts (fused experts "
                "called as experts(x_sorted, fwd_expert_count)); pass expert=callable to use per-expert modules"
            )
        if not isinstance(inp, torch.Tensor):
            return self._forward_structure(inp)
        x = _checks.token_matrix("inp", inp, self.d_model, like=_checks.first_parameter(self.gate))
        y = self._moe(x, x)
        return y.reshape(*inp.shape[:-1], y.shape[-1])

    def _forward_structure(self, inp):
        """A tuple, list or dict (any pytree) of tensors: routed together, as described in the class docstring."""
        x, structure = _api.IOStructure.of_input(inp, like=_checks.first_parameter(self.gate))
        self._io_structure = structure
        try:
            y = self._moe(x, inp)
        finally:
            self._io_structure = None
        return structure.split_output(y)

    def _moe(self, x: torch.Tensor, gate_input) -> torch.Tensor:
        """Gate on ``gate_input``, then the token path on ``x [T, width]``; returns ``[T, width_out]``. The path
        between the gate and the experts and back is one C++ object (``fastmoe::TokenDispatch``, docs/ops.md): this
        layer only runs its experts on each chunk of rows it hands out."""
        topk_idx, topk_score = self.gate(gate_input)
        if topk_idx.shape != (x.shape[0], self.slots_per_token):
            expected = "top_k" if self.slots_per_token == self.top_k else "gate.slots_per_token"
            raise ValueError(
                f"the gate returned topk_idx of shape {tuple(topk_idx.shape)}, expected [tokens, {expected}] = "
                f"{[x.shape[0], self.slots_per_token]}"
            )
        if self.gate_hook is not None:
            self.gate_hook(topk_idx, topk_score, None)
        with debug.raising_non_finite():
            tokens = _TokenDispatch(
                x,
                topk_idx,
                topk_score,
                self.num_expert,
                self.world_size,
                "" if self.moe_group is None else self.moe_group.group_name,
                self.ep_chunks,
                self.expert_input_follows_autocast,
                debug.name_of(self) if debug.is_debug() else "",
                *self._ep_subgroups,
                *self._replication_args(),
            )
            self._record_balance(x.shape[0], topk_idx.numel(), tokens.routed_counts())
            replicated = tokens.replicated()
            self.replicated_experts = replicated
            # scored: the experts apply each row's routing score themselves and the combine only sums
            scored = self._scored_experts()
            if replicated:  # the copies first; their exchanges queue behind the chunks' dispatch
                scores = tokens.replica_scores() if scored else None
                tokens.give_replicas(self._run_replicas(tokens, replicated, scores), scored)
            for c in range(tokens.num_chunks()):
                tokens.enter(c)  # the chunk's CUDA stream (expert parallelism with ep_chunks > 1)
                try:
                    # expert_fn's offsets: on the device, but a host list for module experts under expert
                    # parallelism, where the bounds come with the exchanged counts at no cost
                    host = not self.experts_fused and self.moe_group is not None
                    offsets = tokens.expert_bounds(c) if host else tokens.expert_offsets(c)
                    scores = tokens.row_scores(c) if scored else None
                    y = self._run_routed(tokens.rows(c), tokens.expert_counts(c), offsets, scores)
                finally:
                    tokens.leave(c)
                tokens.give(c, y, scored)
            return tokens.combine()

    def _replication_args(self) -> tuple:
        """TokenDispatch's replicate_max, expert_params, param_bytes, gemm_flops, link_bytes."""
        if not self.ep_replicate:
            return ()
        params = []
        for name, param in self.experts.named_parameters():
            local = _local(param)
            if local.dim() == 0 or local.shape[0] != self.num_expert:
                # e.g. experts sharded over a data-parallel dimension by FSDP2's fully_shard(layer.experts)
                raise NotImplementedError(
                    f"ep_replicate copies experts along the first dimension of each expert parameter, but "
                    f"experts.{name} holds {tuple(local.shape)} here (expected [num_expert={self.num_expert}, ...]); "
                    "experts sharded further (FSDP2 on the experts module) cannot be copied"
                )
            params.append(local)
        if not params:
            raise ValueError("ep_replicate needs experts with parameters to copy; self.experts has none")
        per_expert = sum(p.numel() for p in params) // self.num_expert
        gemm_flops, link_bytes = self.ep_replicate_rates or (0.0, 0.0)
        return (self.ep_replicate, per_expert, params[0].element_size(), gemm_flops, link_bytes)

    def _scored_experts(self) -> bool:
        """Whether the experts apply the routing scores themselves (through :meth:`_run_scored`), so the combine
        only sums. False here: ``expert_fn`` returns unweighted outputs (FastMoE's contract)."""
        return False

    def _run_scored(self, rows, counts, offsets, scores) -> torch.Tensor:
        """The experts on ``rows`` with each row's routing score ``scores [N]`` applied (where
        :meth:`_scored_experts`)."""
        raise NotImplementedError(f"{type(self).__name__} has no experts that apply the routing scores")

    def _run_routed(self, rows, counts, offsets, scores) -> torch.Tensor:
        """The experts on a chunk's (or the copies') rows: :meth:`_run_scored` with each row's routing score, or
        :meth:`_run_experts` where ``scores`` is None."""
        if scores is None:
            return self._run_experts(rows, counts, offsets)
        return self._run_scored(rows, counts, offsets, scores)

    def _run_replicas(self, tokens, replicated: list, scores=None) -> torch.Tensor:
        """The experts in ``replicated`` (global ids), run here on this rank's slots for them: the fused experts'
        parameters (each ``[num_expert, ...]``) are swapped for copies of those experts' (``ops.replicate_experts``,
        whose backward sums the gradients back into the owners' parameters) while ``expert_fn`` runs."""
        group = self.moe_group.group_name
        # _replication_args checked the shapes before the forward's first collective
        copies = {
            name: ops.replicate_experts(_local(param), replicated, self.num_expert, group)
            for name, param in self.experts.named_parameters()
        }
        # The parameters are swapped for the call only (the mechanism of torch.func.functional_call, which would
        # call experts.forward instead), so expert_fn and any override of it run the copies unchanged.
        with torch.nn.utils.stateless._reparametrize_module(self.experts, copies):
            return self._run_routed(tokens.replica_rows(), tokens.replica_counts(), tokens.replica_offsets(), scores)

    # True where the experts' first op follows autocast (FMoETransformerMLP: a grouped GEMM), so the rows may be
    # cast to the autocast dtype before they are permuted or exchanged.
    expert_input_follows_autocast = False

    def _record_balance(self, num_tokens: int, num_slots: int, expert_counts: torch.Tensor) -> None:
        """Keeps what balance_stats() needs, as device tensors (no host read here)."""
        gate = self.gate
        if hasattr(gate, "get_losses"):
            losses = gate.get_losses()
        else:
            loss = getattr(gate, "loss", None)
            losses = {"loss": loss} if isinstance(loss, torch.Tensor) else {}
        num_dropped = getattr(gate, "num_dropped", None)
        record = BalanceRecord(
            num_tokens=num_tokens,
            num_slots=num_slots,
            expert_counts=_without_graph(expert_counts),
            num_dropped=_without_graph(num_dropped) if isinstance(num_dropped, torch.Tensor) else None,
            losses={name: _without_graph(loss) for name, loss in losses.items()},
        )
        _checks.set_plain(self, balance_record=record)

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


def _without_graph(t: torch.Tensor) -> torch.Tensor:
    """``t.detach()``, or ``t`` itself when it has no graph to drop (a dispatcher call saved per forward)."""
    return t.detach() if t.requires_grad else t
