"""gemmakit.train.policy_gradient: the GRPO and RLOO losses and gradients equal trl's
GRPOTrainer / RLOOTrainer loss code on the same log-probs and advantages; advantages equal the
papers' formulas on a known reward table; the training forward's log-probs equal the engine's
for the tokens it sampled."""

import statistics
import types
from collections import defaultdict

import pytest
import torch

from gemmakit.config import GemmaConfig
from gemmakit.model import Gemma
from gemmakit.runtime.sampling import Sampling
from gemmakit.train import rollout
from gemmakit.train.policy_gradient import (
    completion_logprobs,
    group_advantages,
    grpo_loss,
    leave_one_out_advantages,
    rloo_loss,
    sequence_kl,
)

REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.5]]


class _Accelerator:
    """One process: trl's reduce/gather are the identity."""

    def reduce(self, t, reduction="sum"):
        return t

    def gather(self, t):
        return t

    gather_for_metrics = gather


def _trl_self(logps, **fields):
    """What trl's `_compute_loss` reads of its trainer, with the model's forward replaced by
    the given per-token log-probs."""
    entropies = torch.zeros_like(logps)
    return types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", use_vllm=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, accelerator=_Accelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None), **fields)


def _case(seed=0, B=6, C=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 1, 7, 4])[:B]
    mask = torch.arange(C)[None] < lengths[:, None]
    logps = -torch.rand(B, C, generator=g) * 3
    old = logps + torch.randn(B, C, generator=g) * 0.3  # ratios far enough from 1 to clip
    ref = logps + torch.randn(B, C, generator=g) * 0.5
    advantages = torch.randn(B, generator=g)
    return logps, old, ref, advantages, mask


def _inputs(mask, advantages, **extra):
    B, C = mask.shape
    return {"prompt_ids": torch.ones(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
            "completion_ids": torch.ones(B, C, dtype=torch.long), "completion_mask": mask.long(),
            "advantages": advantages, **extra}


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("fresh", [True, False])  # fresh: one update per rollout, old log-probs = the current ones
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_grpo_loss_and_gradient_equal_trl(beta, fresh, epsilon_high):
    from trl import GRPOTrainer

    logps, old, ref, advantages, mask = _case()
    ours = logps.clone().requires_grad_()
    per_seq, stats = grpo_loss(ours, ours.detach() if fresh else old, advantages, mask, ref, beta, 0.2, epsilon_high)
    per_seq.mean().backward()

    theirs = logps.clone().requires_grad_()
    trainer = _trl_self(theirs, beta=beta, loss_type="grpo", epsilon_low=0.2,
                        epsilon_high=0.2 if epsilon_high is None else epsilon_high)
    extra = {"ref_per_token_logps": ref} | ({} if fresh else {"old_per_token_logps": old})
    loss = GRPOTrainer._compute_loss(trainer, None, _inputs(mask, advantages, **extra))
    loss.backward()
    # The same float32 operations in another order: a few ulps of the loss.
    assert float(per_seq.detach().mean()) == pytest.approx(float(loss.detach()), rel=1e-6, abs=1e-7)
    assert torch.allclose(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7)
    if beta:
        mean_kl = float((stats["kl"] * mask).sum() / mask.sum())
        assert mean_kl == pytest.approx(trainer._metrics["train"]["kl"][-1], rel=1e-6)
    if not fresh:
        clipped = float((stats["clipped"] * mask).sum() / mask.sum())
        assert clipped == pytest.approx(trainer._metrics["train"]["clip_ratio/region_mean"][-1], rel=1e-6)
        assert clipped > 0  # the case exercises the clip


@pytest.mark.parametrize("fresh", [True, False])
def test_rloo_loss_and_gradient_equal_trl(fresh):
    from trl import RLOOTrainer

    logps, old, _, advantages, mask = _case(1)
    old = logps if fresh else old
    ours = logps.clone().requires_grad_()
    per_seq, _ = rloo_loss(ours, old, advantages, mask, 0.2)
    per_seq.mean().backward()

    theirs = logps.clone().requires_grad_()
    trainer = _trl_self(theirs, epsilon_low=0.2, epsilon_high=0.2)
    old_logps = (old * mask).sum(1)  # as trl's rollout computes it
    loss = RLOOTrainer._compute_loss(trainer, None, _inputs(mask, advantages, old_logps=old_logps))
    loss.backward()
    assert float(per_seq.detach().mean()) == pytest.approx(float(loss.detach()), rel=1e-6, abs=1e-7)
    assert torch.allclose(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7)


def test_group_advantages_of_a_known_table():
    got = group_advantages(torch.tensor(REWARDS))
    for row, out in zip(REWARDS, got.tolist()):
        mean, std = statistics.mean(row), statistics.stdev(row)  # the sample standard deviation
        assert out == pytest.approx([(r - mean) / (std + 1e-4) for r in row], rel=1e-6, abs=1e-7)
    assert got[1].tolist() == [0.0] * 4  # a group that all scored alike teaches nothing
    assert got[0].tolist() == pytest.approx([0.8659, -0.8659, -0.8659, 0.8659], abs=1e-4)


def test_leave_one_out_advantages_of_a_known_table():
    got = leave_one_out_advantages(torch.tensor(REWARDS))
    for row, out in zip(REWARDS, got.tolist()):
        expected = [r - statistics.mean(row[:i] + row[i + 1:]) for i, r in enumerate(row)]
        assert out == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert got[2].tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, -0.5])


def test_rloo_kl_penalty_is_the_summed_log_ratio():
    _, old, ref, _, mask = _case(2)
    kl = sequence_kl(old, ref, mask)
    for i in range(mask.shape[0]):
        n = int(mask[i].sum())
        assert float(kl[i]) == pytest.approx(float((old[i, :n] - ref[i, :n]).sum()), rel=1e-6, abs=1e-6)


CONFIGS = {
    "gemma2": GemmaConfig(family="gemma2", vocab_size=384, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1,
                          head_dim=32, ffn_dim=128, max_seq_len=128, attn_logit_softcap=50.0,
                          final_logit_softcap=3.0, sliding_window=8, global_every=2, post_norms=True),
    "gemma3": GemmaConfig(family="gemma3", vocab_size=400, d_model=64, n_layers=3, n_heads=2, n_kv_heads=1,
                          head_dim=32, ffn_dim=128, max_seq_len=128, sliding_window=8, global_every=3,
                          post_norms=True, qk_norm=True, rope_theta_global=1e6),
}


@pytest.fixture(params=sorted(CONFIGS))
def policy(request):
    torch.manual_seed(0)
    model = Gemma(CONFIGS[request.param])
    model.reset_parameters(std=0.2, norm_std=0.1)  # logits far from uniform
    return model


def _prompts(tokenizer):
    texts = ["the cat sat on a mat", "a dog", "birds sang old songs while the cat ran far from home"]
    return [rollout.Prompt(t, tokenizer.encode(t, add_bos=True)) for t in texts]


def test_rollouts_are_the_engines_own_samples_and_logprobs(policy, tiny_tokenizer):
    """The rollout's tokens are what the engine samples for the same seeds, and the training
    forward gives them the log-probabilities the engine sampled them with (temperature 1: the
    engine's raw logprobs are the sampling distribution's), past the sliding window, with
    prompts of several lengths padded into one batch."""
    from gemmakit.runtime.engine import Engine

    prompts, k, n = _prompts(tiny_tokenizer), 2, 12
    seeds = [[rollout.sample_seed(0, 5, i, j) for j in range(k)] for i in range(len(prompts))]
    got = rollout.generate(policy, tiny_tokenizer, prompts, k, n, Sampling(temperature=1.0), seeds)
    assert policy.training  # the engine's eval() is undone

    engine = Engine(policy, tiny_tokenizer, max_batch=1, max_len=64)  # one at a time: no sharing, no batching
    rows, starts, engine_logps = [], [], []
    for p, group, prompt_seeds in zip(prompts, got, seeds):
        for r, seed in zip(group, prompt_seeds):
            alone = engine.submit(p.ids, n, Sampling(temperature=1.0, seed=seed), tiny_tokenizer.stop_ids, logprobs=0)
            while engine.busy:
                engine.step()
            assert r.output_ids == alone.output_ids
            rows.append(p.ids + r.output_ids)
            starts.append(len(p.ids))
            engine_logps.append([lp for lp, _ in alone.output_logprobs])
    assert len({tuple(r) for r in rows}) == len(rows)  # k different samples of each prompt

    logps, mask = completion_logprobs(policy, rows, starts, temperature=1.0, vocab=tiny_tokenizer.vocab_size)
    for i, expected in enumerate(engine_logps):
        assert int(mask[i].sum()) == len(expected)
        # The cached decode path against one causal forward: float32 rounding of 2-3 layers.
        assert logps[i, :len(expected)].tolist() == pytest.approx(expected, abs=2e-4)


def test_logprobs_at_a_temperature_equal_a_plain_log_softmax(policy):
    torch.manual_seed(1)
    V = policy.config.vocab_size
    rows = [torch.randint(0, V - 16, (n,)).tolist() for n in (12, 20, 5)]
    starts = [4, 9, 2]
    logps, mask = completion_logprobs(policy, rows, starts, temperature=0.7, vocab=V - 16)
    with torch.no_grad():
        for i, (row, s) in enumerate(zip(rows, starts)):
            logits = policy(torch.tensor([row]))[0, :, :V - 16].float() / 0.7  # (T, V'), alone, unpadded
            expected = logits.log_softmax(-1)[torch.arange(s - 1, len(row) - 1), torch.tensor(row[s:])]
            assert logps[i, :len(row) - s].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
            assert not mask[i, len(row) - s:].any()


def test_rollouts_see_the_policys_current_weights(tiny_tokenizer):
    """After the weights change in place (as an optimizer step changes them), the next rollout
    samples from the new weights: the same tokens as a fresh copy of the changed model gives."""
    import copy

    torch.manual_seed(0)
    policy = Gemma(CONFIGS["gemma3"])  # small random weights: a change of them moves the argmax
    prompts = _prompts(tiny_tokenizer)
    greedy = Sampling()
    before = [g[0].output_ids for g in rollout.generate(policy, tiny_tokenizer, prompts, 1, 8, greedy)]
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    after = [g[0].output_ids for g in rollout.generate(policy, tiny_tokenizer, prompts, 1, 8, greedy)]
    fresh = [g[0].output_ids for g in rollout.generate(copy.deepcopy(policy), tiny_tokenizer, prompts, 1, 8, greedy)]
    assert after == fresh
    assert after != before
