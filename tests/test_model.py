"""KV-cached decoding gives the logits of the full forward, for every family, past the sliding window."""

import pytest
import torch

from gemmakit.config import GemmaConfig, LayerKind
from gemmakit.model import Gemma, KVCache
from gemmakit.model import cache as cache_module

WINDOW = 8
COMMON = dict(vocab_size=300, d_model=64, head_dim=16, ffn_dim=128, max_seq_len=128)
FAMILIES = {
    "gemma": GemmaConfig(family="gemma", n_layers=2, n_heads=4, n_kv_heads=1, **COMMON),  # MQA
    "gemma2": GemmaConfig(family="gemma2", n_layers=4, n_heads=4, n_kv_heads=2, attn_logit_softcap=50.0,
                          final_logit_softcap=30.0, sliding_window=WINDOW, global_every=2, post_norms=True,
                          query_pre_attn_scalar=16, **COMMON),  # GQA, soft-caps
    "gemma3": GemmaConfig(family="gemma3", n_layers=4, n_heads=4, n_kv_heads=1, sliding_window=WINDOW,
                          global_every=3, post_norms=True, qk_norm=True, rope_theta_global=1e6,
                          query_pre_attn_scalar=16, **COMMON),  # QK-norm, both layer kinds
}
LENGTH = 40  # five windows: the ring of the sliding layers (2 * WINDOW slots) wraps twice



pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(config: GemmaConfig) -> Gemma:
    torch.manual_seed(0)
    model = Gemma(config)
    model.reset_parameters(std=0.05)
    with torch.no_grad():  # non-zero norm weights, so that every norm takes part
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    return model.eval()


def close(got, want):
    # float32: <= 1e-5 relative to the scale of the logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def decode_in_chunks(model, cache, tokens, sizes):
    """Feeds tokens (1, T) to the cache in chunks of the given sizes; returns every position's logits."""
    out, start = [], 0
    for size in sizes:
        chunk = tokens[:, start:start + size]
        positions = torch.arange(start, start + chunk.shape[1])[None]
        out.append(model(chunk, positions, cache))
        start += chunk.shape[1]
    assert start == tokens.shape[1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_prefill_then_one_token_at_a_time_matches_full_forward(family):
    model = make_model(FAMILIES[family])
    tokens = torch.randint(0, 300, (1, LENGTH), generator=torch.Generator().manual_seed(1))
    full = model(tokens)  # (1, T, V)
    cache = KVCache(model.config, 1, 64)
    got = decode_in_chunks(model, cache, tokens, [5] + [1] * (LENGTH - 5))
    close(got, full)


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_multi_token_chunks_match_full_forward(family):
    model = make_model(FAMILIES[family])
    tokens = torch.randint(0, 300, (1, LENGTH), generator=torch.Generator().manual_seed(2))
    full = model(tokens)
    cache = KVCache(model.config, 1, 64)
    if model.config.sliding_window:
        assert cache.max_chunk == WINDOW + 1 and cache.ring == 2 * WINDOW
    chunk = min(cache.max_chunk, WINDOW + 1)
    sizes = [chunk, 3, 1, chunk, 7, 2]
    sizes.append(LENGTH - sum(sizes))  # a full chunk again
    close(decode_in_chunks(model, cache, tokens, sizes), full)
    # last_only gives the last position's logits of the same computation
    cache.reset()
    decode_in_chunks(model, cache, tokens[:, :-1], [LENGTH - 1 - 20, 20] if not cache.window else [9] * 4 + [3])
    last = model(tokens[:, -1:], torch.tensor([[LENGTH - 1]]), cache, last_only=True)
    close(last, full[:, -1:])


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_rows_at_different_positions_and_a_reset_row(family):
    model = make_model(FAMILIES[family])
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 300, (1, n), generator=gen) for n in (LENGTH, 25, 12)]
    fulls = [model(s) for s in seqs]
    cache = KVCache(model.config, 3, 64)
    prompt = [3, 9, 1]  # row i is prefilled alone with its first prompt[i] tokens
    for row, (s, n) in enumerate(zip(seqs, prompt)):
        model(s[:, :n], torch.arange(n)[None], cache.row_view(row))
    # Decode the three rows together, each at its own position, until the shortest runs out.
    steps = min(s.shape[1] - n for s, n in zip(seqs, prompt))
    for t in range(steps):
        tokens = torch.stack([s[0, n + t] for s, n in zip(seqs, prompt)])[:, None]  # (3, 1)
        positions = torch.tensor([[n + t] for n in prompt])
        logits = model(tokens, positions, cache)  # (3, 1, V)
        for row in range(3):
            close(logits[row, 0], fulls[row][0, prompt[row] + t])

    # Row 1 is reset and reused for a new sequence while rows 0 and 2 keep theirs.
    fresh = torch.randint(0, 300, (1, 30), generator=gen)
    fresh_full = model(fresh)
    cache.reset(1)
    model(fresh[:, :4], torch.arange(4)[None], cache.row_view(1))
    for t in range(4, 30):
        row0 = prompt[0] + steps + t - 4
        if row0 >= LENGTH:
            break
        tokens = torch.tensor([[seqs[0][0, row0]], [fresh[0, t]]])
        logits = model(tokens, torch.tensor([[row0], [t]]), cache.rows_view(0, 2))
        close(logits[0, 0], fulls[0][0, row0])
        close(logits[1, 0], fresh_full[0, t])


@torch.inference_mode()
def test_a_truncated_row_continues_like_the_full_forward():
    """Rewinding a row (the engine's prefix reuse) is exact wherever `resumable` allows it."""
    model = make_model(FAMILIES["gemma3"])
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 300, (1, LENGTH), generator=gen)
    cache = KVCache(model.config, 1, 64)
    decode_in_chunks(model, cache, tokens, [9] * 4 + [4])  # 40 positions; the ring keeps 24..39
    assert cache.resumable(40, 40) and cache.resumable(40, 31)
    assert not cache.resumable(40, 30)  # position 30 would need key 23, overwritten by 39
    other = torch.cat([tokens[:, :31], torch.randint(0, 300, (1, 9), generator=gen)], dim=1)
    cache.truncate(0, 31)
    positions = torch.arange(31, 40)[None]
    close(model(other[:, 31:], positions, cache), model(other)[:, 31:])


@torch.inference_mode()
def test_swap_span_and_chunk_guard():
    model = make_model(FAMILIES["gemma2"])
    cache = KVCache(model.config, 2, 64)
    a, b = torch.randint(0, 300, (1, 12)), torch.randint(0, 300, (1, 5))
    model(a[:, :9], torch.arange(9)[None], cache.row_view(0))
    model(b, torch.arange(5)[None], cache.row_view(1))
    # attention through a view reads the slots its rows have used only (in whole SPAN_STEPs): a
    # longer row elsewhere costs nothing
    step = cache_module.SPAN_STEP
    assert cache.rows_view(0, 2).reserve(9).positions(LayerKind.GLOBAL).shape == (2, -(-9 // step) * step)
    assert cache.row_view(1).reserve(5).positions(LayerKind.GLOBAL).shape == (1, -(-5 // step) * step) != (1, 64)
    cache.swap(0, 1)
    table = cache.pos[LayerKind.GLOBAL]
    assert table[1, :9].tolist() == list(range(9)) and table[1, 9:].eq(-1).all() and table[0, 5:].eq(-1).all()
    logits = model(a[:, 9:12], torch.arange(9, 12)[None], cache.row_view(1))
    close(logits, model(a)[:, 9:])
    with pytest.raises(ValueError, match="max_chunk"):
        model(torch.zeros(1, cache.max_chunk + 1, dtype=torch.long), torch.arange(cache.max_chunk + 1)[None], cache)


@torch.inference_mode()
def test_a_prefill_without_logits_fills_the_cache_the_same():
    model = make_model(FAMILIES["gemma3"])
    tokens = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(2))  # the longest chunk
    positions = torch.arange(9)[None]
    caches = [KVCache(model.config, batch_size=1, max_len=LENGTH) for _ in range(2)]
    assert model(tokens, positions, caches[0], logits=False) is None
    model(tokens, positions, caches[1])
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    nxt = torch.tensor([[5]])
    close(model(nxt, torch.tensor([[9]]), caches[0]), model(nxt, torch.tensor([[9]]), caches[1]))


def test_compiled_gelu_is_the_tanh_gelu():
    """Under torch.compile gelu_tanh takes its sigmoid form; value and gradient stay F.gelu's."""
    from gemmakit.model.gemma import gelu_tanh

    x = torch.linspace(-12, 12, 4001, requires_grad=True)
    got = torch.compile(gelu_tanh, fullgraph=True)(x)
    (gx,) = torch.autograd.grad(got.sum(), x)
    want = torch.nn.functional.gelu(x, approximate="tanh")
    (wx,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-5)
