import pytest

from gemmakit.errors import DataError
from gemmakit.eval import evaluate
from gemmakit.eval.memorization import edit_distance


def test_edit_distance():
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([], [4, 5]) == 2
    assert edit_distance("kitten", "sitting") == 3


def test_memorization_exact_and_approximate(tiny_lm, tmp_path):
    tok = tiny_lm.tokenizer
    prefix = tok.encode("the quick brown fox jumps over a lazy dog while the model answers", add_bos=False)[:10]
    greedy = tiny_lm.generate([tok.bos_id] + prefix, max_new_tokens=10, stop_ids=[])
    ids = tok.encode(tok.decode(prefix + tok.encode(greedy, add_bos=False)), add_bos=False)
    f = tmp_path / "doc.txt"
    f.write_text(tok.decode(ids))
    from gemmakit.eval.memorization import memorization

    mem = memorization(tiny_lm, [f], prefix=10, suffix=10)
    res = evaluate(tiny_lm, mem, progress=False)
    rec = res["records"][0]
    suffix = mem.items[0]["suffix"]
    # greedy continuation, computed here with full forwards
    seq = [tok.bos_id] + mem.items[0]["prefix"][1:]
    for _ in range(10):
        seq.append(int(tiny_lm.logits(seq)[0, -1].argmax()))
    got = seq[-10:]
    assert rec["edit_distance"] == edit_distance(got, suffix)
    assert rec["exact"] == float(got == suffix)
    assert rec["approximate"] == float(edit_distance(got, suffix) <= 1)
    if mem.items[0]["prefix"][1:] == prefix:  # the text round trip kept the ids: the document is memorized
        assert rec["exact"] == 1.0 and res["metrics"]["approximate"]["value"] == 1.0
    with pytest.raises(DataError, match="fewer than prefix"):
        memorization(tiny_lm, [f], prefix=50, suffix=50)
