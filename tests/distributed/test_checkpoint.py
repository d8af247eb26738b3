"""fastmoe.checkpoint in one process (no process group): a save/load round trip restores the model and Adam
bitwise, consolidate() and a plain ``torch.distributed.checkpoint.load`` give the single-process state dict,
``load(strict=False)`` loads what model and checkpoint share, Adam with a parameter that never got a gradient
round-trips (strict) and an optimizer parameter the checkpoint lacks is left as it is (strict=False),
tags/latest/rotation, clear errors (a truncated or missing file of any kind names it), and crash safety (a
subprocess killed at each point of a save leaves the previous checkpoint intact, resuming from it is bitwise equal
to never having crashed, and the next save cleans up). The multi-process resharding tests are in
test_checkpoint_ep.py."""

import copy
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from ckpt_models import D_HIDDEN, D_MODEL, batch, make_model, make_optimizer, train_step
from torch import nn

import fastmoe
from conftest import CUDA_SKIP_REASON, assert_bitwise_equal
from fastmoe import checkpoint
from fastmoe.checkpoint import CheckpointError

HERE = os.path.dirname(os.path.abspath(__file__))


def assert_same_state(expected: dict, actual: dict, what: str = "state") -> None:
    assert sorted(actual) == sorted(expected), f"{what}: keys differ"
    for key, value in expected.items():
        assert_bitwise_equal(actual[key], value, f"{what} {key}")


def assert_same_optimizer(e: dict, a: dict) -> None:
    """Two optimizer state dicts hold the same groups and bitwise the same state."""
    assert a["param_groups"] == e["param_groups"]
    assert sorted(a["state"]) == sorted(e["state"])
    for index, state in e["state"].items():
        assert sorted(a["state"][index]) == sorted(state)
        for key, value in state.items():
            assert_bitwise_equal(a["state"][index][key], value, f"optimizer state {index}.{key}")


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_round_trip_restores_model_adam_and_rng_bitwise(tmp_path):
    torch.manual_seed(5)
    model = make_model(dropout=0.1)
    optimizer = make_optimizer(model)
    for step in range(2):
        train_step(model, optimizer, step)
    path = checkpoint.save(model, optimizer, str(tmp_path), extra={"step": 2, "rng": checkpoint.rng_state()})
    saved, saved_optimizer = snapshot(model), copy.deepcopy(optimizer.state_dict())
    for step in range(2, 4):  # dropout draws random numbers
        train_step(model, optimizer, step)

    restored = make_model(seed=7, dropout=0.1)
    restored_optimizer = make_optimizer(restored)
    restored_optimizer.param_groups[1]["lr"] = 0.5  # the saved hyperparameters replace these
    info = checkpoint.load(restored, restored_optimizer, str(tmp_path))
    assert info["tag"] == os.path.basename(path) == "ckpt-000001"
    assert info["extra"]["step"] == 2
    assert info["rank_extra"] is None
    assert_same_state(saved, restored.state_dict(), "model")
    assert_same_optimizer(saved_optimizer, restored_optimizer.state_dict())

    checkpoint.set_rng_state(info["extra"]["rng"])
    for step in range(2, 4):
        train_step(restored, restored_optimizer, step)
    assert_same_state(model.state_dict(), restored.state_dict(), "model after resuming")


def test_consolidate_gives_the_single_process_state_dict(tmp_path):
    model = make_model()
    optimizer = make_optimizer(model)
    train_step(model, optimizer, 0)
    checkpoint.save(model, optimizer, str(tmp_path), rank_extra={"rank": 0})
    state_dict = checkpoint.consolidate(str(tmp_path))
    assert_same_state(model.state_dict(), state_dict, "consolidated")
    fresh = make_model(seed=3)
    fresh.load_state_dict(state_dict, strict=True)
    x, _ = batch(9)
    assert_bitwise_equal(fresh(x), model(x), "output of the consolidated model")
    assert checkpoint.load(fresh, None, str(tmp_path))["rank_extra"] == {"rank": 0}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # one process is the intent
def test_plain_dcp_load_reads_a_checkpoint_into_the_one_process_model(tmp_path):
    """The DCP keys are the one-process model's (``model.<key>``, ``optim.state.<parameter>.<state>``): DCP alone
    reads a fastmoe checkpoint, flat or nested, with no fastmoe code on the reading side."""
    model = make_model()
    optimizer = make_optimizer(model)
    for step in range(2):
        train_step(model, optimizer, step)
    path = checkpoint.save(model, optimizer, str(tmp_path))
    params = dict(model.named_parameters())

    for layout in ("flat", "nested"):
        fresh = make_model(seed=3)
        state_dict = fresh.state_dict()
        assert not torch.equal(state_dict["mlp.experts.htoh4.weight"], model.mlp.experts.htoh4.weight)
        # The optimizer state of every parameter, in the parameter's name; a tensor of each shape to load into.
        optim = {
            name: {k: torch.full_like(v, float("nan")) for k, v in optimizer.state[param].items()}
            for name, param in params.items()
        }
        if layout == "flat":
            wanted = {"model." + k: v for k, v in state_dict.items()}
            wanted.update({f"optim.state.{n}.{k}": v for n, state in optim.items() for k, v in state.items()})
        else:
            wanted = {"model": state_dict, "optim": {"state": optim}}
        dcp.load(wanted, checkpoint_id=path, no_dist=True)
        assert_same_state(model.state_dict(), fresh.state_dict(), f"model read by dcp.load ({layout})")
        for name, param in params.items():
            assert_same_state(optimizer.state[param], optim[name], f"Adam state of {name} read by dcp.load ({layout})")


def test_load_non_strict_loads_what_the_model_and_the_checkpoint_share(tmp_path):
    directory, bigger_directory = str(tmp_path / "plain"), str(tmp_path / "bigger")
    model = make_model()
    checkpoint.save(model, None, directory)

    # A model with a replicated module the checkpoint lacks: strict load refuses before changing anything;
    # strict=False loads every other entry and leaves the module as it was.
    bigger = make_model(seed=3)
    bigger.head = nn.Linear(D_MODEL, 3)
    before = snapshot(bigger)
    missing = r"missing keys \['head.weight', 'head.bias'\], unexpected keys \[\]"
    with pytest.raises(CheckpointError, match=missing):
        checkpoint.load(bigger, None, directory)
    assert_same_state(before, bigger.state_dict(), "the model after a refused load")
    checkpoint.load(bigger, None, directory, strict=False)
    loaded = bigger.state_dict()
    assert_same_state(
        {k: before[k] for k in ("head.weight", "head.bias")}, {k: loaded.pop(k) for k in ("head.weight", "head.bias")}
    )
    assert_same_state(model.state_dict(), loaded, "the entries the checkpoint holds")

    # The other way round: a checkpoint with an entry the model lacks.
    checkpoint.save(bigger, None, bigger_directory)
    smaller = make_model(seed=4)
    unexpected = r"missing keys \[\], unexpected keys \['head.weight', 'head.bias'\]"
    with pytest.raises(CheckpointError, match=unexpected):
        checkpoint.load(smaller, None, bigger_directory)
    checkpoint.load(smaller, None, bigger_directory, strict=False)
    assert_same_state(model.state_dict(), smaller.state_dict(), "the entries the model holds")


def test_tags_latest_and_rotation(tmp_path):
    directory = str(tmp_path / "ckpt")
    model = make_model()
    assert checkpoint.latest(directory) is None
    checkpoint.save(model, None, directory)
    checkpoint.save(model, None, directory, tag="step-5")
    bias_at_step_5 = model.embed.bias.detach().clone()
    with torch.no_grad():
        model.embed.bias.add_(1.0)
    checkpoint.save(model, None, directory, keep=2)
    assert checkpoint.list_checkpoints(directory) == ["step-5", "ckpt-000003"]
    assert checkpoint.latest(directory) == "ckpt-000003"
    assert not os.path.exists(os.path.join(directory, "ckpt-000001"))
    assert sorted(os.listdir(directory)) == [".lock", "ckpt-000003", "latest", "step-5"]

    older = make_model(seed=4)
    assert checkpoint.load(older, None, directory, tag="step-5")["tag"] == "step-5"
    assert_bitwise_equal(older.embed.bias, bias_at_step_5, "embed.bias of step-5")
    newest = make_model(seed=4)
    checkpoint.load(newest, None, directory)
    assert_bitwise_equal(newest.embed.bias, model.embed.bias, "embed.bias of the latest")

    with pytest.raises(CheckpointError, match="step-5 already exists"):
        checkpoint.save(model, None, directory, tag="step-5")
    for bad in ("../escape", ".hidden", "latest", "a/b", ""):
        with pytest.raises(ValueError, match="tag must be"):
            checkpoint.save(model, None, directory, tag=bad)
    with pytest.raises(ValueError, match="keep must be None or a positive int, got 0"):
        checkpoint.save(model, None, directory, keep=0)


def test_errors_name_the_path_key_and_values(tmp_path):
    directory = str(tmp_path)
    model = make_model()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        checkpoint.load(model, None, directory)
    checkpoint.save(model, None, directory)

    with pytest.raises(CheckpointError, match=r"checkpoint 'nope' is not complete .*nope/meta.json is missing"):
        checkpoint.load(model, None, directory, tag="nope")
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        checkpoint.load(model, make_optimizer(model), directory)

    wider = make_model()
    wider.mlp = fastmoe.FMoETransformerMLP(num_expert=4, d_model=D_MODEL, d_hidden=D_HIDDEN + 2, top_k=2)
    shapes = r"'mlp.experts.htoh4.weight'.*shape \[4, 12, 8\], the model \[4, 14, 8\]"
    with pytest.raises(CheckpointError, match=shapes):
        checkpoint.load(wider, None, directory)
    more = make_model()
    more.mlp = fastmoe.FMoETransformerMLP(num_expert=6, d_model=D_MODEL, d_hidden=D_HIDDEN, top_k=2)
    with pytest.raises(CheckpointError, match=r"layer 'mlp' has num_expert=6 x EP size 1 = 6 experts, but .* holds 4"):
        checkpoint.load(more, None, directory)
    extra_layer = make_model()
    extra_layer.more = fastmoe.FMoETransformerMLP(num_expert=4, d_model=D_MODEL, d_hidden=D_HIDDEN, top_k=2)
    with pytest.raises(CheckpointError, match=r"MoE layers \['mlp', 'moe', 'more'\] differ .* \['mlp', 'moe'\]"):
        checkpoint.load(extra_layer, None, directory)


# Every file of a checkpoint: DCP's tensor data of rank 0 and its index, fastmoe's state file and a rank file.
CHECKPOINT_FILES = ("__0_0.distcp", ".metadata", "state.pt", "rank-00000.pt")


@pytest.mark.parametrize("fname", CHECKPOINT_FILES)
def test_a_truncated_or_missing_file_raises_naming_it(tmp_path, fname):
    directory = str(tmp_path)
    model = make_model()
    optimizer = make_optimizer(model)
    train_step(model, optimizer, 0)
    path = checkpoint.save(model, optimizer, directory, rank_extra={"rank": 0})
    assert fname in checkpoint.read_meta(directory)["files"]
    target = os.path.join(path, fname)
    with open(target, "rb") as f:
        original = f.read()

    # Every file is checked before anything is read: load and consolidate raise for each one.
    with open(target, "r+b") as f:
        f.truncate(len(original) - 10)
    truncated = rf"{re.escape(target)} has {len(original) - 10} bytes but meta.json recorded {len(original)}"
    restored = make_model(seed=3)
    restored_optimizer = make_optimizer(restored)
    before = snapshot(restored)
    with pytest.raises(CheckpointError, match=truncated):
        checkpoint.load(restored, restored_optimizer, directory)
    with pytest.raises(CheckpointError, match=truncated):
        checkpoint.consolidate(directory)
    os.remove(target)
    missing = rf"checkpoint file {re.escape(target)} is missing"
    with pytest.raises(CheckpointError, match=missing):
        checkpoint.load(restored, restored_optimizer, directory)
    with pytest.raises(CheckpointError, match=missing):
        checkpoint.consolidate(directory)
    assert_same_state(before, restored.state_dict(), "the model after the refused loads")

    # With its bytes back, the checkpoint loads as saved.
    with open(target, "wb") as f:
        f.write(original)
    assert checkpoint.load(restored, restored_optimizer, directory)["rank_extra"] == {"rank": 0}
    assert_same_state(model.state_dict(), restored.state_dict(), "model")
    assert_same_optimizer(optimizer.state_dict(), restored_optimizer.state_dict())


def test_optimizer_groups_must_match(tmp_path):
    model = make_model()
    optimizer = make_optimizer(model)
    train_step(model, optimizer, 0)
    checkpoint.save(model, optimizer, str(tmp_path))
    one_group = torch.optim.Adam(model.parameters())
    with pytest.raises(CheckpointError, match="the optimizer has 1 param groups, .* has 2"):
        checkpoint.load(model, one_group, str(tmp_path))
    swapped = make_optimizer(model)
    swapped.param_groups.reverse()
    group = r"'mlp.experts.htoh4.weight' is in optimizer param group 0, but not in group 0 of"
    with pytest.raises(CheckpointError, match=group):
        checkpoint.load(model, swapped, str(tmp_path))


# ----------------------------------------------------------------------------------------------- crash safety


@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """A folder with checkpoint 'a' (after two steps with dropout), the model state it holds, and the state of
    the run that went on two more steps without stopping."""
    directory = str(tmp_path_factory.mktemp("base") / "ckpt")
    torch.manual_seed(11)
    model = make_model(seed=1, dropout=0.1)
    optimizer = make_optimizer(model)
    for step in range(2):
        train_step(model, optimizer, step)
    checkpoint.save(model, optimizer, directory, tag="a", extra={"step": 2, "rng": checkpoint.rng_state()})
    saved = snapshot(model)
    for step in range(2, 4):
        train_step(model, optimizer, step)
    return directory, saved, snapshot(model)


# The files in the staging folder of a save killed at each point before its commit (the save writes no rank file).
STAGED = {
    "after_staging": [],
    "during_dcp": ["__0_0.distcp"],
    "after_dcp": [".metadata", "__0_0.distcp"],
    "before_meta": [".metadata", "__0_0.distcp", "state.pt"],
    "before_commit": [".metadata", "__0_0.distcp", "meta.json", "state.pt"],
}


@pytest.mark.parametrize("point", checkpoint.FAULT_POINTS)
def test_a_save_killed_at_each_point_leaves_the_previous_checkpoint(resumable, tmp_path, point):
    base, saved, uninterrupted = resumable
    directory = str(tmp_path / "ckpt")
    shutil.copytree(base, directory)
    env = dict(os.environ, FASTMOE_CHECKPOINT_FAULT=point)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(fastmoe.__file__)), HERE])
    code = f"import ckpt_models; ckpt_models.crash_during_save({directory!r}, 'b')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == checkpoint.FAULT_EXIT_CODE, f"exit code {proc.returncode}\n{proc.stderr[-3000:]}"

    complete = checkpoint.list_checkpoints(directory)
    if point == "before_rotate":  # the new one is complete and named; keep=1 did not get to delete 'a'
        assert (complete, checkpoint.latest(directory)) == (["a", "b"], "b")
    elif point == "before_latest":  # complete but not yet named by latest
        assert (complete, checkpoint.latest(directory)) == (["a", "b"], "a")
    else:
        assert (complete, checkpoint.latest(directory)) == (["a"], "a")
        assert not os.path.exists(os.path.join(directory, "b"))
    # The crash leaves its staging folder, holding what was written up to that point.
    staging = [name for name in os.listdir(directory) if name.startswith(".partial-b.")]
    if point in STAGED:
        assert len(staging) == 1, os.listdir(directory)
        assert sorted(os.listdir(os.path.join(directory, staging[0]))) == STAGED[point]
    else:
        assert not staging, staging

    # 'a' is intact, and resuming from it is bitwise the run that never stopped.
    model = make_model(seed=2, dropout=0.1)
    optimizer = make_optimizer(model)
    info = checkpoint.load(model, optimizer, directory, tag="a")
    assert_same_state(saved, model.state_dict(), "checkpoint 'a'")
    checkpoint.set_rng_state(info["extra"]["rng"])
    for step in range(info["extra"]["step"], 4):
        train_step(model, optimizer, step)
    assert_same_state(uninterrupted, model.state_dict(), "resumed run")
    latest = make_model(seed=2)
    assert checkpoint.load(latest, make_optimizer(latest), directory)["tag"] == checkpoint.latest(directory)

    # The next save cleans up what the crash left (the lock file stays: it is the folder's, not a save's).
    checkpoint.save(model, optimizer, directory, tag="c")
    assert checkpoint.latest(directory) == "c"
    assert [name for name in os.listdir(directory) if name.startswith(".")] == [".lock"]


@pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or "")
def test_cuda_model_saves_to_cpu_files_and_loads_on_either_device(tmp_path):
    torch.manual_seed(0)
    model = make_model().cuda()
    optimizer = make_optimizer(model)
    x, target = (t.cuda() for t in batch(0))
    optimizer.zero_grad()
    (model(x) - target).pow(2).sum().backward()
    optimizer.step()
    checkpoint.save(model, optimizer, str(tmp_path))
    on_cpu = make_model(seed=3)
    on_cpu.load_state_dict(checkpoint.consolidate(str(tmp_path)))
    assert_same_state({k: v.cpu() for k, v in model.state_dict().items()}, on_cpu.state_dict(), "on the CPU")
    on_gpu = make_model(seed=3).cuda()
    gpu_optimizer = make_optimizer(on_gpu)
    checkpoint.load(on_gpu, gpu_optimizer, str(tmp_path))
    assert all(p.is_cuda for p in on_gpu.parameters())
    assert all(v.is_cuda for s in gpu_optimizer.state.values() for k, v in s.items() if k != "step")
    assert_same_optimizer(optimizer.state_dict(), gpu_optimizer.state_dict())
    assert_bitwise_equal(on_gpu(x), model(x), "output on the GPU")


# ----------------------------------------------------------------------------------------------- optimizer state


def model_with_unused_linear(seed: int) -> nn.Module:
    """The test model plus a Linear that forward never calls: its parameters get no gradient, so Adam (which holds
    them in param group 0) keeps no state for them."""
    model = make_model(seed=seed)
    torch.manual_seed(seed)
    model.unused = nn.Linear(D_MODEL, 3)
    return model


def test_adam_with_a_parameter_that_never_got_a_gradient_round_trips_bitwise(tmp_path):
    model = model_with_unused_linear(0)
    optimizer = make_optimizer(model)
    for step in range(2):
        train_step(model, optimizer, step)
    assert model.unused.weight not in optimizer.state and model.unused.bias not in optimizer.state
    checkpoint.save(model, optimizer, str(tmp_path))
    saved, saved_optimizer = snapshot(model), copy.deepcopy(optimizer.state_dict())

    restored = model_with_unused_linear(3)
    restored_optimizer = make_optimizer(restored)
    checkpoint.load(restored, restored_optimizer, str(tmp_path))  # strict: the state it lacks is not required
    assert_same_state(saved, restored.state_dict(), "model")
    assert_same_optimizer(saved_optimizer, restored_optimizer.state_dict())
    assert (
        restored.unused.weight not in restored_optimizer.state and restored.unused.bias not in restored_optimizer.state
    )
    for step in range(2, 4):
        train_step(model, optimizer, step)
        train_step(restored, restored_optimizer, step)
    assert_same_state(model.state_dict(), restored.state_dict(), "model after resuming")


def test_load_non_strict_keeps_the_optimizer_parameters_the_checkpoint_lacks(tmp_path):
    model = make_model()
    optimizer = make_optimizer(model)
    train_step(model, optimizer, 0)
    checkpoint.save(model, optimizer, str(tmp_path))

    # `unused` is in param group 0 of the optimizer but in no group of the checkpoint
    bigger = model_with_unused_linear(3)
    bigger_optimizer = make_optimizer(bigger)
    unused_before = {k: v.detach().clone() for k, v in bigger.unused.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"missing keys \['unused.weight', 'unused.bias'\]"):
        checkpoint.load(bigger, bigger_optimizer, str(tmp_path))
    checkpoint.load(bigger, bigger_optimizer, str(tmp_path), strict=False)
    loaded = bigger.state_dict()
    assert_same_state(unused_before, {k: loaded.pop(f"unused.{k}") for k in ("weight", "bias")}, "unused")
    assert_same_state(model.state_dict(), loaded, "the entries the checkpoint holds")
    # every shared parameter has its saved Adam state and group hyperparameters; `unused` has none
    params = dict(model.named_parameters())
    for name, param in bigger.named_parameters():
        if name.startswith("unused."):
            assert param not in bigger_optimizer.state, name
        else:
            assert_same_state(optimizer.state[params[name]], bigger_optimizer.state[param], f"Adam state of {name}")
    for saved_group, group in zip(optimizer.param_groups, bigger_optimizer.param_groups, strict=True):
        assert {k: v for k, v in group.items() if k != "params"} == {
            k: v for k, v in saved_group.items() if k != "params"
        }
    train_step(bigger, bigger_optimizer, 1)  # the optimizer steps with the loaded state
    assert float(bigger_optimizer.state[bigger.embed.weight]["step"]) == 2.0


@pytest.mark.parametrize("name", ["FASTMOE_CHECKPOINT_TIMEOUT", "FASTMOE_COMM_TIMEOUT"])
@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf", "nan"])
def test_a_bad_timeout_variable_raises_naming_it_and_its_value(monkeypatch, name, value):
    from fastmoe import _checkpoint_io, _groups

    read = {"FASTMOE_CHECKPOINT_TIMEOUT": _checkpoint_io.dcp_timeout, "FASTMOE_COMM_TIMEOUT": _groups.comm_timeout}
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"{name} must be a positive number of seconds, got '{value}'"):
        read[name]()
    monkeypatch.setenv(name, "12.5")
    assert read[name]() == 12.5
    monkeypatch.delenv(name)
    assert read[name]() == {"FASTMOE_CHECKPOINT_TIMEOUT": 1800.0, "FASTMOE_COMM_TIMEOUT": 60.0}[name]
