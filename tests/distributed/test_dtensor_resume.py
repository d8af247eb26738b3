"""Expert parallelism x FSDP2 trained on 2 gloo ranks, checkpointed with torch.distributed.checkpoint (DCP) and
resumed on 1 rank, matches the one-process run of the same seed on the same global batches (fp64, 1e-10): the loss
and the clipped gradient norm of each of the 20 steps, the model and AdamW state right after the load, and the
final state. The 1-rank resume runs twice: under the same EP x FSDP2 code on a one-rank mesh, and as the plain
model in this process. Bodies in fsdp2_resume_cases.py."""

import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from dist_harness import run_workers
from fsdp2_resume_cases import (
    MAX_NORM,
    SAVE_AT,
    SEED,
    STEPS,
    TOL,
    Net,
    load_checkpoint,
    make_optimizer,
    resume_and_train,
    snapshot,
    train_and_save,
    train_step,
)

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")


def one_process_run():
    """The reference: the plain model, every row of every global batch, torch's own clipping. Returns the
    ``(loss, norm)`` of every step and the state before step SAVE_AT and after the last step."""
    model = Net()
    optimizer = make_optimizer(model)
    history, at_save = [], None
    for step in range(STEPS):
        if step == SAVE_AT:
            at_save = snapshot(model, optimizer)
        history.append(train_step(model, optimizer, step, 0, 1, clip=torch.nn.utils.clip_grad_norm_))
    return history, at_save, snapshot(model, optimizer)


def assert_history_close(got: list, want: list, where: str) -> None:
    for step, ((loss, norm), (want_loss, want_norm)) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(loss, want_loss, **TOL, err_msg=f"{where}: loss of step {step}")
        np.testing.assert_allclose(norm, want_norm, **TOL, err_msg=f"{where}: gradient norm of step {step}")


def assert_state_close(got: dict, want: dict, where: str) -> None:
    assert set(got["params"]) == set(want["params"]) and set(got["optim"]) == set(want["optim"]), where
    for name, value in want["params"].items():
        np.testing.assert_allclose(got["params"][name], value, **TOL, err_msg=f"{where}: parameter {name}")
    for name, state in want["optim"].items():
        assert set(got["optim"][name]) == set(state) == {"step", "exp_avg", "exp_avg_sq"}, (where, name)
        for key, value in state.items():
            np.testing.assert_allclose(got["optim"][name][key], value, **TOL, err_msg=f"{where}: {key} of {name}")


def resume_in_this_process(path: str, with_optimizer_state: bool = True):
    """The plain one-process model (another seed) loads the checkpoint through DCP without a process group and
    trains to STEPS. Without ``with_optimizer_state`` only the model is loaded and AdamW starts afresh."""
    model = Net(seed=SEED + 2)
    optimizer = make_optimizer(model)
    if with_optimizer_state:
        load_checkpoint(model, optimizer, path, no_dist=True)
    else:
        state = {"model": model.state_dict()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path, no_dist=True)
        model.load_state_dict(state["model"])
    history = [
        train_step(model, optimizer, step, 0, 1, clip=torch.nn.utils.clip_grad_norm_) for step in range(SAVE_AT, STEPS)
    ]
    return history, snapshot(model, optimizer)


def test_ep_fsdp2_run_resumed_on_one_rank_matches_the_one_process_run(tmp_path):
    path = str(tmp_path / "dcp")
    want_history, want_at_save, want_final = one_process_run()
    norms = [norm for _, norm in want_history]
    assert min(norms) < MAX_NORM < max(norms), f"the clip must act on some steps and not on others: {norms}"

    # 2 ranks, steps 0 .. SAVE_AT - 1: the ranks' loss parts add up to the one-process loss, and both ranks clip
    # by the one-process norm
    parts = run_workers(2, train_and_save, path, timeout=180.0)
    summed = [(a[0] + b[0], a[1]) for a, b in zip(*parts, strict=True)]
    assert [a[1] for a in parts[1]] == [a[1] for a in parts[0]], "the ranks clipped by different norms"
    assert_history_close(summed, want_history[:SAVE_AT], "2 ranks")

    # 1 rank under the same EP x FSDP2 code (a one-rank mesh): the load gives the state the one-process run had
    # before step SAVE_AT, experts and their AdamW moments assembled from both ranks' shards
    [(loaded, history, final)] = run_workers(1, resume_and_train, path, timeout=180.0)
    assert_state_close(loaded, want_at_save, f"1 rank, loaded at step {SAVE_AT}")
    assert_history_close(history, want_history[SAVE_AT:], "1 rank, resumed")
    assert_state_close(final, want_final, f"1 rank, after step {STEPS}")
    moved = max(np.abs(final["params"][k] - loaded["params"][k]).max() for k in final["params"])
    assert moved > 1e-3, f"the resumed steps barely moved the parameters ({moved}): the comparison would be empty"

    # the plain model in this process, no process group: the same result
    history, final = resume_in_this_process(path)
    assert_history_close(history, want_history[SAVE_AT:], "one process, resumed")
    assert_state_close(final, want_final, f"one process, after step {STEPS}")

    # the match depends on the optimizer state in the checkpoint: AdamW started afresh ends far from it
    _, restarted = resume_in_this_process(path, with_optimizer_state=False)
    apart = max(np.abs(restarted["params"][k] - want_final["params"][k]).max() for k in want_final["params"])
    assert apart > 1e-4, f"a resume without the AdamW state ends within {apart} of the reference"
