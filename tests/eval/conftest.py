"""A tiny random Gemma with a real (tiny) SentencePiece tokenizer, for the evaluation tests."""

import pytest
import torch

from gemmakit.config import GemmaConfig
from gemmakit.lm import LM
from gemmakit.model import Gemma
from gemmakit.tokenizer import Tokenizer

# Sliding-window layers with a short window, so that the KV ring wraps inside the test prompts.
TINY = GemmaConfig(family="gemma3", vocab_size=512, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16,
                   ffn_dim=128, max_seq_len=512, sliding_window=16, global_every=3, post_norms=True, qk_norm=True)


@pytest.fixture(scope="session")
def tiny_lm(sentencepiece_model) -> LM:
    torch.manual_seed(0)
    module = Gemma(TINY)
    module.reset_parameters(std=0.3)  # large weights: sharp, item-dependent predictions
    return LM(module.eval(), Tokenizer.from_file(sentencepiece_model, family="gemma3"))
