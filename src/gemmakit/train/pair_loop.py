"""The optimisation loop that DPO and reward modelling share: preference pairs in seeded batches,
AdamW with warmup and cosine decay, gradient clipping, optional bf16 autocast, held-out
evaluation, metrics.jsonl (loss, preference accuracy, reward margin) and a PNG of them, and
checkpoints (state.py) that a run given `resume` continues from exactly.

One process. What each objective computes is a function `objective(pairs) -> (loss,
chosen_rewards, rejected_rewards)`; the loop knows nothing else about it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..chat_template import ChatFormat
from ..config import GemmaConfig, check_positive_ints, is_int
from ..errors import ConfigError, DataError
from ..paths import atomic_path
from ..tokenizer import Tokenizer
from . import lora, metrics, pairs, state
from .loop import _optimizer, cosine_schedule

# pairs -> loss (a scalar, mean over the pairs), chosen and rejected rewards (B,)
Objective = Callable[[list], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class PairConfig:
    model: str  # HF folder, checkpoint, GGUF or preset to start from
    data: str  # JSONL of preference pairs (see pairs.py)
    out: str
    eval_data: str | None = None  # held-out pairs; None: eval_fraction of `data`
    eval_fraction: float | None = None  # None: 0.1 without eval_data
    epochs: int = 1
    max_steps: int | None = None  # None: `epochs` passes over the training pairs
    batch_size: int = 4  # pairs per optimizer step
    lr: float | None = None  # None: 1e-5 (full), 1e-4 (LoRA)
    warmup_steps: int | None = None  # None: 10% of the steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    bf16: bool = False  # bfloat16 autocast; weights and AdamW stay float32
    lora_rank: int = 0  # > 0: train LoRA adapters only
    lora_alpha: float | None = None
    lora_targets: list[str] = field(default_factory=lambda: list(lora.TARGETS))
    max_len: int = 1024  # tokens of prompt + answer; a longer pair is an error, not cut
    eval_every: int = 50
    log_every: int = 1
    save_every: int = 50  # steps between checkpoints (and one at the end)
    keep_last: int = 2  # checkpoints kept (0: all)
    resume: bool = False  # continue from the last checkpoint in `out`
    seed: int = 0
    tokenizer: str | None = None
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        check_positive_ints(self, ("epochs", "batch_size", "eval_every", "log_every", "save_every", "max_len")
                            + (("max_steps",) if self.max_steps is not None else ()), ConfigError)
        if not is_int(self.keep_last) or self.keep_last < 0:
            raise ConfigError(f"keep_last must be a non-negative integer, got {self.keep_last!r}")
        if self.eval_fraction is not None and self.eval_data is not None:
            raise ConfigError("give --eval-data or --eval-fraction, not both")
        if self.eval_fraction is None:
            self.eval_fraction = 0.0 if self.eval_data is not None else 0.1
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.lr is None:
            self.lr = 1e-4 if self.lora_rank else 1e-5
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        self.betas = tuple(self.betas)


def check_out(cfg: PairConfig) -> Path:
    """The output folder, refused if it holds another run's checkpoints or a trained model, unless
    the run resumes; made by the first file written into it, after every pair has been read and
    checked."""
    out = Path(cfg.out)
    state.check_fresh(out, cfg.resume)
    if (out / "config.json").exists() and not cfg.resume:
        raise ConfigError(f"{out} already holds a trained model; choose another --out")
    return out


def read_pairs(cfg: PairConfig, tok: ChatFormat | Tokenizer) -> tuple[list[pairs.Pair], list[pairs.Pair]]:
    """(training pairs, held-out pairs), every line checked before anything trains."""
    train = pairs.read(cfg.data, tok, cfg.max_len)
    if cfg.eval_data is not None:
        return train, pairs.read(cfg.eval_data, tok, cfg.max_len)
    train, held = pairs.split(train, cfg.eval_fraction, cfg.seed)
    return train, held


def autocast(cfg: PairConfig):
    return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16)


def fit(cfg: PairConfig, model: torch.nn.Module, config: GemmaConfig, objective: Objective, train: list,
        held: list, out: Path, name: str, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Trains `model` (its trainable parameters; `config` its body's) on `train`, from the last
    checkpoint when cfg.resume; returns the last held-out metrics of this call ({} if none ran).
    `on_step(step, record)` is called after each optimizer step."""
    if not train:
        raise DataError(f"{cfg.data}: no training pairs left after holding out --eval-fraction")
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    optimizer = _optimizer(cfg, model)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(cosine_schedule, warmup=warmup, total=total, min_ratio=cfg.min_lr_ratio))
    meta = {"config": config.to_dict(), "run": state.run_settings(cfg) | {"pairs": pairs.digest(train)}}
    start = state.resume(out, model, optimizer, scheduler, meta) if cfg.resume else 0
    log = metrics.MetricsLog(out / "metrics.jsonl", resume_step=start)
    params = [p for p in model.parameters() if p.requires_grad]

    def batch_at(step: int) -> list:
        """The step's pairs: a pure function of the step, so a resumed run reads what this one would.
        Each epoch is a fresh seeded order; its last batch may be smaller."""
        epoch, i = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        return [train[j] for j in order[i * cfg.batch_size: (i + 1) * cfg.batch_size].tolist()]

    def evaluate() -> dict | None:
        if not held:
            return None
        model.eval()
        loss = accurate = margin = 0.0
        with torch.no_grad(), autocast(cfg):
            for i in range(0, len(held), cfg.batch_size):
                batch = held[i: i + cfg.batch_size]
                piece, chosen, rejected = objective(batch)
                loss += float(piece) * len(batch)
                accurate += float((chosen > rejected).sum())
                margin += float((chosen - rejected).sum())
        model.train()
        n = len(held)
        return {"val_loss": loss / n, "val_accuracy": accurate / n, "val_margin": margin / n}

    record_eval = None
    if start == 0:  # a resumed run's curve already has its baseline
        record_eval = evaluate()
        if record_eval:
            log.write({"step": 0, **record_eval})
    bar = tqdm(total=total, initial=start, desc=name, unit="step", disable=not cfg.progress)
    model.train()
    tick, since = time.perf_counter(), 0
    for step in range(start, total):
        batch = batch_at(step)
        with autocast(cfg):
            loss, chosen, rejected = objective(batch)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done, since = step + 1, since + 1
        record = {"step": done, "loss": float(loss.detach()), "accuracy": float((chosen > rejected).float().mean()),
                  "margin": float((chosen - rejected).mean()), "chosen_reward": float(chosen.mean()),
                  "rejected_reward": float(rejected.mean()), "lr": lr, "grad_norm": grad_norm}
        if done % cfg.log_every == 0 or done == total:
            now = time.perf_counter()
            record["seconds_per_step"] = (now - tick) / since
            tick, since = now, 0
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")
        if done % cfg.eval_every == 0 or done == total:
            record_eval = evaluate()
            if record_eval:
                log.write({"step": done, **record_eval})
        if done % cfg.save_every == 0 or done == total:
            state.save(out / state.FOLDER, model, optimizer, scheduler, done, meta, cfg.keep_last, True)
        bar.update(1)
        if on_step is not None:
            on_step(done, record)
    bar.close()
    plot(out / "metrics.jsonl", out / "curves.png", name)
    return record_eval or {}


def plot(path: Path, out: Path, title: str) -> Path:
    """Loss, preference accuracy and reward margin per step (training) and per evaluation (held out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = metrics.read(path)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("loss", "accuracy", "margin"), ("loss", "preference accuracy", "reward margin")):
        train = [(r["step"], r[key]) for r in records if key in r]
        held = [(r["step"], r["val_" + key]) for r in records if "val_" + key in r]
        if train:
            ax.plot(*zip(*train), lw=1, alpha=0.6, label="training batch")
        if held:
            ax.plot(*zip(*held), "o-", label="held-out pairs")
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out
