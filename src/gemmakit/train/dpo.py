"""Preference tuning: DPO, IPO and SimPO on preference pairs, full or LoRA.

The reference model is the starting model: its log-probabilities of every pair's answers are
computed once, before training, and cached beside the data (out/data/), so only one model is
ever in memory. SimPO needs no reference.

The losses, with the policy's summed log-probs of the chosen and rejected answers (c, r), the
reference's (c0, r0) and the answers' token counts (n_c, n_r), are trl's:
- dpo:   -log sigmoid(beta * ((c - c0) - (r - r0)))                (DPOTrainer, loss_type sigmoid)
- ipo:   ((c - c0) / n_c - (r - r0) / n_r - 1 / (2 beta))^2         (DPOTrainer, loss_type ipo)
- simpo: -log sigmoid(beta * (c / n_c - r / n_r) - gamma)          (CPOTrainer, loss_type simpo)
A pair's reward is beta times its log-ratio (c - c0), or beta * c / n_c for SimPO; accuracy is the
share of pairs whose chosen reward is the higher, margin the mean difference.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..chat_template import ChatFormat
from ..errors import ConfigError
from ..lm import LM
from ..model.loss import IGNORE
from ..paths import atomic_path, fingerprint
from . import lora, pairs
from .loop import _base_model, save_model
from .pair_loop import PairConfig, autocast, check_out, fit, read_pairs

LOSSES = ("dpo", "ipo", "simpo")


@dataclass
class DPOConfig(PairConfig):
    loss: str = "dpo"
    beta: float | None = None  # None: 0.1 for dpo and ipo, 2.0 for simpo (the papers' usual values)
    simpo_gamma: float = 0.5  # SimPO's target margin

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.beta is None:
            self.beta = 2.0 if self.loss == "simpo" else 0.1
        if not self.beta > 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")


def sequence_logps(model, batch: pairs.Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each row's completion (2B,) and its token count (2B,).

    Logits only at the completion's positions: the prompt's would be computed for nothing (at
    Gemma's 262k vocabulary they are most of a step's memory).
    """
    h = model(batch.tokens.to(model.device), hidden=True)  # (2B, T, d)
    targets = batch.targets.to(h.device)
    keep = targets != IGNORE
    rows = keep.nonzero()[:, 0]  # (N,) the row of each completion token
    z = F.linear(h[keep], model.embed.weight).float()  # (N, V); the log-softmax in float32
    cap = model.config.final_logit_softcap
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    picked = targets[keep]
    token_logps = z.gather(1, picked[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)  # (N,)
    logps = torch.zeros(len(targets), dtype=torch.float32, device=h.device).index_add(0, rows, token_logps)
    return logps, keep.sum(1)


def preference_loss(kind: str, beta: float, gamma: float, chosen: torch.Tensor, rejected: torch.Tensor,
                    ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
                    n_chosen: torch.Tensor, n_rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, chosen rewards (B,), rejected rewards (B,)) from summed log-probs (B,); see the
    module docstring."""
    n_chosen, n_rejected = n_chosen.clamp(min=1), n_rejected.clamp(min=1)
    if kind == "simpo":
        chosen_reward, rejected_reward = beta * chosen / n_chosen, beta * rejected / n_rejected
        losses = -F.logsigmoid(chosen_reward - rejected_reward - gamma)
        return losses.mean(), chosen_reward.detach(), rejected_reward.detach()
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if kind == "dpo":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif kind == "ipo":
        losses = (chosen_ratio / n_chosen - rejected_ratio / n_rejected - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"unknown preference loss {kind!r}")
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# -- the reference ----------------------------------------------------------------------------------
def _model_files(source: str) -> list[Path]:
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    return [path] if path.is_file() else []


def reference_logps(cfg: DPOConfig, model, sets: list[list[pairs.Pair]], pad_id: int, cache: Path) -> dict:
    """{pair.where: (chosen logp, rejected logp)} of the starting model, for every pair of `sets`;
    read from the cache when this model and these pairs were seen before."""
    everything = [p for s in sets for p in s]
    key = fingerprint(_model_files(cfg.model), cfg.model, cfg.tokenizer, cfg.seed, cfg.bf16, pairs.digest(everything))
    path = cache / f"reference-{key}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
    else:
        model.eval()
        chosen, rejected = [], []
        steps = range(0, len(everything), cfg.batch_size)
        with torch.no_grad(), autocast(cfg):
            for i in tqdm(steps, desc="reference log-probs", unit="batch", disable=not cfg.progress, leave=False):
                logps, _ = sequence_logps(model, pairs.collate(everything[i: i + cfg.batch_size], pad_id))
                c, r = logps.cpu().chunk(2)
                chosen.append(c)
                rejected.append(r)
        saved = {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}
        with atomic_path(path) as tmp:
            torch.save(saved, tmp)
    return {p.where: (saved["chosen"][i], saved["rejected"][i]) for i, p in enumerate(everything)}


def objective(cfg: DPOConfig, model, reference: dict | None, pad_id: int):
    """The step's loss for pair_loop.fit: pairs -> (loss, chosen rewards, rejected rewards)."""

    def compute(batch: list[pairs.Pair]):
        logps, counts = sequence_logps(model, pairs.collate(batch, pad_id))
        chosen, rejected = logps.chunk(2)
        n_chosen, n_rejected = counts.chunk(2)
        ref_chosen = ref_rejected = None
        if reference is not None:
            ref_chosen = torch.stack([reference[p.where][0] for p in batch]).to(logps.device)
            ref_rejected = torch.stack([reference[p.where][1] for p in batch]).to(logps.device)
        return preference_loss(cfg.loss, cfg.beta, cfg.simpo_gamma, chosen, rejected, ref_chosen, ref_rejected,
                               n_chosen, n_rejected)

    return compute


# -- the run ------------------------------------------------------------------------------------------
def dpo(cfg: DPOConfig, on_step: Callable[[int, dict], None] | None = None) -> tuple[Path, dict]:
    """Runs (or, with cfg.resume, resumes) preference tuning; returns the output folder (a Hugging
    Face folder `gemmakit.load` reads, metrics.jsonl, curves.png, checkpoints/, and adapter/ for
    LoRA) and the last held-out metrics. `on_step(step, record)`: after each optimizer step."""
    out = check_out(cfg)
    model, tok, meta = _base_model(cfg)
    config = model.config
    if tok is None:
        raise ConfigError(f"{cfg.model} has no tokenizer; preference tuning needs one (--tokenizer)")
    train, held = read_pairs(cfg, ChatFormat(tok, meta.chat_template))
    model = model.to(cfg.device)
    reference = None
    if cfg.loss != "simpo":
        reference = reference_logps(cfg, model, [train, held], tok.pad_id, out / "data")
    if cfg.lora_rank > 0:
        torch.manual_seed(cfg.seed)  # the adapters' initialisation: a run is a function of its settings
        model = lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha, 0.0, tuple(cfg.lora_targets))

    with atomic_path(out / "dpo_config.json") as tmp:
        tmp.write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    step_loss = objective(cfg, model, reference, tok.pad_id)
    result = fit(cfg, model, config, step_loss, train, held, out, f"{cfg.loss} (beta {cfg.beta:g})", on_step)
    if cfg.lora_rank > 0:
        lora.save_adapter(model, out / "adapter", base_model=str(cfg.model))
        model = lora.merge(model)
    save_model(LM(model.float().eval(), tok, metadata=meta), out, progress=cfg.progress)
    return out, result
