"""Porting from FastMoE: state-dict conversion and an opt-in ``fmoe`` import alias (docs/porting-from-fastmoe.md).

State dicts. fastmoe's ``FMoETransformerMLP`` keeps every expert of a rank in two fused ``FMoELinear``:
``experts.htoh4.weight [E, d_hidden, d_model]``, ``experts.htoh4.bias [E, d_hidden]``,
``experts.h4toh.weight [E, d_model, d_hidden]``, ``experts.h4toh.bias [E, d_model]``. FastMoE's
``FMoETransformerMLP`` has built ``num_expert`` separate ``_Expert(1, ...)`` since March 2023, so its state dict holds
``experts.{i}.htoh4.weight [1, d_hidden, d_model]`` and so on, one set per expert; older FastMoE used the fused
layout, which is already fastmoe's. The gate keys (``gate.gate.weight [E * world_size, d_model]``,
``gate.gate.bias``; NoisyGate's ``gate.w_gate``, ``gate.w_noise``) are the same in both.

    sd = fastmoe.compat.from_fastmoe_state_dict(torch.load("fastmoe_model.pt"))
    model.load_state_dict(sd)
    torch.save(fastmoe.compat.to_fastmoe_state_dict(model.state_dict()), "for_fastmoe.pt")

Both directions work on a whole model's state dict: every MoE block is found by its key pattern, at any prefix
(``layers.3.mlp.experts.0.htoh4.weight``), and every other entry is passed through unchanged. The conversion only
moves data (concatenation and slicing), so a round trip gives back the same bits.

Expert parallelism. A FastMoE rank's state dict holds the whole gate and that rank's ``num_expert`` local experts,
so ``from_fastmoe_state_dict`` of one rank's file loads into that rank's fastmoe layer (same ``world_size``,
same ``num_expert``). :func:`merge_ep_state_dicts` joins the ranks' converted state dicts (rank order: global
expert ``rank * num_expert + e``) into the state dict of the ``world_size=1`` model, which
``fastmoe.checkpoint.save`` then writes as a checkpoint that loads at any EP size; :func:`split_ep_state_dict` is
the reverse.
"""

import collections
import importlib
import importlib.abc
import importlib.util
import re
import sys

import torch

__all__ = [
    "from_fastmoe_state_dict",
    "install_fmoe_alias",
    "merge_ep_state_dicts",
    "split_ep_state_dict",
    "to_fastmoe_state_dict",
    "uninstall_fmoe_alias",
]

LAYOUTS = ("per_expert", "fused")

# The four expert tensors of an FMoETransformerMLP block, in module registration order (htoh4 then h4toh, each
# weight then bias), which is the order both libraries' state_dict() lists them in.
_PARAMS = ("htoh4.weight", "htoh4.bias", "h4toh.weight", "h4toh.bias")

# A per-expert key: <prefix>experts.<i>.<htoh4|h4toh>.<weight|bias>; the prefix is empty or ends with a dot.
_PER_EXPERT_KEY = re.compile(
    r"^(?P<prefix>(?:.*\.)?)experts\.(?P<index>\d+)\.(?P<param>(?:htoh4|h4toh)\.(?:weight|bias))$"
)
# A fused key: <prefix>experts.<htoh4|h4toh>.<weight|bias>.
_FUSED_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)experts\.(?P<param>(?:htoh4|h4toh)\.(?:weight|bias))$")


def _shape(value) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_mapping(name: str, state_dict) -> None:
    if not isinstance(state_dict, collections.abc.Mapping):
        raise TypeError(f"{name} must be a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")


def _normalise_prefixes(prefixes):
    """``None`` or an iterable of module names (``"layers.3.mlp"`` or ``"layers.3.mlp."``, ``""`` for the root)
    -> a set of key prefixes that end with a dot (or are empty)."""
    if prefixes is None:
        return None
    if isinstance(prefixes, str):
        raise TypeError(f"prefixes must be an iterable of module names, not a str, got prefixes={prefixes!r}")
    return {p if p == "" or p.endswith(".") else p + "." for p in prefixes}


def _select(found: dict, prefixes, what: str) -> dict:
    """Keeps the blocks of ``found`` (prefix -> anything) that ``prefixes`` names; every named one must exist."""
    if prefixes is None:
        return found
    missing = sorted(prefixes - set(found))
    if missing:
        raise ValueError(
            f"prefixes names {missing}, but the state dict has no {what} there; it has {sorted(found) or 'none'}"
        )
    return {p: v for p, v in found.items() if p in prefixes}


def _same_kind(key: str, value, reference_key: str, reference) -> None:
    if value.dtype != reference.dtype or value.device != reference.device:
        raise ValueError(
            f"{key} is {value.dtype} on {value.device} but {reference_key} is {reference.dtype} on "
            f"{reference.device}; the experts of one block must share dtype and device"
        )


def _emit(state_dict, blocks: dict, block_of_key, make_entries) -> collections.OrderedDict:
    """The new state dict: every key outside the converted blocks in its place, and each block's new entries where
    its first key was. Keeps ``_metadata`` (module versions, which load_state_dict reads)."""
    out = collections.OrderedDict()
    done = set()
    for key, value in state_dict.items():
        prefix = block_of_key(key)
        if prefix is None or prefix not in blocks:
            out[key] = value
        elif prefix not in done:
            done.add(prefix)
            out.update(make_entries(prefix, blocks[prefix]))
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata.copy()
    return out


# ----------------------------------------------------------------------------------------------- FastMoE -> fastmoe


def _find_per_expert_blocks(state_dict) -> dict:
    """prefix -> {expert index -> {param -> tensor}} for every FastMoE per-expert FMoETransformerMLP block."""
    blocks: dict = {}
    for key, value in state_dict.items():
        match = _PER_EXPERT_KEY.match(key) if isinstance(key, str) else None
        if match is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key} must be a tensor, got {type(value).__name__}")
        experts = blocks.setdefault(match["prefix"], {})
        experts.setdefault(int(match["index"]), {})[match["param"]] = value
    return blocks


def _fuse_block(prefix: str, experts: dict, state_dict) -> dict:
    """Checks one FastMoE block's per-expert tensors and concatenates them along a new expert dimension."""
    num_experts = len(experts)
    if sorted(experts) != list(range(num_experts)):
        raise ValueError(
            f"the experts of block '{prefix}' must be numbered 0..{num_experts - 1}, got {sorted(experts)} "
            f"(from keys {prefix}experts.<i>.*)"
        )
    # Anything else under experts.<i>. (an activation with parameters, a layer norm) has no place in fastmoe's
    # fused experts; dropping it silently would change the model.
    other = [
        k
        for k in state_dict
        if isinstance(k, str) and re.match(rf"^{re.escape(prefix)}experts\.\d+\.", k) and not _PER_EXPERT_KEY.match(k)
    ]
    if other:
        raise ValueError(f"block '{prefix}' has expert entries the converter does not know: {other}")
    for fused in _PARAMS:
        if prefix + "experts." + fused in state_dict:
            raise ValueError(
                f"block '{prefix}' mixes per-expert keys ({prefix}experts.0.*) with the fused key "
                f"{prefix}experts.{fused}"
            )
    first = experts[0]
    for needed in ("htoh4.weight", "h4toh.weight"):
        if needed not in first:
            raise ValueError(f"block '{prefix}' has no {prefix}experts.0.{needed}")
    w1 = first["htoh4.weight"]
    if w1.dim() != 3 or w1.shape[0] != 1:
        raise ValueError(
            f"{prefix}experts.0.htoh4.weight must be [1, d_hidden, d_model] (FastMoE's _Expert(1, ...)), got "
            f"{_shape(w1)}"
        )
    d_hidden, d_model = w1.shape[1], w1.shape[2]
    expected = {
        "htoh4.weight": [1, d_hidden, d_model],
        "htoh4.bias": [1, d_hidden],
        "h4toh.weight": [1, d_model, d_hidden],
        "h4toh.bias": [1, d_model],
    }
    present = [p for p in _PARAMS if p in first]
    fused = {}
    for param in present:
        tensors = []
        for index in range(num_experts):
            key = f"{prefix}experts.{index}.{param}"
            if param not in experts[index]:
                raise ValueError(f"{key} is missing, but {prefix}experts.0.{param} exists")
            value = experts[index][param]
            if list(value.shape) != expected[param]:
                raise ValueError(
                    f"{key} has shape {_shape(value)}, expected {expected[param]} (d_hidden={d_hidden}, "
                    f"d_model={d_model} from {prefix}experts.0.htoh4.weight {_shape(w1)})"
                )
            _same_kind(key, value, f"{prefix}experts.0.htoh4.weight", w1)
            tensors.append(value)
        fused[param] = torch.cat(tensors, dim=0)
    for index in range(1, num_experts):
        extra = sorted(set(experts[index]) - set(present))
        if extra:
            raise ValueError(f"{prefix}experts.{index}.{extra[0]} exists, but {prefix}experts.0.{extra[0]} is missing")
    return {prefix + "experts." + param: fused[param] for param in _PARAMS if param in fused}


def from_fastmoe_state_dict(state_dict, *, prefixes=None) -> collections.OrderedDict:
    """FastMoE state dict -> fastmoe state dict.

    Every block of per-expert keys ``<prefix>experts.<i>.{htoh4,h4toh}.{weight,bias}`` (FastMoE's
    ``FMoETransformerMLP`` since March 2023: ``[1, d_hidden, d_model]``, ``[1, d_hidden]``, ``[1, d_model,
    d_hidden]``, ``[1, d_model]`` per expert) becomes fastmoe's fused ``<prefix>experts.htoh4.weight [E, d_hidden,
    d_model]`` etc., concatenated in expert order. Every other entry, the gate included, is passed through
    unchanged (the same tensor objects); FastMoE's older fused layout is already fastmoe's and passes through too.

    ``prefixes``: the module names of the blocks to convert (``["layers.3.mlp"]``; ``""`` for a state dict of the
    layer itself); ``None`` converts every block found. Use it when the model also holds fastmoe ``FMoE`` layers
    whose per-expert modules happen to be named ``htoh4``/``h4toh``: those are already in fastmoe's layout.

    Raises ``ValueError`` naming the key and the shapes when a block does not fit (gaps in the expert numbers,
    a missing tensor, shapes that differ between experts, a leading dimension other than 1).
    """
    _check_mapping("state_dict", state_dict)
    blocks = _select(_find_per_expert_blocks(state_dict), _normalise_prefixes(prefixes), "per-expert MoE block")
    fused = {prefix: _fuse_block(prefix, experts, state_dict) for prefix, experts in blocks.items()}

    def block_of_key(key):
        match = _PER_EXPERT_KEY.match(key) if isinstance(key, str) else None
        return None if match is None else match["prefix"]

    return _emit(state_dict, fused, block_of_key, lambda prefix, entries: entries)


# ----------------------------------------------------------------------------------------------- fastmoe -> FastMoE


def _find_fused_blocks(state_dict) -> dict:
    """prefix -> {param -> tensor} for every fused FMoETransformerMLP block (both weights present)."""
    blocks: dict = {}
    for key, value in state_dict.items():
        match = _FUSED_KEY.match(key) if isinstance(key, str) else None
        if match is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key} must be a tensor, got {type(value).__name__}")
        blocks.setdefault(match["prefix"], {})[match["param"]] = value
    for prefix, params in blocks.items():
        for needed in ("htoh4.weight", "h4toh.weight"):
            if needed not in params:
                raise ValueError(f"block '{prefix}' has {sorted(params)} but no {prefix}experts.{needed}")
    return blocks


def _check_fused_block(prefix: str, params: dict) -> tuple[int, int, int]:
    """(E, d_hidden, d_model) of a fused block after checking every shape against FastMoE's _Expert."""
    w1, w2 = params["htoh4.weight"], params["h4toh.weight"]
    key1, key2 = prefix + "experts.htoh4.weight", prefix + "experts.h4toh.weight"
    if w1.dim() != 3:
        raise ValueError(f"{key1} must be [E, d_hidden, d_model], got {_shape(w1)}")
    num_experts, d_hidden, d_model = w1.shape
    if list(w2.shape) != [num_experts, d_model, d_hidden]:
        gated = w2.dim() == 3 and list(w2.shape[:2]) == [num_experts, d_model] and w2.shape[2] * 2 == d_hidden
        hint = (
            " (gated experts such as activation='swiglu' have twice as many htoh4 rows; FastMoE has no such expert)"
            if gated
            else ""
        )
        raise ValueError(
            f"{key2} has shape {_shape(w2)}, expected [E, d_model, d_hidden] = {[num_experts, d_model, d_hidden]} "
            f"from {key1} {_shape(w1)}{hint}"
        )
    expected = {"htoh4.bias": [num_experts, d_hidden], "h4toh.bias": [num_experts, d_model]}
    for param, shape in expected.items():
        if param in params and list(params[param].shape) != shape:
            raise ValueError(f"{prefix}experts.{param} has shape {_shape(params[param])}, expected {shape}")
    for param, value in params.items():
        _same_kind(prefix + "experts." + param, value, key1, w1)
    return num_experts, d_hidden, d_model


def _with_biases(params: dict, num_experts: int, d_hidden: int, d_model: int) -> dict:
    """FastMoE's FMoELinear always has a bias; a fastmoe layer built with bias=False computes the same as zero
    biases, so those are filled in."""
    w1 = params["htoh4.weight"]
    full = dict(params)
    full.setdefault("htoh4.bias", w1.new_zeros(num_experts, d_hidden))
    full.setdefault("h4toh.bias", w1.new_zeros(num_experts, d_model))
    return full


def to_fastmoe_state_dict(state_dict, layout: str = "per_expert", *, prefixes=None) -> collections.OrderedDict:
    """fastmoe state dict -> FastMoE state dict.

    ``layout="per_expert"`` (FastMoE's ``FMoETransformerMLP`` since March 2023) writes each fused block
    ``<prefix>experts.htoh4.weight [E, d_hidden, d_model]`` etc. as ``<prefix>experts.<i>.htoh4.weight [1, d_hidden,
    d_model]`` ... for i in 0..E-1; ``layout="fused"`` (older FastMoE, or FastMoE code that builds ``_Expert(E, ...)``
    itself) keeps the fused keys. The expert tensors are copies (each its own storage, so saving one expert's slice
    does not save the whole block); every other entry, the gate included, is passed through unchanged. Blocks
    without biases (fastmoe's ``bias=False``) get zero biases, which FastMoE's layer always has.

    ``prefixes``: the module names of the blocks to convert (``None``: every fused block found).

    Raises ``ValueError`` naming the key and the shapes for a block FastMoE cannot hold, e.g. gated (SwiGLU)
    experts, whose ``htoh4`` has ``2 * d_hidden`` rows.
    """
    _check_mapping("state_dict", state_dict)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got layout={layout!r}")
    blocks = _select(_find_fused_blocks(state_dict), _normalise_prefixes(prefixes), "fused MoE block")
    sizes = {prefix: _check_fused_block(prefix, params) for prefix, params in blocks.items()}

    def make_entries(prefix, params):
        num_experts, d_hidden, d_model = sizes[prefix]
        full = _with_biases(params, num_experts, d_hidden, d_model)
        if layout == "fused":
            return {f"{prefix}experts.{p}": full[p].clone() for p in _PARAMS}
        return {f"{prefix}experts.{i}.{p}": full[p][i : i + 1].clone() for i in range(num_experts) for p in _PARAMS}

    def block_of_key(key):
        match = _FUSED_KEY.match(key) if isinstance(key, str) else None
        return None if match is None else match["prefix"]

    return _emit(state_dict, blocks, block_of_key, make_entries)


# ----------------------------------------------------------------------------------------------- expert parallelism


def merge_ep_state_dicts(state_dicts) -> collections.OrderedDict:
    """The state dicts of the W ranks of an expert-parallel model (fastmoe layout: convert FastMoE's first), in
    rank order -> the state dict of the same model built with ``world_size=1`` and ``num_expert * W`` experts.

    Each fused block's expert tensors are concatenated along the expert dimension (global expert
    ``rank * num_expert + e``); every rank must hold the same blocks with the same ``num_expert``. Every other
    entry is replicated in expert parallelism (the gate routes over all experts on every rank), so it is taken from
    the first rank that has it, and must be equal on every rank that has it too: a difference raises ``ValueError``
    naming the key and the ranks, since the ranks then do not describe one model.
    """
    if isinstance(state_dicts, collections.abc.Mapping) or not isinstance(state_dicts, (list, tuple)):
        raise TypeError(f"state_dicts must be a list of the ranks' state dicts, got {type(state_dicts).__name__}")
    if not state_dicts:
        raise ValueError("state_dicts must hold at least one rank's state dict, got an empty list")
    for rank, sd in enumerate(state_dicts):
        _check_mapping(f"state_dicts[{rank}]", sd)
    for rank, sd in enumerate(state_dicts):
        unconverted = next((k for k in sd if isinstance(k, str) and _PER_EXPERT_KEY.match(k)), None)
        if unconverted is not None:
            raise ValueError(
                f"state_dicts[{rank}] holds the per-expert key {unconverted} (FastMoE's layout); convert each rank "
                f"with from_fastmoe_state_dict first. Layers with other expert modules (FMoE(expert=...)) are "
                f"merged by fastmoe.checkpoint.consolidate instead"
            )
    per_rank = [_find_fused_blocks(sd) for sd in state_dicts]
    for rank, blocks in enumerate(per_rank):
        if set(blocks) != set(per_rank[0]):
            raise ValueError(
                f"rank {rank} holds the MoE blocks {sorted(blocks)} but rank 0 holds {sorted(per_rank[0])}"
            )
    merged_blocks = {}
    for prefix, params0 in per_rank[0].items():
        sizes0 = _check_fused_block(prefix, params0)
        for rank in range(1, len(state_dicts)):
            params = per_rank[rank][prefix]
            sizes = _check_fused_block(prefix, params)
            if sizes != sizes0 or set(params) != set(params0):
                raise ValueError(
                    f"rank {rank}'s {prefix}experts.htoh4.weight is {_shape(params['htoh4.weight'])} with "
                    f"{sorted(params)}, but rank 0's is {_shape(params0['htoh4.weight'])} with {sorted(params0)}; "
                    f"every rank must hold the same number of experts of the same shape"
                )
        merged_blocks[prefix] = {
            f"{prefix}experts.{p}": torch.cat([blocks[prefix][p] for blocks in per_rank], dim=0)
            for p in _PARAMS
            if p in params0
        }

    def block_of_key(key):
        match = _FUSED_KEY.match(key) if isinstance(key, str) else None
        return None if match is None else match["prefix"]

    merged = _emit(state_dicts[0], merged_blocks, block_of_key, lambda prefix, entries: entries)
    owner = {key: 0 for key in merged}
    for rank in range(1, len(state_dicts)):
        for key, value in state_dicts[rank].items():
            if block_of_key(key) is not None:
                continue
            if key not in merged:
                merged[key], owner[key] = value, rank
            elif not _equal(merged[key], value):
                raise ValueError(
                    f"{key} differs between rank {owner[key]} and rank {rank} ({_shape(merged[key])} vs "
                    f"{_shape(value)}); it is not an expert tensor, so every rank must hold the same value"
                )
    return merged


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return a == b


def split_ep_state_dict(state_dict, world_size: int) -> list:
    """The reverse of :func:`merge_ep_state_dicts`: the state dict of a ``world_size=1`` model with E experts per
    block -> the ``world_size`` ranks' state dicts, rank r holding global experts ``r * E / W ...`` (copies, each
    its own storage). Every other entry is shared by all ranks (the same tensor objects)."""
    _check_mapping("state_dict", state_dict)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    blocks = _find_fused_blocks(state_dict)
    sizes = {prefix: _check_fused_block(prefix, params) for prefix, params in blocks.items()}
    for prefix, (num_experts, _, _) in sizes.items():
        if num_experts % world_size:
            raise ValueError(
                f"{prefix}experts.htoh4.weight holds {num_experts} experts, which world_size={world_size} does not "
                f"divide"
            )

    def block_of_key(key):
        match = _FUSED_KEY.match(key) if isinstance(key, str) else None
        return None if match is None else match["prefix"]

    shards = []
    for rank in range(world_size):

        def make_entries(prefix, params, rank=rank):
            local = sizes[prefix][0] // world_size
            return {f"{prefix}experts.{p}": t[rank * local : (rank + 1) * local].clone() for p, t in params.items()}

        shards.append(_emit(state_dict, blocks, block_of_key, make_entries))
    return shards


# ----------------------------------------------------------------------------------------------- the fmoe alias


# FastMoE modules whose fastmoe counterpart is not fastmoe.<the same name>.
_RENAMED_MODULES = {"fmoe.megatron": "fastmoe.integrations.megatron"}


def _real_name(fullname: str) -> str:
    """The fastmoe module that the alias ``fullname`` (``fmoe`` or ``fmoe.X``) stands for."""
    return _RENAMED_MODULES.get(fullname, "fastmoe" + fullname[len("fmoe") :])


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``fmoe.<name>`` to the module ``fastmoe.<name>`` itself (one module object under two names), so
    classes imported either way are the same classes. Without it, ``import fmoe.gates`` would find
    ``gates/__init__.py`` through ``fastmoe.__path__`` and run it a second time as a new module."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("fmoe."):
            return None
        real_name = _real_name(fullname)
        try:
            module = importlib.import_module(real_name)
        except ModuleNotFoundError as error:
            if error.name != real_name:
                raise
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: fmoe is an alias of fastmoe (fastmoe.compat.install_fmoe_alias), "
                f"and fastmoe has no {real_name!r}; docs/porting-from-fastmoe.md lists what FastMoE has that "
                f"fastmoe does not",
                name=fullname,
            ) from None
        return importlib.util.spec_from_loader(fullname, self, is_package=hasattr(module, "__path__"))

    def __init__(self):
        self._real_specs = {}

    def create_module(self, spec):
        module = importlib.import_module(_real_name(spec.name))
        self._real_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # Between create_module and here the import system stamped the alias spec onto the (already run) module;
        # put its own back, so it keeps one identity (reload, pickling and tools read __spec__).
        module.__spec__ = self._real_specs.pop(module.__spec__.name)


def _alias_finder():
    return next((f for f in sys.meta_path if isinstance(f, _AliasFinder)), None)


def install_fmoe_alias():
    """Makes ``import fmoe`` and ``from fmoe.gates import NaiveGate`` give fastmoe's modules, for FastMoE code that
    cannot be edited. Opt-in: fastmoe ships no ``fmoe`` package, because it would shadow a real FastMoE install.

    Refuses (``RuntimeError`` naming where it is) when a real ``fmoe`` is importable or already imported: code that
    asks for FastMoE must not silently get fastmoe, nor the reverse. Calling it again is a no-op. Returns the
    ``fmoe`` module (which is ``fastmoe``). ``fmoe.megatron`` is ``fastmoe.integrations.megatron`` (its ``fmoefy``
    upcycles non-Megatron models and refuses Megatron-LM ones, saying what to do). Names FastMoE has and fastmoe
    lacks (``fmoe.functions``) still fail with ``ModuleNotFoundError``, saying so.
    """
    import fastmoe

    current = sys.modules.get("fmoe")
    if current is fastmoe:
        if _alias_finder() is None:
            sys.meta_path.insert(0, _AliasFinder())
        return fastmoe
    if current is not None:
        where = getattr(current, "__file__", None) or repr(current)
        raise RuntimeError(
            f"a module named 'fmoe' is already imported (from {where}), probably FastMoE; fastmoe will not replace "
            f"it. Use `import fastmoe as fmoe` in the code you port instead"
        )
    spec = importlib.util.find_spec("fmoe")
    if spec is not None:
        where = spec.origin or list(spec.submodule_search_locations or []) or spec.name
        raise RuntimeError(
            f"a real 'fmoe' package is importable (from {where}), probably FastMoE; fastmoe will not shadow it. "
            f"Uninstall it or use `import fastmoe as fmoe` in the code you port instead"
        )
    sys.modules["fmoe"] = fastmoe
    sys.meta_path.insert(0, _AliasFinder())
    return fastmoe


def uninstall_fmoe_alias() -> None:
    """Undoes :func:`install_fmoe_alias`: forgets ``fmoe`` and every ``fmoe.*`` name that points at a fastmoe
    module (a real FastMoE import is left alone)."""
    finder = _alias_finder()
    if finder is not None:
        sys.meta_path.remove(finder)
    for name in [n for n in sys.modules if n == "fmoe" or n.startswith("fmoe.")]:
        module = sys.modules[name]
        if getattr(module, "__name__", "") == _real_name(name):
            del sys.modules[name]
