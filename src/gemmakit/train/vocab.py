"""A small SentencePiece tokenizer trained on the run's own data, for models that have none.

Same conventions as Gemma's: <pad> 0, <eos> 1, <bos> 2, <unk> 3, the chat turn markers as
single tokens, byte fallback, digits split, whitespace kept.
"""

from __future__ import annotations

import io
from typing import Iterable

from ..errors import DataError
from ..tokenizer import Tokenizer

SPECIALS = ["<start_of_turn>", "<end_of_turn>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int, family: str = "gemma",
                    max_sentences: int = 300_000) -> Tokenizer:
    """Trains on the lines of `texts` (the first max_sentences non-empty lines, at most 4 KiB each)."""
    import sentencepiece as spm

    def lines():
        n = 0
        for text in texts:
            for line in text.splitlines():
                if line.strip():
                    yield line[:4096]
                    n += 1
                    if n >= max_sentences:
                        return

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
            unk_piece="<unk>", user_defined_symbols=SPECIALS, byte_fallback=True, split_digits=True,
            remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
            character_coverage=0.9995, hard_vocab_limit=False, num_threads=1, minloglevel=2,
            max_sentence_length=4096, train_extremely_large_corpus=False)
    except RuntimeError as e:  # sentencepiece reports empty input and the like this way
        raise DataError(f"cannot train a tokenizer on this data ({str(e).splitlines()[0]})") from None
    return Tokenizer.from_sentencepiece(model.getvalue(), family=family, name="trained tokenizer")
