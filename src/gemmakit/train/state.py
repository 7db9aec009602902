"""Training checkpoints for exact resumes: the trainable weights, optimizer, schedule, step and RNG
state, with the model config and the run's data settings to refuse a checkpoint of another run.
Every training loop (pretraining and SFT, DPO and reward models, RL) keeps its checkpoints in
OUT/checkpoints through this module; each loop's data order is a pure function of its settings
and the step, so the step is the data position.

One `torch.save` file per checkpoint (`step-000100.pt`), written to a temp name, flushed to disk and
renamed, read back with `weights_only=True`; the last `keep` are kept. A process killed while writing
leaves only a temp file (removed by the next save), never a step file that is half there; a write
that fails (a full disk) is an error naming the file, with the previous checkpoints untouched. Works for plain, DDP and FSDP2 models
(the state dict helpers gather full tensors on rank 0's side).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from ..errors import CheckpointError, ConfigError
from ..paths import atomic_path

PATTERN = re.compile(r"step-(\d+)\.pt$")
FOLDER = "checkpoints"  # inside a run's output folder
# Settings a resumed run may change: where and how often it writes, not what it computes.
FREE_SETTINGS = frozenset({"out", "resume", "progress", "device", "save_every", "keep_last", "log_every",
                           "eval_every"})


def checkpoints(folder: Path) -> list[Path]:
    found = [p for p in Path(folder).glob("step-*.pt") if PATTERN.search(p.name)]
    return sorted(found, key=lambda p: int(PATTERN.search(p.name).group(1)))


def check_fresh(out: Path, resume: bool) -> None:
    """Refuses to start a run over another one's checkpoints (two runs' steps in one curve)."""
    if not resume and checkpoints(Path(out) / FOLDER):
        raise ConfigError(f"{out} already holds training checkpoints; pass --resume, or choose another --out")


def run_settings(cfg) -> dict:
    """The settings of a run's config dataclass that decide what it computes (all but FREE_SETTINGS):
    the `run` part of a checkpoint's meta."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in FREE_SETTINGS}


def resume(out: Path, model, optimizer, scheduler, meta: dict) -> int:
    """Restores the last checkpoint in OUT/checkpoints into the run; returns its step, 0 if none."""
    found = checkpoints(Path(out) / FOLDER)
    return load(found[-1], model, optimizer, scheduler, meta) if found else 0


def save(folder: Path, model, optimizer, scheduler, step: int, meta: dict, keep: int, is_main: bool) -> Path | None:
    """Every process must call this (FSDP2 gathers shards); rank 0 writes. `scheduler`: None for a
    constant learning rate."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    if not is_main:
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.pt"
    for stale in folder.glob(".partial-*-step-*.pt"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save({"model": model_state, "optimizer": optim_state,
                            "scheduler": scheduler.state_dict() if scheduler is not None else None,
                            "step": step, "rng": torch.get_rng_state(), "meta": meta}, f)
                f.flush()
                os.fsync(f.fileno())  # the rename must not land before the bytes do
    except (OSError, RuntimeError) as e:  # torch reports a failed write as a RuntimeError
        kept = checkpoints(folder)
        raise CheckpointError(f"{path}: could not write the checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                              + (f"{kept[-1].name} is the last complete one" if kept else "no earlier checkpoint")) from None
    for old in checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def load(path: Path, model, optimizer, scheduler, meta: dict) -> int:
    """Restores a checkpoint into the run; returns its step. Refuses one whose config or data
    settings differ from the run's (`meta`), naming the first field that differs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: pickle, zip or torch errors alike
        raise CheckpointError(f"{path}: not a readable training checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "step", "meta"} <= set(state):
        raise CheckpointError(f"{path}: not a gemmakit training checkpoint")
    for key in ("config", "run"):
        saved, ours = state["meta"].get(key, {}), meta.get(key, {})
        for field in sorted(set(saved) | set(ours)):
            if saved.get(field) != ours.get(field):
                raise CheckpointError(f"{path}: checkpoint from another {'model config' if key == 'config' else 'run'}: "
                                      f"{field} is {saved.get(field)!r} there, {ours.get(field)!r} here")
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, strict=False)
    expected = set(get_state_dict(model, optimizer, options=options)[0])
    if set(state["model"]) != expected:
        odd = sorted(set(state["model"]) ^ expected)
        raise CheckpointError(f"{path}: checkpoint from another model: tensor {odd[0]} is in one and not the other")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options)
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])
