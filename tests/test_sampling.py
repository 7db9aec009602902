import pytest
import torch

from gemmakit.errors import GenerationError
from gemmakit.runtime.sampling import Sampling, make_generator, next_tokens

V = 50


def draws(logits_row, sampling, n=400, context=None):
    """The set of tokens drawn from one row in n draws with one generator."""
    gen = make_generator(sampling)
    logits = logits_row[None]
    return {int(next_tokens(logits, [sampling], [gen], [context])[0]) for _ in range(n)}


def peaked():
    """Logits whose probabilities fall by half from one token to the next: 10, 9.3, 8.6, ..."""
    return torch.tensor([10.0 - 0.6931 * i for i in range(V)])


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_k", 0), ("top_k", 2.5), ("top_p", 0.0),
    ("top_p", 1.5), ("min_p", -0.1), ("repetition_penalty", 0), ("seed", -1), ("seed", "7"), ("top_k", True),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(GenerationError, match=field):
        Sampling(**{field: value})
    assert issubclass(GenerationError, ValueError)


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
    assert int(next_tokens(logits[None], [greedy], None, [[7]])[0]) == 0  # token 0 not seen: unchanged
    assert int(next_tokens(logits[None], [greedy], None, [[0]])[0]) == 1  # 3.0 / 2 < 2.9
    # negative logits are multiplied: with 0 and 1 seen (1.5, 1.45), -1.0 * 2 = -2 still loses to 1.45
    assert int(next_tokens(logits[None], [greedy], None, [[0, 1, 2, 0]])[0]) == 0
    assert int(next_tokens(logits[None], [Sampling(repetition_penalty=0.5)], None, [[1]])[0]) == 1  # < 1 promotes


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
