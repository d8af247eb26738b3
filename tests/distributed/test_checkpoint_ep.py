"""fastmoe.checkpoint across expert-parallel sizes, with real multi-process EP models (gloo on loopback).

The parent trains the single-process model (every layer world_size=1, all experts) as the reference and saves
it. Then two spawns:
- W=4: 2 data-parallel x 2 EP trains two steps from the same initial weights and saves; EP=4 loads it (2 -> 4);
  both take one more step; saves in between let the parent compare states bitwise. The parent reads DCP's index
  of the 2 x 2 checkpoint: every chunk of every expert tensor is stored once, by one of the two replicas.
- W=2: EP=2 loads the EP=4 checkpoint (4 -> 2) and the single-process one (1 -> 2); an EP size that does not divide
  the expert count fails on every rank; last, a save in which rank 0 is killed inside DCP's save (its tensor file
  written, DCP's .metadata not yet): it exits with the fault's exit code, and rank 1 raises instead of waiting.
In every layout each rank runs its own tokens and the outputs must equal the consolidated single-process model's
on those tokens. The parent checks 2 -> 1, compares the resharded optimizer states bitwise, and checks that the
killed save left its staging folder, the previous checkpoint loads, and the next save cleans up.

A second test saves a model whose experts are modules (``FMoE(expert=...)`` over a plain process group) at EP 2 and
loads it at EP 1 and EP 4; consolidate() gives the one-process model's state dict.

The last tests, at 2 ranks: layers under torch.compile or activation checkpointing save every rank's experts;
FSDP2 over the experts of a process-group layer is refused, committing nothing; the other ranks wait as long as
rank 0 waits for the folder's lock; a rank slower inside DCP than FASTMOE_CHECKPOINT_TIMEOUT fails the save with a
CheckpointError on every rank.
"""

import fcntl
import math
import os
import re
import threading
import time
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist
from ckpt_models import (
    D_HIDDEN,
    D_MODEL,
    NUM_EXPERTS,
    NUM_TOKENS,
    TOP_K,
    ExpertModulesModel,
    TinyMoEModel,
    batch,
    make_model,
)
from ckpt_models import make_optimizer as make_adam
from dist_harness import WorkerError, run_workers
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex

import fastmoe
from conftest import assert_bitwise_equal
from fastmoe import checkpoint
from fastmoe.checkpoint import CheckpointError

STEPS_BEFORE_SAVE = 2
# fp64, so the comparisons between layouts (whose sums run in other orders) can be tight.
DTYPE = torch.float64


# ----------------------------------------------------------------------------------------------- helpers


def shard_state(full: dict, ep_size: int, moe_rank: int) -> dict:
    """The state dict of rank ``moe_rank`` of an EP model, sliced from the single-process state dict."""
    per_rank = NUM_EXPERTS // ep_size
    lo = moe_rank * per_rank
    out = {}
    for key, value in full.items():
        if key.startswith("mlp.experts."):
            out[key] = value[lo : lo + per_rank].clone()
        elif key.startswith("moe.experts."):
            _, _, index, rest = key.split(".", 3)
            if lo <= int(index) < lo + per_rank:
                out[f"moe.experts.{int(index) - lo}.{rest}"] = value.clone()
        else:
            out[key] = value.clone()
    return out


def groups(rank: int, world_size: int, ep_size: int):
    """``(moe_group, expert_dp_group)`` of this rank, from fastmoe.distributed.expert_parallel_groups: EP groups of
    consecutive ranks, and the groups of ranks that hold the same experts (None where a group has one rank)."""
    moe_group, expert_dp_group = fastmoe.distributed.expert_parallel_groups(ep_size)
    return (moe_group if ep_size > 1 else None), (expert_dp_group if world_size // ep_size > 1 else None)


def ep_model(ep_size: int, moe_group) -> TinyMoEModel:
    return TinyMoEModel(world_size=ep_size, moe_group=moe_group).to(DTYPE)


def local_batch(step: int, rank: int, world_size: int):
    x, target = batch(step, dtype=DTYPE)
    rows = NUM_TOKENS // world_size
    return x[rank * rows : (rank + 1) * rows], target[rank * rows : (rank + 1) * rows]


def fill_grad(param) -> None:
    """An expert that got no token has a zero gradient whether the layer left it None or zero, so Adam (with
    weight decay) steps every parameter in every layout alike."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)


def ep_train_step(model, optimizer, step: int, rank: int, world_size: int, expert_dp_group) -> None:
    """One step on this rank's share of the global batch; gradients summed like the single-process full batch."""
    x, target = local_batch(step, rank, world_size)
    optimizer.zero_grad()
    (model(x) - target).pow(2).sum().backward()
    for name, param in model.named_parameters():
        fill_grad(param)
        if ".experts." not in name:
            dist.all_reduce(param.grad)
        elif expert_dp_group is not None:
            dist.all_reduce(param.grad, group=expert_dp_group)
    optimizer.step()


def single_process_model(state_dict: dict) -> TinyMoEModel:
    model = TinyMoEModel().to(DTYPE)
    model.load_state_dict(state_dict, strict=True)
    return model


def check_outputs(model, directory: str, tag: str, rank: int, world_size: int, what: str) -> None:
    """The EP model's output on this rank's tokens equals the consolidated single-process model's."""
    x, _ = local_batch(7, rank, world_size)
    expected = single_process_model(checkpoint.consolidate(directory, tag))(x)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")


def assert_states_close(expected: dict, actual: dict, what: str) -> None:
    assert sorted(actual) == sorted(expected), f"{what}: keys differ"
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-9, atol=1e-12, msg=lambda m, k=key: f"{what} {k}: {m}")


# ----------------------------------------------------------------------------------------------- W = 4


def body_w4(rank, world_size, directory, initial):
    torch.manual_seed(0)
    # 2 data-parallel replicas x EP 2: ranks {0, 2} hold experts 0-1, ranks {1, 3} experts 2-3.
    moe_group, expert_dp_group = groups(rank, world_size, ep_size=2)
    dp2 = ep_model(2, moe_group)
    dp2.load_state_dict(shard_state(initial, 2, dist.get_rank(moe_group)))
    dp2_adam = make_adam(dp2)
    for step in range(STEPS_BEFORE_SAVE):
        ep_train_step(dp2, dp2_adam, step, rank, world_size, expert_dp_group)
    wrapped = fastmoe.distributed.DistributedGroupedDataParallel(dp2, need_sync=False)  # saved without "module."
    checkpoint.save(wrapped, dp2_adam, directory, tag="dp2-ep2", extra={"step": STEPS_BEFORE_SAVE})
    check_outputs(dp2, directory, "dp2-ep2", rank, world_size, "2 DP x EP 2")
    ep_train_step(dp2, dp2_adam, STEPS_BEFORE_SAVE, rank, world_size, expert_dp_group)
    checkpoint.save(dp2, dp2_adam, directory, tag="dp2-ep2-next")

    # EP 4 loads the 2 x 2 checkpoint (2 -> 4), saves it again at once, and takes the same next step.
    moe_group4, _ = groups(rank, world_size, ep_size=4)
    ep4 = ep_model(4, moe_group4)
    ep4_adam = make_adam(ep4)
    info = checkpoint.load(ep4, ep4_adam, directory, tag="dp2-ep2")
    assert info["extra"] == {"step": STEPS_BEFORE_SAVE}
    check_outputs(ep4, directory, "dp2-ep2", rank, world_size, "EP 4 from 2 DP x EP 2")
    checkpoint.save(ep4, ep4_adam, directory, tag="ep4")
    ep_train_step(ep4, ep4_adam, STEPS_BEFORE_SAVE, rank, world_size, None)
    checkpoint.save(ep4, ep4_adam, directory, tag="ep4-next")
    check_outputs(ep4, directory, "ep4-next", rank, world_size, "EP 4 after a step")


# ----------------------------------------------------------------------------------------------- W = 2


def body_w2(rank, world_size, directory, single_directory, odd_directory):
    torch.manual_seed(0)
    moe_group, _ = groups(rank, world_size, ep_size=2)

    # 4 -> 2: the EP 4 checkpoint, saved again at once, then the next step.
    ep2 = ep_model(2, moe_group)
    ep2_adam = make_adam(ep2)
    checkpoint.load(ep2, ep2_adam, directory, tag="ep4")
    check_outputs(ep2, directory, "ep4", rank, world_size, "EP 2 from EP 4")
    checkpoint.save(ep2, ep2_adam, directory, tag="ep2-from-ep4")
    ep_train_step(ep2, ep2_adam, STEPS_BEFORE_SAVE, rank, world_size, None)
    checkpoint.save(ep2, ep2_adam, directory, tag="ep2-next")

    # 1 -> 2: the checkpoint the single-process run saved, then its next step.
    from_single = ep_model(2, moe_group)
    single_adam = make_adam(from_single)
    checkpoint.load(from_single, single_adam, single_directory)
    check_outputs(from_single, single_directory, None, rank, world_size, "EP 2 from one process")
    ep_train_step(from_single, single_adam, STEPS_BEFORE_SAVE, rank, world_size, None)
    checkpoint.save(from_single, single_adam, directory, tag="ep2-from-single-next")

    # 3 experts cannot be split over EP 2: every rank raises, none hangs.
    odd = fastmoe.FMoETransformerMLP(
        num_expert=2, d_model=D_MODEL, d_hidden=D_HIDDEN, top_k=TOP_K, world_size=2, moe_group=moe_group
    )
    try:
        checkpoint.load(odd, None, odd_directory)
        raise AssertionError("loading 3 experts at EP size 2 did not fail")
    except CheckpointError as exc:
        assert "EP size 2 does not divide 3" in str(exc), str(exc)

    # A save killed inside DCP's save: rank 0 (which holds the folder's lock) dies once its tensor file is
    # written. DCP's next collective fails on rank 1, which raises: it neither waits for rank 0 nor commits.
    os.environ[checkpoint.FAULT_ENV] = "during_dcp@0"
    try:
        checkpoint.save(ep2, ep2_adam, directory, tag="crashed")
    except RuntimeError:
        assert rank == 1, "rank 0 should have been killed, not raise"
    else:
        raise AssertionError(f"rank {rank}: the save completed although rank 0 was killed in it")
    assert checkpoint.latest(directory) == "ep2-from-single-next"


# ----------------------------------------------------------------------------------------------- the test


def load_single(directory: str, tag: str):
    model = make_model(seed=9).to(DTYPE)
    optimizer = make_adam(model)
    checkpoint.load(model, optimizer, directory, tag=tag)
    return model, optimizer.state_dict()


def assert_same(directory: str, tag_a: str, tag_b: str) -> None:
    """Two checkpoints loaded into the single-process model and Adam are bitwise equal (2 -> 1 for each)."""
    model_a, optim_a = load_single(directory, tag_a)
    model_b, optim_b = load_single(directory, tag_b)
    for key, value in model_a.state_dict().items():
        assert_bitwise_equal(model_b.state_dict()[key], value, f"{tag_b} vs {tag_a}: {key}")
    assert optim_b["param_groups"] == optim_a["param_groups"]
    for index, state in optim_a["state"].items():
        for key, value in state.items():
            assert_bitwise_equal(optim_b["state"][index][key], value, f"{tag_b} vs {tag_a}: Adam {index}.{key}")


def assert_each_expert_chunk_stored_once(path: str) -> None:
    """DCP's index of a 2 DP x EP 2 checkpoint: every expert tensor (parameters and Adam state, in the one-process
    model's names and shapes) is covered by its chunks exactly once and each chunk has one record; and every byte
    of every tensor file belongs to exactly one record, so no chunk was written by both of the data-parallel
    replicas that hold it (a second copy would be bytes that no record names)."""
    metadata = FileSystemReader(path).read_metadata()
    experts = {key: md for key, md in metadata.state_dict_metadata.items() if ".experts." in key}
    # exactly the one-process model's expert entries and their Adam state (a module per expert under its global
    # index), each in its one-process shape
    single = TinyMoEModel().to(DTYPE)
    want = {f"model.{name}": value.shape for name, value in single.state_dict().items() if ".experts." in name}
    for name, param in single.named_parameters():
        if ".experts." in name:
            want.update({f"optim.state.{name}.{k}": param.shape for k in ("exp_avg", "exp_avg_sq")})
            want[f"optim.state.{name}.step"] = torch.Size([])
    assert {key: md.size for key, md in experts.items()} == want, sorted(set(experts) ^ set(want))
    fused = experts["model.mlp.experts.htoh4.weight"]  # one chunk per EP rank of the [4, ...] tensor
    assert sorted(tuple(c.offsets) for c in fused.chunks) == [(0, 0, 0), (NUM_EXPERTS // 2, 0, 0)], fused.chunks
    for key, md in experts.items():
        offsets = [tuple(chunk.offsets) for chunk in md.chunks]
        assert len(set(offsets)) == len(offsets), f"{key}: a chunk is listed more than once: {offsets}"
        covered = sum(math.prod(chunk.sizes) for chunk in md.chunks)
        assert covered == math.prod(md.size), f"{key}: chunks {md.chunks} do not cover {list(md.size)} once"
        for chunk in md.chunks:
            assert MetadataIndex(key, chunk.offsets) in metadata.storage_data, f"{key} {offsets}: no record"
    spans = defaultdict(list)
    for info in metadata.storage_data.values():
        spans[info.relative_path].append((info.offset, info.length))
    files = sorted(f for f in os.listdir(path) if f.endswith(".distcp"))
    assert files == [f"__{r}_0.distcp" for r in range(4)], files
    assert set(spans) <= set(files), sorted(spans)
    for fname in files:
        end = 0
        for offset, length in sorted(spans[fname]):
            assert offset == end, f"{fname}: bytes [{end}, {offset}) belong to no record (a chunk written twice?)"
            end += length
        size = os.path.getsize(os.path.join(path, fname))
        assert end == size, f"{fname}: its records end at byte {end}, the file has {size}"


def test_resharding_round_trips_across_ep_sizes(tmp_path):
    directory, single_directory, odd_directory = (str(tmp_path / name) for name in ("ckpt", "single", "odd"))
    # The single-process reference: full batch, same loss, same Adam.
    model = make_model(seed=0).to(DTYPE)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_adam(model)
    for step in range(STEPS_BEFORE_SAVE + 1):
        if step == STEPS_BEFORE_SAVE:
            checkpoint.save(model, optimizer, single_directory)
        x, target = batch(step, dtype=DTYPE)
        optimizer.zero_grad()
        (model(x) - target).pow(2).sum().backward()
        for layer in (model.mlp, model.moe):  # the layouts below leave no EP rank idle
            assert min(layer.balance_stats()["expert_counts"]) > 0, f"step {step}: an expert got no token"
        for param in model.parameters():
            fill_grad(param)
        optimizer.step()
    reference_next = model.state_dict()
    odd = fastmoe.FMoETransformerMLP(num_expert=3, d_model=D_MODEL, d_hidden=D_HIDDEN, top_k=TOP_K).to(DTYPE)
    checkpoint.save(odd, None, odd_directory)

    run_workers(4, body_w4, directory, initial, timeout=240)
    assert_each_expert_chunk_stored_once(os.path.join(directory, "dp2-ep2"))
    with pytest.raises(WorkerError) as failed:
        run_workers(2, body_w2, directory, single_directory, odd_directory, timeout=240)
    # rank 1 returned: its body's checks (the save raised, nothing was committed) passed
    exit_code = f"exit code {checkpoint.FAULT_EXIT_CODE} without a result"
    assert failed.value.failures == {0: exit_code}, str(failed.value)

    # Resharded optimizer state and parameters, bitwise: 2x2 -> 4 -> (1), 4 -> 2 -> (1), 2x2 -> (1).
    assert_same(directory, "dp2-ep2", "ep4")
    assert_same(directory, "dp2-ep2", "ep2-from-ep4")
    # One more Adam step after loading matches the run that did not stop (the sums of the gradients run in
    # another order, hence a tolerance).
    uninterrupted = load_single(directory, "dp2-ep2-next")[0].state_dict()
    for tag in ("ep4-next", "ep2-next"):
        assert_states_close(uninterrupted, load_single(directory, tag)[0].state_dict(), tag)
    assert_states_close(reference_next, load_single(directory, "ep2-from-single-next")[0].state_dict(), "1 -> 2")

    # The killed save left its staging folder (both tensor files, neither DCP's .metadata nor meta.json) and the
    # previous checkpoints as they were.
    assert "crashed" not in checkpoint.list_checkpoints(directory)
    assert checkpoint.latest(directory) == "ep2-from-single-next"
    (staging,) = [name for name in os.listdir(directory) if name.startswith(".partial-crashed.")]
    staged = sorted(os.listdir(os.path.join(directory, staging)))
    assert staged == ["__0_0.distcp", "__1_0.distcp"], staged
    model, optimizer_state = load_single(directory, checkpoint.latest(directory))
    # The next save takes the lock the killed rank 0 held, deletes the staging folder and commits.
    optimizer = make_adam(model)
    optimizer.load_state_dict(optimizer_state)
    checkpoint.save(model, optimizer, directory, tag="after-crash", lock_timeout=10)
    assert not [name for name in os.listdir(directory) if name.startswith(".partial-")], os.listdir(directory)
    assert checkpoint.latest(directory) == "after-crash"
    assert checkpoint.list_checkpoints(directory)[-1] == "after-crash"
    assert_same(directory, "ep2-from-single-next", "after-crash")


# ----------------------------------------------------------------------------------------------- experts as modules


def expert_modules_model(ep_size: int, moe_group=None) -> ExpertModulesModel:
    return ExpertModulesModel(world_size=ep_size, moe_group=moe_group).to(DTYPE)


def named_state(model, optimizer) -> tuple[dict, dict]:
    """``({name: parameter}, {name: {state key: value}})`` as numpy arrays (to return from a worker)."""
    params = {name: p.detach().numpy().copy() for name, p in model.named_parameters()}
    state = {name: {k: v.numpy().copy() for k, v in optimizer.state[p].items()} for name, p in model.named_parameters()}
    return params, state


def local_name(name: str, ep_size: int, moe_rank: int) -> str | None:
    """The name on moe rank ``moe_rank`` of EP ``ep_size`` of the one-process model's parameter ``name`` (None
    when that rank does not hold it)."""
    if not name.startswith("moe.experts."):
        return name
    _, _, index, rest = name.split(".", 3)
    per_rank = NUM_EXPERTS // ep_size
    g = int(index) - moe_rank * per_rank
    return f"moe.experts.{g}.{rest}" if 0 <= g < per_rank else None


def save_expert_modules_ep2(rank, world_size, directory, initial):
    """EP 2 (plain moe_group) from the one-process state, one Adam step, saved; returns each rank's parameters and
    Adam state by name."""
    moe_group, _ = groups(rank, world_size, ep_size=2)
    model = expert_modules_model(2, moe_group)
    model.load_state_dict(shard_state(initial, 2, dist.get_rank(moe_group)))
    optimizer = make_adam(model)
    ep_train_step(model, optimizer, 0, rank, world_size, None)
    checkpoint.save(model, optimizer, directory, tag="ep2")
    return named_state(model, optimizer)


def load_expert_modules_ep4(rank, world_size, directory, params, state):
    """EP 4 loads the EP 2 checkpoint: each rank holds exactly its global expert, and its Adam state, bitwise."""
    moe_group, _ = groups(rank, world_size, ep_size=4)
    model = expert_modules_model(4, moe_group)
    optimizer = make_adam(model)
    checkpoint.load(model, optimizer, directory, tag="ep2")
    mine = {local_name(name, 4, rank): name for name in params}
    mine.pop(None, None)
    assert sorted(mine) == sorted(n for n, _ in model.named_parameters()), (sorted(mine), rank)
    for name, param in model.named_parameters():
        want = mine[name]
        assert_bitwise_equal(param.detach(), torch.from_numpy(params[want]), f"EP 4 rank {rank}: {name} ({want})")
        got = optimizer.state[param]
        assert sorted(got) == sorted(state[want]), (name, sorted(got))
        for key, value in state[want].items():
            assert_bitwise_equal(got[key], torch.from_numpy(value), f"EP 4 rank {rank}: Adam {key} of {name}")


def test_expert_modules_saved_at_ep2_load_at_ep1_and_ep4(tmp_path):
    directory = str(tmp_path / "ckpt")
    torch.manual_seed(3)
    initial = {k: v.clone() for k, v in expert_modules_model(1).state_dict().items()}
    ranks = run_workers(2, save_expert_modules_ep2, directory, initial, timeout=120)
    # the one-process model's parameters and Adam state: rank r's local expert l is global expert 2 r + l
    params, state = {}, {}
    for moe_rank, (rank_params, rank_state) in enumerate(ranks):
        for name, _ in expert_modules_model(1).named_parameters():
            local = local_name(name, 2, moe_rank)
            if local is not None:
                params[name], state[name] = rank_params[local], rank_state[local]
    for name in params:
        if not name.startswith("moe.experts."):  # replicated: the same on both ranks
            assert_bitwise_equal(torch.from_numpy(ranks[1][0][name]), torch.from_numpy(params[name]), name)

    # consolidate(): the one-process model's state dict
    consolidated = checkpoint.consolidate(directory)
    single = expert_modules_model(1)
    assert sorted(consolidated) == sorted(single.state_dict()), sorted(consolidated)
    for name, value in params.items():
        assert_bitwise_equal(consolidated[name], torch.from_numpy(value), f"consolidate: {name}")
    # EP 1: load() into the one-process model and Adam
    optimizer = make_adam(single)
    checkpoint.load(single, optimizer, directory)
    for name, param in single.named_parameters():
        assert_bitwise_equal(param.detach(), torch.from_numpy(params[name]), f"EP 1: {name}")
        for key, value in state[name].items():
            assert_bitwise_equal(optimizer.state[param][key], torch.from_numpy(value), f"EP 1: Adam {key} of {name}")
    # EP 4
    run_workers(4, load_expert_modules_ep4, directory, params, state, timeout=120)


# ----------------------------------------------------------------------------------------------- wrapped layers


def numpy_state(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def save_wrapped_ep2(rank, world_size, directories):
    """EP 2 over the default group with other experts on each rank (replicated parameters alike), saved once
    compiled (``torch.compile`` names every module under ``_orig_mod``) and once with both MoE layers under
    activation checkpointing's ``checkpoint_wrapper`` (``_checkpoint_wrapped_module``). Returns this rank's state
    dict."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    model = ep_model(2, None)
    gen = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=DTYPE))
    state = numpy_state(model)
    checkpoint.save(torch.compile(model), None, directories["compile"])
    wrapped = ep_model(2, None)
    wrapped.load_state_dict(model.state_dict())
    wrapped.mlp, wrapped.moe = checkpoint_wrapper(wrapped.mlp), checkpoint_wrapper(wrapped.moe)
    checkpoint.save(wrapped, None, directories["checkpoint_wrapper"])
    return state


def test_compiled_and_activation_checkpointed_layers_save_every_rank_s_experts(tmp_path):
    directories = {mode: str(tmp_path / mode) for mode in ("compile", "checkpoint_wrapper")}
    ranks = run_workers(2, save_wrapped_ep2, directories, timeout=120)
    # the one-process state dict: moe rank r's local expert l is global expert 2 r + l
    expected = {}
    for name in TinyMoEModel().state_dict():
        if name.startswith("mlp.experts."):
            expected[name] = torch.cat([torch.from_numpy(state[name]) for state in ranks])
        elif name.startswith("moe.experts."):
            _, _, index, rest = name.split(".", 3)
            expected[name] = torch.from_numpy(ranks[int(index) // 2][f"moe.experts.{int(index) % 2}.{rest}"])
        else:
            expected[name] = torch.from_numpy(ranks[0][name])
    assert not torch.equal(expected["mlp.experts.htoh4.weight"][:2], expected["mlp.experts.htoh4.weight"][2:])
    for mode, directory in directories.items():
        layers = checkpoint.read_meta(directory)["layers"]
        assert {name: info["ep_size"] for name, info in layers.items()} == {"mlp": 2, "moe": 2}, (mode, layers)
        consolidated = checkpoint.consolidate(directory)
        assert sorted(consolidated) == sorted(expected), (mode, sorted(consolidated))
        for name, value in expected.items():
            assert_bitwise_equal(consolidated[name], value, f"{mode}: {name}")


# ----------------------------------------------------------------------------------------------- FSDP2 refused


def fsdp2_over_process_group_experts(rank, world_size, directory):
    """FSDP2 (``fully_shard``) over the experts of a layer built with a process group: the save is refused on every
    rank with the entry and the layer named, and nothing is committed. Returns the messages."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    moe_group, replicas = fastmoe.distributed.expert_parallel_groups(2)
    torch.manual_seed(0)
    model = ep_model(2, moe_group)
    checkpoint.save(model, None, directory, tag="before")
    fully_shard(model.mlp.experts, mesh=DeviceMesh.from_group(replicas, "cpu"))
    try:
        checkpoint.save(model, None, directory, tag="sharded")
    except CheckpointError as exc:
        message = str(exc)
    else:
        raise AssertionError(f"rank {rank}: the save of FSDP2-sharded process-group experts was not refused")
    assert checkpoint.latest(directory) == "before"
    return message


def test_fsdp2_over_process_group_experts_is_refused(tmp_path):
    directory = str(tmp_path / "ckpt")
    messages = run_workers(2, fsdp2_over_process_group_experts, directory, timeout=120)
    for rank, message in enumerate(messages):
        assert re.search(r"'mlp\.experts\.h(toh4|4toh)\.(weight|bias)' of MoE layer 'mlp'", message), (rank, message)
        assert "moe_group=<DeviceMesh>" in message, (rank, message)
    assert checkpoint.list_checkpoints(directory) == ["before"]
    assert checkpoint.latest(directory) == "before"


# ----------------------------------------------------------------------------------------------- slow ranks


LOCK_HELD_S = 6.0  # longer than FASTMOE_COMM_TIMEOUT below, shorter than lock_timeout


def save_while_the_lock_is_held(rank, world_size, directory, ready):
    """Both ranks save while another job holds the folder's lock for LOCK_HELD_S: rank 0 waits for the lock and
    rank 1 for rank 0, both longer than FASTMOE_COMM_TIMEOUT. Returns (the path, seconds the save took)."""
    os.environ["FASTMOE_COMM_TIMEOUT"] = "3"
    model = ep_model(2, None)
    dist.barrier()
    if rank == 0:
        open(ready, "w").close()
    start = time.monotonic()
    path = checkpoint.save(model, None, directory, tag="after-wait", lock_timeout=60)
    return path, time.monotonic() - start


def test_other_ranks_wait_while_rank_0_waits_for_the_lock(tmp_path):
    directory, ready = str(tmp_path / "ckpt"), str(tmp_path / "ready")
    os.makedirs(directory)
    fd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another job's save holds the folder

    def release():  # LOCK_HELD_S after rank 0 starts its save
        deadline = time.monotonic() + 120
        while not os.path.exists(ready) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(LOCK_HELD_S)
        fcntl.flock(fd, fcntl.LOCK_UN)

    releaser = threading.Thread(target=release, daemon=True)
    releaser.start()
    try:
        results = run_workers(2, save_while_the_lock_is_held, directory, ready, timeout=120)
    finally:
        releaser.join()
        os.close(fd)
    assert [path for path, _ in results] == [os.path.join(directory, "after-wait")] * 2, results
    # both waited for the lock (rank 1 longer than FASTMOE_COMM_TIMEOUT) and then saved
    assert min(seconds for _, seconds in results) > LOCK_HELD_S - 1, results
    assert checkpoint.latest(directory) == "after-wait"


def save_with_a_slow_rank(rank, world_size, directory):
    """A save in which rank 1 writes its tensor file 5 s later than rank 0, with FASTMOE_CHECKPOINT_TIMEOUT=2:
    every rank raises a CheckpointError, none commits. Returns the messages."""
    from torch.distributed.checkpoint import FileSystemWriter

    model = ep_model(2, None)
    checkpoint.save(model, None, directory, tag="before")
    write_data = FileSystemWriter.write_data

    def slow_write_data(self, plan, planner):  # a disk 5 s slower on rank 1
        if rank == 1:
            time.sleep(5)
        return write_data(self, plan, planner)

    FileSystemWriter.write_data = slow_write_data
    os.environ["FASTMOE_CHECKPOINT_TIMEOUT"] = "2"
    try:
        checkpoint.save(model, None, directory, tag="slow")
    except CheckpointError as exc:
        return str(exc)
    finally:
        FileSystemWriter.write_data = write_data
    raise AssertionError(f"rank {rank}: the save with a rank slower than FASTMOE_CHECKPOINT_TIMEOUT completed")


def test_a_rank_slower_than_the_checkpoint_timeout_fails_the_save_on_every_rank(tmp_path):
    directory = str(tmp_path / "ckpt")
    messages = run_workers(2, save_with_a_slow_rank, directory, timeout=120)
    for rank, message in enumerate(messages):
        assert "FASTMOE_CHECKPOINT_TIMEOUT=2 s" in message, (rank, message)
        assert f"torch.distributed.checkpoint could not save into {directory}{os.sep}.partial-slow." in message, (
            rank,
            message,
        )
    assert checkpoint.list_checkpoints(directory) == ["before"]
    assert checkpoint.latest(directory) == "before"
