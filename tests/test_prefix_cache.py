"""Engine v2: prefixes cached across requests, prompts prefilled in chunks beside running streams.

A request's tokens are the same whatever else is in the batch, whether its prefix came from the
cache or not, and however its prompt was chunked: every family, past the sliding window.
"""

import pytest
from test_model import FAMILIES, WINDOW, make_model  # noqa: E402  (tests/ is on sys.path: rootdir conftest)

from gemmakit.errors import GenerationError
from gemmakit.runtime.engine import Engine
from gemmakit.runtime.prefixes import BLOCK, PrefixCache, block_keys
from gemmakit.runtime.sampling import Sampling

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYSTEM = [2] + [(17 * i) % 250 + 20 for i in range(45)]  # 46 tokens: two full blocks, past the ring (16)


def question(i: int) -> list[int]:
    return [(5 * i + 3 * j) % 250 + 20 for j in range(7)]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request):
    return make_model(FAMILIES[request.param])


def alone(model, prompt, n=12, **kw):
    """The request on an engine of its own, without a prefix cache: the reference."""
    engine = Engine(model, None, max_batch=1, max_len=128, prefix_cache=0)
    request = engine.add(prompt, n, **kw)
    while engine.busy:
        engine.step()
    return request.output_ids


def drain(engine):
    while engine.busy:
        engine.step()


def test_a_shared_system_prompt_is_prefilled_once(model):
    engine = Engine(model, None, max_batch=4, max_len=128)
    first = engine.submit(SYSTEM + question(0), 12)
    drain(engine)
    assert first.reused == 0
    later = [engine.submit(SYSTEM + question(i), 12) for i in (1, 2, 3)]
    drain(engine)
    for i, r in zip((1, 2, 3), later):
        assert r.reused == len(SYSTEM) // BLOCK * BLOCK  # the full blocks of what they share
        assert r.output_ids == alone(model, SYSTEM + question(i))
    assert first.output_ids == alone(model, SYSTEM + question(0))


def test_a_conversation_continues_from_its_whole_history(model):
    """The next turn reuses every token fed so far: the full blocks and the partial last one."""
    engine = Engine(model, None, max_batch=1, max_len=128)
    first = engine.add(SYSTEM + question(0), 12)
    drain(engine)
    follow_up = first.prompt_ids + first.output_ids + question(1)
    second = engine.add(follow_up, 12)
    drain(engine)
    assert second.reused == len(first.prompt_ids) + len(first.output_ids) - 1
    assert second.output_ids == alone(model, follow_up)


def test_n_samples_of_one_prompt_share_its_prefill(model):
    """Requests submitted together wait a step for the blocks the first one is prefilling; each
    seeded sample is what it is alone."""
    engine = Engine(model, None, max_batch=4, max_len=128)
    prompt = SYSTEM + question(4)
    samples = [engine.submit(prompt, 10, Sampling(temperature=1.0, seed=s)) for s in range(3)]
    drain(engine)
    assert [r.reused for r in samples] == [0, len(prompt) - 1, len(prompt) - 1]
    for s, r in enumerate(samples):
        assert r.output_ids == alone(model, prompt, 10, sampling=Sampling(temperature=1.0, seed=s))


def test_a_long_prompt_joins_in_chunks_while_others_decode(model):
    engine = Engine(model, None, max_batch=2, max_len=128, prefill_budget=5, prefix_cache=0)
    running = engine.add(question(9), 30)
    engine.step()
    late = engine.submit(SYSTEM, 8)
    steps_before_its_first_token = 0
    while not late.output_ids:
        deltas = engine.step()
        assert [d.request for d in deltas if d.request is running]  # the running stream never waits
        steps_before_its_first_token += 1
    assert steps_before_its_first_token == -(-(len(SYSTEM) - 1) // 5)  # 45 prompt tokens, 5 a step
    drain(engine)
    assert late.output_ids == alone(model, SYSTEM, 8)
    assert running.output_ids == alone(model, question(9), 30)


def test_a_small_prefix_cache_evicts_least_recently_used_and_stays_exact(model):
    engine = Engine(model, None, max_batch=1, max_len=128, prefix_cache=4 * BLOCK)
    prompts = [[2] + question(i) * 6 for i in range(3)]  # 43 tokens: 2 full blocks and a tail each
    for p in prompts:
        engine.add(p, 4)
        drain(engine)
    assert engine.prefixes.stored <= 4
    again = engine.add(prompts[2], 4)  # the latest: still there
    drain(engine)
    assert again.reused > 0
    oldest = engine.add(prompts[0], 4)  # evicted by the others
    drain(engine)
    assert oldest.reused == 0 and oldest.output_ids == alone(model, prompts[0], 4)


def test_cancelling_a_request_being_prefilled_frees_its_row(model):
    engine = Engine(model, None, max_batch=2, max_len=128, prefill_budget=4, prefix_cache=0)
    running = engine.add(question(1), 20)
    engine.step()
    late = engine.submit(SYSTEM, 8)
    engine.step()
    assert late in engine.requests and not late.output_ids  # admitted, still being prefilled
    engine.cancel(late)
    assert late.finish_reason == "cancelled" and engine.free_slots == 1
    drain(engine)
    assert running.output_ids == alone(model, question(1), 20)


def test_prefix_cache_rejects_a_bad_size(model):
    with pytest.raises(GenerationError, match="prefix_cache"):
        Engine(model, None, prefix_cache=-1)


def test_block_store_keeps_the_sliding_layers_only_while_their_ring_holds_them():
    """A block published after the ring moved past it serves continuations past one window only."""
    model = make_model(FAMILIES["gemma3"])
    engine = Engine(model, None, max_batch=1, max_len=128)
    cache: PrefixCache = engine.prefixes
    prompt = SYSTEM + question(0)
    row = engine.add(prompt, 1)
    drain(engine)
    n, _ = cache.match(prompt, len(prompt) - 1)
    assert n == len(prompt) - 1 and row.reused == 0
    # As if block 0 had been published after the ring moved past it: a cut whose window reaches
    # into block 0 cannot use the chain; one a window past it can.
    cache._sliding[block_keys(prompt)[0]] = False
    assert cache.match(prompt, BLOCK + 4)[0] == 0
    assert cache.match(prompt, len(prompt) - 1)[0] == len(prompt) - 1 > 2 * BLOCK + WINDOW


def test_prompts_prefilled_together_match_each_alone(model):
    """Prompts that arrive together are prefilled in one padded forward, chunk by chunk, past the ring."""
    prompts = [[2] + question(i) * k for i, k in ((1, 3), (2, 4), (3, 5), (4, 6))]  # 22 to 43 tokens
    engine = Engine(model, None, max_batch=4, max_len=128)
    calls = []
    forward = engine.module.forward
    engine.module.forward = lambda tokens, *a, **kw: calls.append(tuple(tokens.shape)) or forward(tokens, *a, **kw)
    try:
        requests = [engine.submit(p, 10) for p in prompts]
        drain(engine)
    finally:
        del engine.module.forward
    assert any(shape[0] == 4 and shape[1] > 1 for shape in calls)  # a batched prefill happened
    for p, r in zip(prompts, requests):
        assert r.output_ids == alone(model, p, 10)


def test_prefill_share_sizes_a_steps_prefill_by_the_measured_pace(model):
    engine = Engine(model, None, max_batch=2, max_len=128, prefill_budget=64, prefill_share=1.0)
    assert engine._budget() == 64  # nothing measured yet: the budget
    engine._pace = [0.040, 0.002]  # a decode step takes 40 ms, a prompt token 2 ms
    assert engine._budget() == 20
    engine._pace = [0.040, 0.0001]
    assert engine._budget() == 64  # within the budget
    engine._pace = [0.040, 0.05]
    assert engine._budget() == 4  # a long prompt still moves
    running = engine.add(question(1), 30)
    engine.step()
    assert engine._pace[0] is not None and engine._pace[1] is not None  # both are measured as they run
    late = engine.submit(SYSTEM, 6)
    drain(engine)
    assert late.output_ids == alone(model, SYSTEM, 6) and running.output_ids == alone(model, question(1), 30)
    with pytest.raises(GenerationError, match="prefill_share"):
        Engine(model, None, prefill_share=0)


def test_an_int8_conversation_gets_the_tokens_of_a_fresh_prefill(model):
    """Over an int8 model's bfloat16 cache decode steps attend in gemmakit's kernel and prompts in
    torch's, so the keys an answer's decode steps wrote are not published (soft-capped models
    attend in torch's everywhere and publish them): the next turn prefills the answer again and
    gets, bit for bit, the tokens and logprobs an engine without a cache gives it."""
    import copy

    import torch

    from gemmakit import kernels
    from gemmakit.model.quantized import quantize

    assert kernels.extension() is not None
    quantized = quantize(copy.deepcopy(model), "int8")
    engine = Engine(quantized, None, max_batch=1, max_len=128)
    assert engine.cache.k[0].dtype == torch.bfloat16
    first = engine.submit(SYSTEM + question(0), 12, logprobs=1)
    drain(engine)
    follow_up = first.prompt_ids + first.output_ids + question(1)
    second = engine.submit(follow_up, 12, logprobs=1)
    drain(engine)
    softcapped = model.config.attn_logit_softcap is not None
    assert second.reused == len(first.prompt_ids) + (len(first.output_ids) if softcapped else 0) - 1
    fresh = Engine(quantized, None, max_batch=1, max_len=128, prefix_cache=0)
    reference = fresh.submit(follow_up, 12, logprobs=1)
    drain(fresh)
    assert (second.output_ids, second.output_logprobs) == (reference.output_ids, reference.output_logprobs)
