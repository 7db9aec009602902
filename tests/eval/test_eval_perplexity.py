import math

import pytest
import torch

from gemmakit.errors import DataError
from gemmakit.eval import evaluate, make_task


def test_perplexity_and_bits_per_byte_equal_direct(tiny_lm, tmp_path):
    text = "the quick brown fox jumps over a lazy dog while the model answers the user in turn. " * 3
    f = tmp_path / "doc.txt"
    f.write_text(text)
    ids = tiny_lm.tokenizer.encode(text)
    assert len(ids) < 512
    logp = torch.log_softmax(tiny_lm.logits(ids)[0], dim=-1)
    nll = -sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
    res = evaluate(tiny_lm, make_task(tiny_lm, "perplexity", data=[f]), progress=False)
    assert res["metrics"]["perplexity"]["value"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)
    assert res["score"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-4)
    # windows: each starts over from BOS, so a short window scores worse (or equal) and the count stays
    from gemmakit.eval.loglik import Scorer

    short = Scorer(tiny_lm).rolling(ids, window=16)
    assert len(short) == len(ids) - 1 and short[:15] == pytest.approx([float(logp[i, ids[i + 1]]) for i in range(15)], abs=1e-4)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty.txt: the file is empty"):
        make_task(tiny_lm, "perplexity", data=[empty])
