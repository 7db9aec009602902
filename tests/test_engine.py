"""The engine the server drives: batching, joining, cancelling, stopping, streaming text."""

import pytest
import torch

from gemmakit.config import GemmaConfig
from gemmakit.errors import GenerationError
from gemmakit.model import Gemma, KVCache
from gemmakit.runtime.engine import Engine
from gemmakit.runtime.sampling import Sampling
from gemmakit.runtime.text import TextStream
from gemmakit.tokenizer import Tokenizer

WINDOW = 8  # small, so that prompts and outputs run past it and the sliding layers' ring wraps



pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(sentencepiece_model):
    return Tokenizer.from_file(sentencepiece_model, family="gemma3")


@pytest.fixture(scope="module")
def model(tokenizer):
    config = GemmaConfig(family="gemma3", vocab_size=tokenizer.vocab_size, d_model=64, n_layers=4, n_heads=4,
                         n_kv_heads=2, head_dim=16, ffn_dim=128, max_seq_len=256, sliding_window=WINDOW,
                         global_every=3, post_norms=True, qk_norm=True, rope_theta_global=1e6,
                         query_pre_attn_scalar=16)
    torch.manual_seed(0)
    model = Gemma(config)
    model.reset_parameters(std=0.02, norm_std=0.3)  # random norms make greedy outputs vary
    return model.eval()


PROMPTS = ["the quick brown fox", "hello", "def f(x):\n    return x + 1 while the model answers the user"]


def run_alone(model, tokenizer, ids, n=24, **kw):
    engine = Engine(model, tokenizer, max_batch=1, max_len=128)
    request = engine.add(ids, n, **kw)
    pieces = []
    while engine.requests:
        pieces += [d.text for d in engine.step()]
    assert "".join(pieces) == request.text
    return request


@torch.inference_mode()
def reference_greedy(model, ids, n):
    """Greedy decoding by full forwards over the whole sequence, no cache."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


def test_greedy_matches_uncached_reference(model, tokenizer):
    ids = tokenizer.encode(PROMPTS[2])
    assert len(ids) > WINDOW
    assert run_alone(model, tokenizer, ids, n=20).output_ids == reference_greedy(model, ids, 20)


def test_batch_of_different_lengths_matches_each_alone(model, tokenizer):
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    alone = [run_alone(model, tokenizer, p) for p in prompts]
    engine = Engine(model, tokenizer, max_batch=4, max_len=128)
    requests = [engine.add(p, 24) for p in prompts]
    assert engine.free_slots == 1 and engine.requests == requests
    while engine.requests:
        engine.step()
    assert engine.free_slots == 4
    for r, a in zip(requests, alone):
        assert r.output_ids == a.output_ids and r.text == a.text and r.finish_reason == "length"
    assert len({tuple(a.output_ids) for a in alone}) == 3  # the prompts do lead to different outputs


def test_joining_mid_generation_and_cancelling(model, tokenizer):
    """The server's pattern: requests arrive while others decode, and some are cancelled."""
    a, b, c = (tokenizer.encode(p) for p in PROMPTS)
    alone = {name: run_alone(model, tokenizer, ids).output_ids for name, ids in zip("abc", (a, b, c))}
    engine = Engine(model, tokenizer, max_batch=2, max_len=128)
    ra = engine.add(a, 24)
    for _ in range(5):
        engine.step()
    rb = engine.add(b, 24)  # joins the running batch at the next step
    for _ in range(3):
        deltas = engine.step()
        assert {d.request for d in deltas} == {ra, rb}
    with pytest.raises(GenerationError, match="no free slot"):
        engine.add(c, 24)
    engine.cancel(ra)  # frees its slot at once
    assert ra.finish_reason == "cancelled" and engine.free_slots == 1 and engine.requests == [rb]
    assert ra.output_ids == alone["a"][:8]
    rc = engine.add(c, 24)
    while engine.requests:
        for d in engine.step():
            assert d.request is not ra
    assert rb.output_ids == alone["b"] and rc.output_ids == alone["c"]


def test_same_seed_same_text_whatever_the_batch(model, tokenizer):
    prompt = tokenizer.encode(PROMPTS[0])
    s = Sampling(temperature=1.0, top_p=0.95, seed=7)
    alone = run_alone(model, tokenizer, prompt, sampling=s)
    engine = Engine(model, tokenizer, max_batch=3, max_len=128)
    engine.add(tokenizer.encode(PROMPTS[1]), 24, sampling=Sampling(temperature=1.0, seed=1))
    mine = engine.add(prompt, 24, sampling=s)
    engine.add(tokenizer.encode(PROMPTS[2]), 24)
    while engine.requests:
        engine.step()
    assert mine.output_ids == alone.output_ids
    other = run_alone(model, tokenizer, prompt, sampling=s.replace(seed=8))
    assert other.output_ids != alone.output_ids


def test_stop_ids(model, tokenizer):
    prompt = tokenizer.encode(PROMPTS[0])
    full = run_alone(model, tokenizer, prompt)
    stop = full.output_ids[5]
    first = full.output_ids.index(stop)
    r = run_alone(model, tokenizer, prompt, stop_ids=[stop])
    assert r.finish_reason == "stop"
    assert r.output_ids == full.output_ids[:first + 1]  # the stop id ends the output...
    assert r.generated_ids == full.output_ids[:first]  # ...and is not part of the text
    assert r.text == tokenizer.decode(full.output_ids[:first])


def test_stop_strings_end_the_text_before_them(model, tokenizer):
    prompt = tokenizer.encode(PROMPTS[2])
    full = run_alone(model, tokenizer, prompt, n=30).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3
    r = run_alone(model, tokenizer, prompt, n=30, stop_strings=["never seen here", stop])
    assert r.finish_reason == "stop"
    assert r.text == full[:full.index(stop)] and stop not in r.text
    assert len(r.output_ids) < 30


def test_prompt_too_long_and_bad_requests(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1, max_len=32)
    with pytest.raises(GenerationError, match="prompt of 40 tokens.*32"):
        engine.add([2] * 40, 4)
    with pytest.raises(GenerationError, match="empty prompt"):
        engine.add([], 4)
    with pytest.raises(GenerationError, match="token id 99999"):
        engine.add([2, 99999], 4)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        engine.add([2], 0)
    with pytest.raises(GenerationError, match="max_len"):
        Engine(model, tokenizer, max_len=model.config.max_seq_len + 1)
    with pytest.raises(GenerationError, match="tokenizer"):
        Engine(model, None).add([2], 4, stop_strings=["x"])


def test_a_full_slot_ends_with_length(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1, max_len=16)
    r = engine.add(list(range(2, 12)), 100)  # 10 prompt tokens: room for 6 more positions, 7 new tokens
    while engine.requests:
        engine.step()
    assert r.finish_reason == "length" and len(r.output_ids) == 7
    assert r.output_ids == reference_greedy(model, list(range(2, 12)), 7)


def test_a_freed_slot_serves_a_continuation_from_its_cache(model, tokenizer):
    """A follow-up prompt that extends a finished one prefills only the new tokens, past the ring too."""
    engine = Engine(model, tokenizer, max_batch=2, max_len=128)
    first = engine.add(tokenizer.encode(PROMPTS[2]), 20)
    while engine.requests:
        engine.step()
    follow_up = first.prompt_ids + first.output_ids + tokenizer.encode(" the user", add_bos=False)
    assert len(follow_up) > 2 * WINDOW
    second = engine.add(follow_up, 12)
    assert second.reused == len(first.prompt_ids) + len(first.output_ids) - 1
    while engine.requests:
        engine.step()
    assert second.output_ids == reference_greedy(model, follow_up, 12)
    # An unrelated prompt starts from scratch (in the other, empty slot).
    assert engine.add(tokenizer.encode(PROMPTS[1]), 1).reused == 0


def test_text_stream_never_splits_a_character(tokenizer):
    text = "héllo wörld 日本語 🎉 ok"
    ids = tokenizer.encode(text, add_bos=False)
    assert sum(tokenizer.piece(i).startswith("<0x") for i in ids) >= 10  # rare characters come as bytes
    stream = TextStream(tokenizer, [tokenizer.bos_id])
    pieces = [stream.push(i) for i in ids] + [stream.close()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # held back while a character was unfinished


def test_text_stream_holds_back_a_possible_stop_string(tokenizer):
    ids = tokenizer.encode("hello world, gemma reads tokens", add_bos=False)
    stream = TextStream(tokenizer, [tokenizer.bos_id], stop_strings=["gemma", "worldwide"])
    pieces = []
    for i in ids:
        pieces.append(stream.push(i))
        released = "".join(pieces)
        assert "gem" not in released and not released.endswith("world")  # could still become a stop
        if stream.stopped:
            break
    pieces.append(stream.close())
    assert stream.stopped and "".join(pieces) == "hello world, "


def test_text_stream_keeps_the_first_pieces_space(tokenizer):
    prompt = tokenizer.encode("the quick")
    stream = TextStream(tokenizer, prompt[-4:])
    pieces = [stream.push(i) for i in tokenizer.encode(" brown fox", add_bos=False)] + [stream.close()]
    assert "".join(pieces) == " brown fox"


def test_compiled_decode_steps_pick_the_eager_tokens(model, tokenizer):
    """torch.compile'd decode (batch 2, then batch 1 once the shorter request ends: both graphs),
    on an int8 model so that gemmakit's own kernel runs inside the compiled graph; each step is
    one graph (a graph break costs guard checks and Python between the pieces every token)."""
    import copy

    from torch._dynamo.utils import counters

    from gemmakit.model.quantized import quantize

    quantized = quantize(copy.deepcopy(model), "int8")

    def run(compile):
        engine = Engine(quantized, tokenizer, max_batch=2, max_len=128, compile=compile)
        requests = [engine.add(tokenizer.encode(p), n) for p, n in zip(PROMPTS[1:], (6, 20))]
        while engine.requests:
            engine.step()
        return [r.output_ids for r in requests]

    eager = run("eager")
    counters.clear()
    assert run("torch") == eager and [len(ids) for ids in eager] == [6, 20]
    assert not counters["graph_break"], dict(counters["graph_break"])


@torch.inference_mode()
def test_logprobs_of_the_output_and_of_the_prompt_are_the_models_own(model, tokenizer):
    """Each output token's logprob and top alternatives, and the prompt's (echo), equal
    log_softmax of one full forward over prompt + output, chunked prefill or not."""
    prompt = tokenizer.encode(PROMPTS[2])
    engine = Engine(model, tokenizer, max_batch=2, max_len=128, prefill_budget=5)
    other = engine.add(tokenizer.encode(PROMPTS[0]), 30)  # decoding, so the prompt is prefilled 5 a step
    engine.step()
    request = engine.submit(prompt, 6, Sampling(temperature=1.0, seed=3, frequency_penalty=1.0), logprobs=3,
                            prompt_logprobs=2)
    while not request.finished:
        engine.step()
    engine.cancel(other)
    ids = prompt + request.output_ids
    want = model(torch.tensor([ids]))[0].float().log_softmax(-1)  # (T, V)
    got = request.input_logprobs + request.output_logprobs
    assert got[0] is None and len(got) == len(ids)
    for position, (lp, top) in enumerate(got[1:], start=1):
        row = want[position - 1]
        assert lp == pytest.approx(row[ids[position]].item(), abs=1e-4)
        assert len(top) == (2 if position < len(prompt) else 3)
        assert [i for i, _ in top] == row.topk(len(top)).indices.tolist()
    with pytest.raises(GenerationError, match="logprobs"):
        engine.submit(prompt, 2, logprobs=21)
    with pytest.raises(GenerationError, match="logit_bias token id 99999"):
        engine.submit(prompt, 2, Sampling(logit_bias={99999: 1.0}))


@torch.inference_mode()
def test_int8_engines_keep_keys_and_values_in_bfloat16_within_its_rounding(model, tokenizer):
    """The fast mode's cache is bfloat16 (float models keep their own dtype, and kv_dtype
    chooses), and attention runs in it: queries, keys and values rounded to 8 significant bits
    (relative error <= 2^-8 each) move a layer's attention output by about 3 * 2^-8 of its size,
    so the logits of this 4-layer model after a prompt past the sliding window stay within
    8 * 2^-8 of their scale (measured: 0.024)."""
    import copy

    from gemmakit.model.quantized import quantize

    quantized = quantize(copy.deepcopy(model), "int8")
    assert Engine(model, tokenizer, max_len=64).cache.k[0].dtype == torch.float32
    assert Engine(quantized, tokenizer, max_len=64).cache.k[0].dtype == torch.bfloat16
    ids = tokenizer.encode(PROMPTS[2])
    assert len(ids) > WINDOW

    assert Engine(quantized, tokenizer, max_len=64, kv_dtype=torch.float32).cache.k[0].dtype == torch.float32

    def logits(kv_dtype):  # one chunk: a cache without the ring, which holds a window and a chunk
        cache = KVCache(quantized.config, 1, 64, dtype=kv_dtype, ring=False)
        return quantized(torch.tensor([ids]), torch.arange(len(ids))[None], cache)[0].float()

    exact, rounded = logits(torch.float32), logits(torch.bfloat16)
    error = (rounded - exact).abs().max() / exact.abs().max()
    assert 0 < error < 8 * 2.0 ** -8


@torch.inference_mode()
def test_an_int8_requests_tokens_and_logprobs_do_not_depend_on_the_batch(model, tokenizer):
    """The fast mode forms every output of a row the same way whatever else is in the call (the
    int8 kernel: one formula per row; attention: whole SPAN_STEP multiples of slots), so a request
    decoded beside others gets the bits it gets alone, past the sliding window: its tokens and
    their logprobs exactly (issue 18). Prompts of 1-3 tokens keep even their batched prefill within
    the rows every CPU's kernel forms one way (without VNNI: its FMA loop's 16)."""
    import copy

    from gemmakit import kernels
    from gemmakit.model.quantized import quantize

    assert kernels.extension() is not None
    quantized = quantize(copy.deepcopy(model), "int8")
    g = torch.Generator().manual_seed(11)
    # of different lengths, so that the rows' spans differ (alone, each reads only as far as itself)
    prompts = [torch.randint(3, tokenizer.vocab_size, (n,), generator=g).tolist() for n in (1, 3, 2, 3, 1)]

    def run(batch):
        engine = Engine(quantized, tokenizer, max_batch=len(batch), max_len=64)
        requests = [engine.submit(p, 3 * WINDOW, logprobs=1) for p in batch]
        engine.step()  # admits them together
        while engine.requests:
            engine.step()
        return [(r.output_ids, r.output_logprobs) for r in requests]

    alone = [run([p])[0] for p in prompts]
    assert run(prompts) == alone


def test_int8_decode_steps_and_only_they_attend_in_the_kernel(model, tokenizer, monkeypatch):
    """Over the bfloat16 cache of an int8 model decode steps run kernels.attend (whose numbers
    test_kernels checks against float64 attention); prompts, batched or not, run torch's."""
    import copy

    from gemmakit import kernels
    from gemmakit.model.quantized import quantize

    quantized = quantize(copy.deepcopy(model), "int8")
    calls = []
    attend = kernels.attend

    def counted(q, k, v, mask, scale):
        out = attend(q, k, v, mask, scale)
        calls.append((q.shape[2], out is not None))
        return out

    monkeypatch.setattr(kernels, "attend", counted)
    engine = Engine(quantized, tokenizer, max_batch=2, max_len=64)
    requests = [engine.submit(p, 2 * WINDOW) for p in ([5, 6, 7, 8, 9], [10, 11])]
    while engine.busy:
        engine.step()
    G = model.config.n_heads // model.config.n_kv_heads
    decode_steps = max(len(r.output_ids) for r in requests)
    assert len(calls) == decode_steps * model.config.n_layers  # once a layer a step, no prompt chunk
    assert all(used and queries == G for queries, used in calls)
