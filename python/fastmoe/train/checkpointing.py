"""Checkpoints of the training program: the one place that writes and reads them.

A checkpoint holds everything a bitwise-exact resume needs: model and optimizer state, the step, the training
time so far, the validation history, the RNG states (torch's CPU generator, every CUDA generator, and the data
sampler's own generator) and the configuration it was made with. It is written to a temporary file beside the
target and moved over it with ``os.replace``, so a crash mid-write leaves the previous checkpoint intact.
"""

import os
from pathlib import Path

import torch

FORMAT_VERSION = 1


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    path: str | os.PathLike, *, model, optimizer, sampler, step: int, train_time: float, history: list, config: dict
) -> None:
    """Writes the checkpoint atomically (tmp file in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sampler": sampler.state_dict(),
        "rng": rng_state(),
        "step": step,
        "train_time": train_time,
        "history": history,
        "config": config,
    }
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# configuration field -> its value in checkpoints written before the field existed
ADDED_CONFIG_FIELDS = {"balance_coef": 0.0, "ffn_bias": True}


def load(path: str | os.PathLike, *, model, optimizer, sampler, config: dict, map_location=None) -> dict:
    """Restores model, optimizer, sampler and RNG states from ``path`` and returns the payload (for ``step``,
    ``train_time`` and ``history``). Refuses a checkpoint made with a different model or data configuration."""
    payload = torch.load(path, map_location=map_location or "cpu", weights_only=False)
    if payload.get("format_version") != FORMAT_VERSION:
        raise RuntimeError(f"{path}: checkpoint format {payload.get('format_version')!r}, expected {FORMAT_VERSION}")
    # Fields added to the configuration after a checkpoint was written take the value that checkpoint's model
    # had, so an older checkpoint resumes with the flags that reproduce it (e.g. --balance-coef 0).
    saved = {**ADDED_CONFIG_FIELDS, **payload["config"]}
    diffs = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
    if diffs:
        listed = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diffs.items()))
        raise RuntimeError(f"{path} was written by a different configuration ({listed}); resume with the same flags")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    sampler.load_state_dict(payload["sampler"])
    set_rng_state(payload["rng"])
    return payload
