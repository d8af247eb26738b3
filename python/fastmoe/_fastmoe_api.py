"""FastMoE's calling conventions, which fastmoe.FMoE keeps so that FastMoE code runs unchanged
(docs/porting-from-fastmoe.md): the default and list forms of ``num_expert``, experts called as ``forward(rows,
count)``, two-parameter ``expert_fn`` overrides, multi-input (pytree) forwards and the ``dp_comm`` tags. The layer
itself (fastmoe.layers) only asks these helpers how to call what the user gave it."""

import functools
import inspect

import torch
import torch.utils._pytree as pytree
from torch import nn

from fastmoe import _checks
from fastmoe.gates import NaiveGate


def mark_module_parallel_comm(module: nn.Module, comm: str) -> None:
    """Sets ``p.dp_comm = comm`` on every parameter of ``module`` (FastMoE's tag: ``"dp"``, ``"world"``,
    ``"none"``, ``"gate"``, ...). fastmoe's :class:`~fastmoe.DistributedGroupedDataParallel` decides what to
    reduce from the model's layout, not from these tags, so they are informational here."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(comm, str):
        raise TypeError(f"comm must be a str such as 'dp', 'world' or 'none', got comm={comm!r}")
    for param in module.parameters():
        param.dp_comm = comm


class _DefaultNumExpert(int):
    """FMoE's default ``num_expert`` (32): an int that FMoE can tell from an explicit 32, so that a list of
    experts with the default left alone sets the count, as in FastMoE."""

    def __repr__(self) -> str:
        return str(int(self))


DEFAULT_NUM_EXPERT = _DefaultNumExpert(32)


def num_expert_for(num_expert, expert):
    """FMoE's ``num_expert``: with a list of experts, ``None`` or the default means the list's length (FastMoE
    sets it so); an explicit count must equal it."""
    if isinstance(expert, (list, tuple)):
        if not expert:
            raise ValueError(f"expert is an empty {type(expert).__name__}; give one callable per expert")
        if num_expert is None or num_expert is DEFAULT_NUM_EXPERT:
            return len(expert)
        if num_expert != len(expert):
            raise ValueError(
                f"expert is a list of {len(expert)} callables but num_expert={num_expert!r}; they must be equal "
                "(leave num_expert out, or pass None, to take the list's length)"
            )
        return num_expert
    if num_expert is None:
        raise ValueError(
            "num_expert must be a positive int, got None (None is allowed only with expert=[...], a list of "
            "experts, whose length it then takes)"
        )
    return int(num_expert) if num_expert is DEFAULT_NUM_EXPERT else num_expert


def builds_naive_gate(gate) -> bool:
    """A NaiveGate-family class, or a ``functools.partial`` of one that leaves ``gate_bias`` free: FMoE passes
    its ``gate_bias`` to those."""
    if isinstance(gate, functools.partial):
        return "gate_bias" not in gate.keywords and builds_naive_gate(gate.func)
    return isinstance(gate, type) and issubclass(gate, NaiveGate)


def positional_parameters(fn) -> list | None:
    """The positional parameters of ``fn``'s signature (bound methods without self), ``None`` when it has
    ``*args`` or no signature can be read."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p for p in parameters if p.kind in kinds]


def takes_count(module: nn.Module) -> bool:
    """Whether an expert module is called with FastMoE's ``(rows, count)``: its ``forward`` has a second
    positional parameter that is required or named ``fwd_expert_count``. ``forward(x)`` and ``forward(*args)``
    get the rows only."""
    module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper: read the compiled module's forward
    positional = positional_parameters(module.forward)
    if positional is None or len(positional) < 2:
        return False
    second = positional[1]
    return second.default is inspect.Parameter.empty or second.name == "fwd_expert_count"


def expert_fn_takes_offsets(layer, base_expert_fn) -> bool:
    """Whether ``layer.expert_fn`` takes fastmoe's third argument (``expert_offsets``): FMoE's own does, and so
    does any override with three positional parameters or ``*args``; FastMoE's ``(inp, fwd_expert_count)``
    does not."""
    if type(layer).expert_fn is base_expert_fn:
        return True
    positional = positional_parameters(layer.expert_fn)
    return positional is None or len(positional) >= 3


class IOStructure:
    """The tuple/list/dict of tensors of a multi-input forward, carried through the token path as one matrix
    with the tensors' columns side by side: one permute and one exchange move every tensor's rows, and the
    weighted combine, which works column by column, gives each tensor's result."""

    def __init__(self, spec, widths: list):
        self.spec, self.widths = spec, widths
        self.out_spec, self.out_widths = None, None
        self.lead = None  # the leading dimensions of the input's tensors (of_input)

    @classmethod
    def of_input(cls, inp, like):
        """The structure of a multi-input forward's ``inp`` (a tuple, list or dict of tensors ``[..., d_i]`` sharing
        their leading dimensions and dtype), checked, and its tensors as one ``[T, sum(d_i)]`` matrix:
        ``(x, structure)``."""
        paths_leaves, spec = pytree.tree_flatten_with_path(inp)
        if not paths_leaves:
            raise ValueError(
                f"inp must be a tensor or a tuple/list/dict of tensors, got a {type(inp).__name__} holding none"
            )
        lead, matrices = None, []
        for path, leaf in paths_leaves:
            name = "inp" + pytree.keystr(path)
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(
                    f"inp must be a tensor or a tuple/list/dict of tensors, got a {type(inp).__name__} holding "
                    f"{type(leaf).__name__} at {name}"
                )
            if leaf.dim() < 1:
                raise ValueError(f"{name} must have shape [..., d], got {tuple(leaf.shape)}")
            if lead is None:
                lead, first = leaf.shape[:-1], name
            elif leaf.shape[:-1] != lead:
                raise ValueError(
                    f"the tensors of inp must share their leading dimensions: {first} has {tuple(lead)} but {name} "
                    f"has {tuple(leaf.shape[:-1])}"
                )
            matrices.append(_checks.token_matrix(name, leaf, leaf.shape[-1], like=like))
        dtypes = {m.dtype for m in matrices}
        if len(dtypes) > 1:
            raise TypeError(f"the tensors of inp must have one dtype, got {sorted(str(d) for d in dtypes)}")
        structure = cls(spec, [m.shape[1] for m in matrices])
        structure.lead = lead
        return (matrices[0] if len(matrices) == 1 else torch.cat(matrices, dim=1)), structure

    def split_input(self, x: torch.Tensor):
        return pytree.tree_unflatten(list(torch.split(x, self.widths, dim=1)), self.spec)

    def join_output(self, y, num_rows: int) -> torch.Tensor:
        """The experts' output structure as one ``[num_rows, sum(d_out_j)]`` matrix."""
        leaves, spec = pytree.tree_flatten(y)
        for path, leaf in pytree.tree_flatten_with_path(y)[0]:
            if not isinstance(leaf, torch.Tensor) or leaf.dim() != 2 or leaf.shape[0] != num_rows:
                got = tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else type(leaf).__name__
                raise ValueError(
                    f"the experts must return tensors [{num_rows}, d_out] (one row per input row), got {got} at "
                    f"output{pytree.keystr(path)}"
                )
        if not leaves:
            raise ValueError(f"the experts returned no tensor: {spec}")
        dtypes = {leaf.dtype for leaf in leaves}
        if len(dtypes) > 1:
            raise TypeError(f"the experts' output tensors must have one dtype, got {sorted(str(d) for d in dtypes)}")
        widths = [leaf.shape[1] for leaf in leaves]
        if self.out_spec is None:
            self.out_spec, self.out_widths = spec, widths
        elif spec != self.out_spec or widths != self.out_widths:
            raise ValueError(
                f"the experts returned {spec} of widths {widths}, earlier {self.out_spec} of widths {self.out_widths}"
            )
        return leaves[0] if len(leaves) == 1 else torch.cat(leaves, dim=1)

    def split_output(self, y: torch.Tensor):
        pieces = torch.split(y, self.out_widths, dim=1)
        return pytree.tree_unflatten([p.reshape(*self.lead, p.shape[1]) for p in pieces], self.out_spec)
