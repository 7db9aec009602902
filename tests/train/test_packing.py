"""Clean packing: conversations (or documents) packed into one row train as if each were alone."""

import json

import numpy as np
import pytest
import torch

from gemmakit.config import GemmaConfig
from gemmakit.errors import ConfigError
from gemmakit.model import Gemma
from gemmakit.train import data
from gemmakit.train.loop import TrainConfig

BASE = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64, max_seq_len=64)
CONFIGS = {
    "gemma": GemmaConfig(family="gemma", **BASE),
    # Windows of 4 and 6 tokens: smaller than most conversations below, so sliding layers mask inside one.
    "gemma2": GemmaConfig(family="gemma2", **BASE, attn_logit_softcap=50.0, final_logit_softcap=30.0,
                          sliding_window=4, global_every=2, post_norms=True, query_pre_attn_scalar=16),
    "gemma3": GemmaConfig(family="gemma3", **BASE, sliding_window=6, global_every=2, post_norms=True, qk_norm=True,
                          rope_theta_global=1_000_000.0, query_pre_attn_scalar=16),
}
LENGTHS = (9, 13, 7, 11, 5)  # conversations of these lengths; with seq_len 24 they pack 2 and 3 to a row


def conversations(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in LENGTHS:
        ids = rng.integers(3, BASE["vocab_size"], n).tolist()
        mask = [False] * (n // 2) + [True] * (n - n // 2)  # a prompt, then the reply that carries loss
        out.append((ids, mask))
    return out


def chat_rows(tmp_path, convs, seq_len=24):
    """The conversations through pack_chats, as the SFT loop packs them (ids stand in for messages)."""
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": [ids, mask]}) + "\n" for ids, mask in convs))
    return data.pack_chats(data.SourceSpec(str(path)), lambda m, where: (m[0], m[1]), pad_id=0, seq_len=seq_len,
                           cache=tmp_path / "cache", progress=False)


def test_clean_collate_restarts_positions_per_conversation(tmp_path):
    rows = chat_rows(tmp_path, conversations())
    assert len(rows) == 2
    batch = data.collate([rows], np.array([[0, 0], [0, 1]]), clean=True)
    # Row 0: 9 + 13 tokens, then 3 of padding (a segment of its own); inputs are the first 24 of 25.
    assert batch.segments[0].tolist() == [0] * 9 + [1] * 13 + [2] * 2
    assert batch.positions[0].tolist() == list(range(9)) + list(range(13)) + [0, 1]
    assert batch.segments[1].tolist() == [0] * 7 + [1] * 11 + [2] * 5 + [3]
    assert batch.positions[1].tolist() == list(range(7)) + list(range(11)) + list(range(5)) + [0]
    plain = data.collate([rows], np.array([[0, 0]]))
    assert torch.equal(plain.targets, batch.targets[:1])  # the loss mask is the same either way
    assert plain.positions is None and plain.segments is None


def test_pack_text_segments_follow_documents(tmp_path):
    for i, n in enumerate((5, 20, 3)):
        (tmp_path / f"d{i}.txt").write_text(" ".join(["w" * (i + 1)] * n))
    rows = data.pack_text(data.SourceSpec(str(tmp_path)), lambda t: [2 + len(w) for w in t.split()], eos_id=1,
                          seq_len=8, cache=tmp_path / "cache", progress=False)
    batch = data.collate([rows], np.array([[0, r] for r in range(len(rows))]), clean=True)
    tokens = np.asarray(rows.tokens)
    for r in range(len(rows)):
        eos = np.flatnonzero(tokens[r, :-1] == 1)
        # A document ends with its <eos>: the token after it starts the next one, at position 0.
        starts = [0] + [e + 1 for e in eos if e + 1 < 8]
        assert [t for t in range(8) if batch.positions[r, t] == 0] == starts
        assert batch.segments[r].tolist() == [sum(t >= s for s in starts[1:]) for t in range(8)]


def loss_and_grads(model, run):
    model.zero_grad()
    loss = run()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_packed_rows_train_like_each_conversation_alone(tmp_path, family):
    torch.manual_seed(0)
    model = Gemma(CONFIGS[family])
    model.reset_parameters(std=0.1, norm_std=0.1)
    convs = conversations()
    rows = chat_rows(tmp_path, convs)
    batch = data.collate([rows], np.array([[0, r] for r in range(len(rows))]), clean=True)
    n_targets = int((batch.targets != data.IGNORE).sum())
    assert n_targets == sum(sum(m[1:]) for _, m in convs)

    # As the loop does: the summed loss of the batch over the count of its targets.
    packed, packed_grads = loss_and_grads(model, lambda: model(batch.inputs, batch.positions, targets=batch.targets,
                                                               segments=batch.segments) / n_targets)

    def alone():
        total = 0
        for ids, mask in convs:
            x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
            y[~torch.tensor([mask[1:]])] = data.IGNORE
            total = total + model(x, targets=y)  # positions 0.., plainly causal, nothing else in the row
        return total / n_targets

    single, single_grads = loss_and_grads(model, alone)
    # float32 throughout; a masked key adds an exact 0 to its softmax, so the two sides differ only
    # in the order of the same float32 sums (a few ulps of values of order 1-10).
    torch.testing.assert_close(packed, single, rtol=1e-5, atol=1e-6)
    for name, grad in single_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # The old packing (one causal sequence a row, positions running on) is measurably different.
    plain = data.collate([rows], np.array([[0, r] for r in range(len(rows))]))
    with torch.no_grad():
        assert abs(float(model(plain.inputs, targets=plain.targets)) / n_targets - float(single)) > 1e-3


def test_segments_need_a_forward_without_cache():
    from gemmakit.model.cache import KVCache

    model = Gemma(CONFIGS["gemma"])
    x = torch.zeros(1, 4, dtype=torch.long)
    cache = KVCache(model.config, 1, 8)
    with pytest.raises(ValueError, match="without a KV cache"):
        model(x, cache=cache, segments=torch.zeros(1, 4, dtype=torch.long))


def test_clean_packing_setting():
    assert TrainConfig(model="m", data=["d"], out="o", sft=True).clean_packing is True
    assert TrainConfig(model="m", data=["d"], out="o").clean_packing is False
    assert TrainConfig(model="m", data=["d"], out="o", clean_packing=True).clean_packing is True
    with pytest.raises(ConfigError, match="clean_packing must be true or false, got 'yes'"):
        TrainConfig(model="m", data=["d"], out="o", clean_packing="yes")
