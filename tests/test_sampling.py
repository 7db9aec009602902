import math

import pytest
import torch

from gemmakit.errors import GenerationError
from gemmakit.runtime.sampling import (
    Sampling,
    draw,
    make_generator,
    next_tokens,
    token_logprobs,
)

V = 50


def draws(logits_row, sampling, n=400, history=None, allowed=None):
    """The set of tokens drawn from one row in n draws with one generator."""
    gen = make_generator(sampling)
    logits = logits_row[None]
    return {int(next_tokens(logits, [sampling], [gen], [history], [allowed])[0]) for _ in range(n)}


def inverse_cdf(probs, gen):
    """The token a uniform draw in [0, total) falls on: how many cumulative sums are <= it."""
    cdf = probs.double().cumsum(0)
    u = float(torch.rand((), dtype=torch.float64, generator=gen)) * float(cdf[-1])
    return int((cdf <= u).sum())


def test_draws_follow_the_distribution_and_never_a_zero():
    probs = torch.tensor([0.05, 0.0, 0.25, 0.0, 0.5, 0.2, 0.0]) * 3  # unnormalised
    gen = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(torch.stack([draw(probs, gen) for _ in range(n)]), minlength=len(probs))
    expected = probs / probs.sum() * n
    sigma = (expected * (1 - probs / probs.sum())).sqrt()
    assert ((counts - expected).abs() <= 5 * sigma + 1e-9).all(), counts  # 5 sigma: fails ~1 run in 10**6
    assert counts[probs == 0].sum() == 0
    assert int(draw(torch.tensor([0.0, 0.0, 1e-30]), gen)) == 2  # a tiny share is still a share


def peaked():
    """Logits whose probabilities fall by half from one token to the next: 10, 9.3, 8.6, ..."""
    return torch.tensor([10.0 - 0.6931 * i for i in range(V)])


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_k", 0), ("top_k", 2.5), ("top_p", 0.0),
    ("top_p", 1.5), ("min_p", -0.1), ("repetition_penalty", 0), ("seed", -1), ("seed", "7"), ("top_k", True),
    ("presence_penalty", 2.5), ("presence_penalty", float("nan")), ("presence_penalty", None),
    ("frequency_penalty", -2.01), ("frequency_penalty", "1"), ("logit_bias", 5), ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"5": 1.0}), ("logit_bias", {True: 1.0}), ("logit_bias", {5: 100.5}), ("logit_bias", {5: math.nan}),
    ("logit_bias", {5: "1"}),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(GenerationError, match=field) as e:
        Sampling(**{field: value})
    assert "\n" not in str(e.value)
    assert issubclass(GenerationError, ValueError)


def test_logit_bias_is_kept_as_sorted_pairs():
    s = Sampling(logit_bias={7: 1, 2: -100.0})
    assert s.logit_bias == ((2, -100.0), (7, 1.0))
    assert s == Sampling(logit_bias=[(7, 1.0), (2, -100)]) and hash(s) == hash(Sampling(logit_bias=s.logit_bias))
    assert s.replace(logit_bias={3: 2}).logit_bias == ((3, 2.0),)
    assert Sampling().logit_bias == () and not Sampling().adjusts_logits
    assert Sampling(presence_penalty=-2, frequency_penalty=2).adjusts_logits


def test_replace_rejects_unknown_fields():
    assert Sampling().replace(temperature=0.5).temperature == 0.5
    with pytest.raises(GenerationError, match="temprature"):
        Sampling().replace(temprature=0.5)


@pytest.mark.parametrize("kernel", [True, False])
def test_greedy_rows_take_the_argmax_and_leave_logits_alone(kernel, monkeypatch):
    from gemmakit import kernels

    if kernel:  # the argmax kernel serves once the int8 kernel is loaded
        assert kernels.int8_group_matmul(torch.randn(1, 32), torch.ones(1, 32, dtype=torch.int8),
                                         torch.ones(1, 1).half()) is not None
    else:
        monkeypatch.setattr(kernels, "_OP", False)
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    s = [Sampling(), Sampling(temperature=1.0, seed=1), Sampling(), Sampling(temperature=0.5, top_k=3, seed=2)]
    out = next_tokens(logits, s, [make_generator(x) for x in s])
    assert out.shape == (4,) and out.dtype == torch.long
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
    assert out[3] in logits[3].topk(3).indices
    assert torch.equal(logits, before)
    tied = torch.zeros(2, 262144)
    tied[:, [70_000, 9, 200_000]] = 1.0  # equal maxima: the lowest id wins, as argmax picks
    assert next_tokens(tied, [Sampling(), Sampling()]).tolist() == [9, 9]


def test_top_k_keeps_the_k_most_likely():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1))
    top3 = set(logits.topk(3).indices.tolist())
    assert draws(logits * 0.01, Sampling(temperature=1.0, top_k=3, seed=0)) == top3


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities ~ 1/2, 1/4, 1/8, ...: 0.7 needs the first two tokens, 0.8 the first three
    assert draws(peaked(), Sampling(temperature=1.0, top_p=0.7, seed=0)) == {0, 1}
    assert draws(peaked(), Sampling(temperature=1.0, top_p=0.8, seed=0)) == {0, 1, 2}
    assert draws(peaked(), Sampling(temperature=1.0, top_p=0.3, seed=0)) == {0}


def test_min_p_keeps_tokens_near_the_most_likely():
    # probabilities relative to the most likely: 1, 1/2, 1/4, 1/8, ...
    assert draws(peaked(), Sampling(temperature=1.0, min_p=0.2, seed=0)) == {0, 1, 2}
    assert draws(peaked(), Sampling(temperature=1.0, min_p=0.45, seed=0)) == {0, 1}
    assert draws(peaked(), Sampling(temperature=1.0, min_p=0.45, top_k=10, seed=0)) == {0, 1}


def test_temperature_flattens_and_sharpens():
    flat = draws(peaked(), Sampling(temperature=20.0, seed=0))
    sharp = draws(peaked(), Sampling(temperature=0.05, seed=0))
    assert len(flat) > 20 and sharp == {0}


def test_repetition_penalty_demotes_tokens_in_the_context():
    logits = torch.tensor([3.0, 2.9, -1.0, -1.2] + [-5.0] * (V - 4))
    greedy = Sampling(repetition_penalty=2.0)
    assert int(next_tokens(logits[None], [greedy], None, [([7], [])])[0]) == 0  # token 0 not seen: unchanged
    assert int(next_tokens(logits[None], [greedy], None, [([0], [])])[0]) == 1  # 3.0 / 2 < 2.9 (prompt)
    assert int(next_tokens(logits[None], [greedy], None, [([5], [0])])[0]) == 1  # (output)
    # negative logits are multiplied: with 0 and 1 seen (1.5, 1.45), -1.0 * 2 = -2 still loses to 1.45
    assert int(next_tokens(logits[None], [greedy], None, [([0, 1], [2, 0])])[0]) == 0
    assert int(next_tokens(logits[None], [Sampling(repetition_penalty=0.5)], None, [([1], [])])[0]) == 1  # < 1 promotes


def reference_logits(row, s, prompt, output):
    """The penalties and the bias as OpenAI and Hugging Face write them, one token at a time (float64)."""
    row = row.double().clone()
    if s.repetition_penalty is not None:
        for j in set(prompt) | set(output):
            row[j] = row[j] / s.repetition_penalty if row[j] > 0 else row[j] * s.repetition_penalty
    for j in set(output):
        row[j] -= s.frequency_penalty * output.count(j) + s.presence_penalty
    for j, bias in s.logit_bias:
        row[j] += bias
    return row.float()


def random_case(gen):
    """A random Sampling with penalties and a bias, and a random (prompt, output) history."""
    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    prompt = torch.randint(V, (int(torch.randint(1, 12, (), generator=gen)),), generator=gen).tolist()
    output = torch.randint(V // 2, (int(torch.randint(0, 30, (), generator=gen)),), generator=gen).tolist()
    bias = {int(j): uniform(-5, 5) for j in torch.randint(V, (4,), generator=gen)}
    s = Sampling(repetition_penalty=uniform(0.5, 2) if uniform(0, 1) < 0.5 else None,
                 presence_penalty=uniform(-2, 2), frequency_penalty=uniform(-2, 2), logit_bias=bias)
    return s, prompt, output


def test_penalties_and_bias_change_exactly_the_logits_the_formula_says():
    gen = torch.Generator().manual_seed(0)
    changed = 0
    for case in range(40):
        logits = torch.randn(2, V, generator=gen) * 2
        s, prompt, output = random_case(gen)
        ref = reference_logits(logits[0], s, prompt, output)
        # greedy: the argmax of the adjusted logits; the untouched row beside it keeps the raw argmax
        out = next_tokens(logits, [s, Sampling()], None, [(prompt, output), None])
        assert out.tolist() == [int(ref.argmax()), int(logits[1].argmax())]
        changed += int(ref.argmax()) != int(logits[0].argmax())
        # sampled with a seed: the same draws as the reference distribution with that seed
        sampled = s.replace(temperature=0.7, seed=case)
        gen_a, gen_b = make_generator(sampled), torch.Generator().manual_seed(case)
        for _ in range(10):
            drawn = int(next_tokens(logits[:1], [sampled], [gen_a], [(prompt, output)])[0])
            assert drawn == inverse_cdf((ref / 0.7).softmax(-1), gen_b)
    assert changed >= 10  # the adjustments did decide the argmax often enough for the test to mean something


def test_frequency_and_presence_count_the_output_only():
    logits = torch.zeros(1, V)
    logits[0, :3] = torch.tensor([1.0, 0.9, 0.8])
    s = Sampling(frequency_penalty=0.1, presence_penalty=0.0)
    assert int(next_tokens(logits, [s], None, [([0, 0, 0, 0], [])])[0]) == 0  # the prompt does not count
    assert int(next_tokens(logits, [s], None, [([], [0, 0])])[0]) == 1  # 1.0 - 2 * 0.1 < 0.9
    # presence counts a token once, however often: 0.75 and 0.65 < 0.8
    assert int(next_tokens(logits, [Sampling(presence_penalty=0.25)], None, [([], [0, 0, 0, 1])])[0]) == 2
    assert int(next_tokens(logits, [Sampling(presence_penalty=0.15)], None, [([], [0, 0, 0, 1])])[0]) == 0
    assert int(next_tokens(logits, [Sampling(frequency_penalty=-1)], None, [([], [2])])[0]) == 2  # < 0 encourages


def test_bias_minus_100_removes_the_argmax_and_plus_100_forces_a_token():
    logits = peaked()
    ban = Sampling(logit_bias={0: -100})
    assert int(next_tokens(logits[None], [ban])[0]) == 1
    assert 0 not in draws(logits, ban.replace(temperature=1.0, seed=0))
    assert draws(logits, Sampling(temperature=1.0, seed=0, logit_bias={37: 100})) == {37}
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        next_tokens(logits[None], [Sampling(logit_bias={V: 1})])


def test_allowed_masks_are_respected_by_greedy_and_sampling():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, V, generator=gen)
    allowed = torch.rand(3, V, generator=gen) < 0.2
    allowed[:, logits[0].argmax()] = False  # the raw argmax is not allowed
    s = [Sampling(), Sampling(temperature=5.0, seed=1), Sampling(logit_bias={int(logits[2].argmax()): 100})]
    gens = [make_generator(x) for x in s]
    before = logits.clone()
    for _ in range(50):
        out = next_tokens(logits, s, gens, None, list(allowed))
        assert all(allowed[i, t] for i, t in enumerate(out.tolist()))
    assert out[0] == logits[0].masked_fill(~allowed[0], -math.inf).argmax()
    assert torch.equal(logits, before)
    assert draws(logits[1], s[1], allowed=allowed[1]) == set(allowed[1].nonzero()[:, 0].tolist())
    assert next_tokens(logits, [Sampling()] * 3, None, None, [None, allowed[1], None])[0] == logits[0].argmax()
    with pytest.raises(GenerationError, match="allows no token"):
        next_tokens(logits[:1], [Sampling()], None, None, [torch.zeros(V, dtype=torch.bool)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_are_log_softmax_and_its_top_n(dtype):
    logits = (torch.randn(4, V, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    tokens = torch.tensor([0, 5, 49, 17])
    expected = torch.log_softmax(logits.float(), -1)
    top = expected.topk(3, dim=-1)
    got = token_logprobs(logits, tokens, 3)
    for i, (chosen, best) in enumerate(got):
        assert chosen == pytest.approx(float(expected[i, tokens[i]]), abs=1e-6)
        assert [j for j, _ in best] == top.indices[i].tolist()
        assert [lp for _, lp in best] == pytest.approx(top.values[i].tolist(), abs=1e-6)
    assert [best for _, best in token_logprobs(logits, tokens.tolist(), 0)] == [[]] * 4
    assert len(token_logprobs(logits, tokens, 10 * V)[0][1]) == V  # more than the vocabulary: all of it


def test_same_seed_same_draws_whatever_the_batch():
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(3, V, generator=gen)
    s = Sampling(temperature=1.0, top_p=0.95, seed=42)

    def run(batch_rows, samplings):
        gens = [make_generator(x) for x in samplings]
        return [next_tokens(batch_rows, samplings, gens)[0].item() for _ in range(30)]

    alone = run(rows[:1], [s])
    together = run(rows, [s, Sampling(temperature=1.0, seed=1), Sampling()])
    other_seed = run(rows[:1], [s.replace(seed=43)])
    assert alone == together
    assert alone != other_seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_draw_picks_the_torch_paths_tokens_with_the_same_generators(monkeypatch, dtype):
    """Sampled rows go to gemmakit's draw kernel where it is built, else through torch ops: with
    the same seeds both give the same tokens (a seeded request's text does not depend on which
    ran), temperatures and min_p included."""
    from gemmakit import kernels

    assert kernels.extension() is not None
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(16, 262144, generator=g) * 4).to(dtype)
    samplings = [Sampling(temperature=t, min_p=m, seed=i) for i, (t, m) in
                 enumerate([(1.0, None), (0.7, None), (1.3, 0.1), (0.05, None)] * 4)]

    def run():
        return next_tokens(logits, samplings, [make_generator(s) for s in samplings])

    fast = run()
    monkeypatch.setattr(kernels, "draw", lambda *a: None)
    assert torch.equal(fast, run())
