"""Reward models: Gemma with a scalar head, trained on preference pairs with the Bradley-Terry loss.

The score of a sequence is a linear map (no bias) of the final norm's output at its last token,
as transformers' GemmaForSequenceClassification computes it with one label. Training minimises
-log sigmoid(score(chosen) - score(rejected)) (trl's RewardTrainer).

The saved folder is transformers' sequence classifier with one label (Gemma, Gemma2 or
Gemma3TextForSequenceClassification: the body, the head as `score`, pad_token_id set), the format
trl's RewardTrainer writes: `AutoModelForSequenceClassification.from_pretrained(out)` scores as
gemmakit does, `RewardModel.load` reads trl's folders too, and `gemmakit.load(out)` reads the body.
To score:

    rm = RewardModel.load("out/")
    rm.score(["What is 2+3?"], ["5"])  # -> tensor([...]), one score per (prompt, completion)

A prompt is rendered as preference pairs are (pairs.py): a string is plain text, a list of
messages goes through the chat template, with the completion as the model's turn.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..chat_template import ChatFormat
from ..checkpoints import hf
from ..checkpoints.metadata import Metadata
from ..errors import CheckpointError, ConfigError, DataError
from ..model.gemma import Gemma
from ..paths import atomic_path
from ..tokenizer import Tokenizer
from . import lora, pairs
from .loop import _base_model, save_folder
from .pair_loop import PairConfig, check_out, fit, read_pairs


class RewardModel(nn.Module):
    def __init__(self, body: Gemma, tokenizer: Tokenizer | None = None, metadata: Metadata | None = None):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.d_model, 1, bias=False)
        nn.init.normal_(self.head.weight, std=body.config.d_model ** -0.5)
        self.tokenizer, self.metadata = tokenizer, metadata or Metadata()
        # prompts are rendered with the checkpoint's own chat template, as its training pairs were
        self.format = ChatFormat(tokenizer, self.metadata.chat_template) if tokenizer is not None else None

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens (B, T), right-padded, and each row's length (B,) -> scores (B,) float32."""
        h = self.body(tokens.to(self.body.device), hidden=True)  # (B, T, d)
        last = h[torch.arange(len(h), device=h.device), lengths.to(h.device) - 1]  # (B, d)
        return self.head(last).squeeze(-1).float()

    @torch.no_grad()
    def score(self, prompts: list, completions: list[str], batch_size: int = 8) -> torch.Tensor:
        """One score per (prompt, completion): prompts are strings or lists of chat messages."""
        if self.tokenizer is None:
            raise ConfigError("this reward model has no tokenizer; score token ids with forward()")
        if len(prompts) != len(completions):
            raise DataError(f"{len(prompts)} prompts but {len(completions)} completions")
        rows = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            prompt_ids, completion_ids = pairs.render(self.format, prompt, completion, f"completion {i}")
            rows.append(prompt_ids + completion_ids)
        was_training = self.training
        self.eval()
        scores = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i: i + batch_size]
            tokens = torch.full((len(chunk), max(map(len, chunk))), self.tokenizer.pad_id, dtype=torch.long)
            for r, ids in enumerate(chunk):
                tokens[r, : len(ids)] = torch.tensor(ids)
            scores.append(self(tokens, torch.tensor([len(ids) for ids in chunk])).cpu())
        self.train(was_training)
        return torch.cat(scores) if scores else torch.empty(0)

    def save(self, folder: str | os.PathLike, progress: bool = True) -> Path:
        """transformers' sequence classifier with one label, in float32 (see the module docstring),
        beside whatever `folder` already holds (a run's metrics, say); config.json goes in last."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        body = self.body.float().eval()
        save_folder(folder, lambda staging: hf.save(body, staging, tokenizer=self.tokenizer, progress=progress,
                                                     meta=self.metadata, score=self.head.weight.float()))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str = "cpu") -> RewardModel:
        """A sequence-classifier folder with one label: gemmakit's (`save`), trl's RewardTrainer's or
        any transformers Gemma/Gemma2/Gemma3(Text)ForSequenceClassification."""
        from ..lm import load

        folder = Path(folder)
        shapes, loaders = hf.weights(folder)  # a folder without safetensors fails here, by name
        if hf.SCORE not in shapes:
            raise CheckpointError(f"{folder}: no {hf.SCORE} tensor; not a sequence-classification (reward model) "
                                  "folder")
        lm = load(folder, quantize=None, compile=None, device=device, progress=False)
        d = lm.config.d_model
        if shapes[hf.SCORE] != (1, d):
            raise CheckpointError(f"{folder}: {hf.SCORE} has shape {list(shapes[hf.SCORE])}; a reward model has "
                                  f"one label, [1, {d}]")
        weight = loaders[hf.SCORE]().float()
        if not bool(torch.isfinite(weight).all()):
            raise CheckpointError(f"{folder}: {hf.SCORE} holds NaN or infinite values")
        model = cls(lm.module, lm.tokenizer, lm.metadata)
        with torch.no_grad():
            model.head.weight.copy_(weight)
        return model.to(device).eval()


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean -log P(chosen preferred) with P = sigmoid(score difference)."""
    return -F.logsigmoid(chosen - rejected).mean()


@dataclass
class RewardConfig(PairConfig):
    pass


def train_reward(cfg: RewardConfig, on_step: Callable[[int, dict], None] | None = None) -> tuple[Path, dict]:
    """Trains (or, with cfg.resume, resumes training) a reward model; returns its folder (see
    RewardModel.save) and the last held-out metrics (val_loss, val_accuracy, val_margin).
    `on_step(step, record)`: after each optimizer step."""
    out = check_out(cfg)
    body, tok, meta = _base_model(cfg)
    if tok is None:
        raise ConfigError(f"{cfg.model} has no tokenizer; a reward model needs one (--tokenizer)")
    torch.manual_seed(cfg.seed)
    model = RewardModel(body, tok, meta)
    train, held = read_pairs(cfg, model.format)
    if cfg.lora_rank > 0:
        model.body = lora.add_lora(model.body, cfg.lora_rank, cfg.lora_alpha, 0.0, tuple(cfg.lora_targets))
    model = model.to(cfg.device)

    def objective(batch: list[pairs.Pair]):
        rows = pairs.collate(batch, tok.pad_id, full=True)
        chosen, rejected = model(rows.tokens, rows.lengths).chunk(2)
        return bradley_terry(chosen, rejected), chosen.detach(), rejected.detach()

    with atomic_path(out / "reward_config.json") as tmp:
        tmp.write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    result = fit(cfg, model, body.config, objective, train, held, out, "reward model", on_step)
    if cfg.lora_rank > 0:
        lora.save_adapter(model.body, out / "adapter", base_model=str(cfg.model))
        model.body = lora.merge(model.body)
    model.save(out, progress=cfg.progress)
    return out, result
