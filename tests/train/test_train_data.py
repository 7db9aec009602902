"""gemmakit.train.data and .vocab: sources, packing, mixing, order, split, errors."""

import numpy as np
import pytest

from gemmakit.errors import DataError
from gemmakit.train import data


def encode_words(text):  # a stand-in tokenizer: one id per word, 2.. so that <eos> (1) stands out
    return [2 + len(w) for w in text.split()]


def test_source_spec_weights():
    assert data.SourceSpec.parse("a/b.txt:2.5") == data.SourceSpec("a/b.txt", 2.5)
    assert data.SourceSpec.parse("a/b.txt") == data.SourceSpec("a/b.txt", 1.0)
    assert data.SourceSpec.parse("C:odd") == data.SourceSpec("C:odd", 1.0)
    with pytest.raises(DataError, match="weight"):
        data.SourceSpec.parse("a.txt:0")


def test_pack_text_rows_are_consecutive_with_eos_between_documents(tmp_path):
    for i in range(3):
        (tmp_path / f"d{i}.txt").write_text(" ".join(["w" * (i + 1)] * 50))
    rows = data.pack_text(data.SourceSpec(str(tmp_path)), encode_words, eos_id=1, seq_len=16,
                          cache=tmp_path / "cache", progress=False)
    tokens = np.asarray(rows.tokens)
    assert tokens.shape[1] == 17 and len(rows) == (3 * 51 - 1) // 16
    assert (tokens[1:, 0] == tokens[:-1, -1]).all()  # the last token of a row starts the next
    stream = np.concatenate([tokens[0], *[r[1:] for r in tokens[1:]]])
    eos_at = np.flatnonzero(stream == 1)
    assert list(eos_at) == [50, 101]  # each 50-word document followed by one <eos> (the last is cut off)
    again = data.pack_text(data.SourceSpec(str(tmp_path)), encode_words, 1, 16, tmp_path / "cache", progress=False)
    assert again.tokens.filename == rows.tokens.filename  # tokenized once, then reused


def test_mixture_follows_weights_and_order_is_deterministic(tmp_path):
    sources = [data.TokenRows(np.zeros((100, 9), np.uint32), None, w, str(w)) for w in (3.0, 1.0)]
    train, held = data.split(sources, 0.1)
    assert train[0] == range(0, 90) and held[0] == range(90, 100)
    order = data.sample_order(sources, train, 4000, seed=1)
    share = (order[:, 0] == 0).mean()
    assert 0.72 < share < 0.78
    assert np.array_equal(order, data.sample_order(sources, train, 4000, seed=1))
    assert not np.array_equal(order, data.sample_order(sources, train, 4000, seed=2))
    assert order[:, 1].max() < 90  # held-out rows are never trained on
    first_epoch = order[order[:, 0] == 1][:90, 1]
    assert sorted(first_epoch) == list(range(90))  # an epoch visits every row once


def test_collate_masks_targets(tmp_path):
    tokens = np.arange(18, dtype=np.uint32).reshape(2, 9)
    mask = np.zeros((2, 9), np.bool_)
    mask[0, 3:6] = True
    rows = data.TokenRows(tokens, mask, 1.0, "x")
    batch = data.collate([rows], np.array([[0, 0]]))
    x, y = batch.inputs, batch.targets
    assert batch.positions is None and batch.segments is None
    assert x.tolist() == [list(range(8))]
    assert y.tolist() == [[data.IGNORE, data.IGNORE, 3, 4, 5] + [data.IGNORE] * 3]


def test_bad_data_gets_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.SourceSpec(str(tmp_path / "missing.txt")).files()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="fewer than one sequence"):
        data.pack_text(data.SourceSpec(str(empty)), encode_words, 1, 16, tmp_path / "c", progress=False)
    assert not list((tmp_path / "c").glob("*"))  # no half-written token file left behind
    binary = tmp_path / "latin.txt"
    binary.write_bytes(b"caf\xe9 " * 100)
    with pytest.raises(DataError, match="latin.txt: not UTF-8"):
        data.pack_text(data.SourceSpec(str(binary)), encode_words, 1, 16, tmp_path / "c", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2: not valid JSON"):
        list(data.documents(data.SourceSpec(str(bad))))


def test_trained_tokenizer_has_gemma_conventions(tiny_tokenizer):
    tok = tiny_tokenizer
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.token_id("<unk>")) == (0, 1, 2, 3)
    assert tok.has_token("<start_of_turn>") and tok.has_token("<end_of_turn>")
    text = "the cat sat on 42 mats\n  indented é"
    assert tok.decode(tok.encode(text, add_bos=False)) == text  # byte fallback: nothing is lost
    assert tok.vocab_size <= 384
