"""LM: a loaded model with its tokenizer, the object `gemmakit.load` returns."""

from __future__ import annotations

import torch

from .config import GemmaConfig
from .model import Gemma
from .tokenizer import Tokenizer


class LM:
    def __init__(self, module: Gemma, tokenizer: Tokenizer | None, source: str = ""):
        self.module = module
        self.tokenizer = tokenizer
        self.source = source

    @property
    def config(self) -> GemmaConfig:
        return self.module.config

    @property
    def dtype(self) -> torch.dtype:
        return self.module.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.module.embed.weight.device

    @torch.inference_mode()
    def logits(self, ids) -> torch.Tensor:
        """Token ids (B, T) -> float32 logits (B, T, V) from one full forward, no cache."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        return self.module(ids).float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    def __repr__(self) -> str:
        return f"LM({self.source or self.config.family}, {self.num_parameters():,} parameters, {self.dtype})"
