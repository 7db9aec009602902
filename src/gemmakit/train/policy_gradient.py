"""The arithmetic of online RL on sampled completions: advantages, per-token log-probabilities
from a training forward, and the GRPO and RLOO losses (as trl's GRPOTrainer and RLOOTrainer
compute them).

GRPO (Shao et al. 2024, DeepSeekMath): each prompt's k completions are a group; a completion's
advantage is its reward's distance from the group mean in group standard deviations. The loss
per token is PPO's clipped ratio times the advantage plus beta times the k3 estimate of
KL(policy || reference), exp(ref - logp) - (ref - logp) - 1; averaged over each completion's
tokens, then over completions.

RLOO (Ahmadian et al. 2024): the KL penalty is part of the reward (beta times the summed
log-ratio to the reference, per completion); the baseline of each completion is the mean reward
of the other k - 1 of its prompt; the loss is REINFORCE on the completion's summed log-probability
(a sequence-level clipped ratio), averaged over completions.
"""

from __future__ import annotations

from typing import Sequence

import torch

STD_EPS = 1e-4  # trl's: a group whose rewards are all equal gets advantage 0, not a division by 0


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO's: rewards (P, k), one row per prompt -> (r - mean) / (std + eps) within each row
    (std with Bessel's correction, as trl's)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + STD_EPS)


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO's: rewards (P, k) -> r_i - mean of the other k - 1 rewards of its row."""
    k = rewards.shape[1]
    if k < 2:
        return torch.zeros_like(rewards)
    return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)


def completion_logprobs(model: torch.nn.Module, sequences: Sequence[Sequence[int]], starts: Sequence[int],
                        temperature: float = 1.0, vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of each completion token under `model`, as sampling at `temperature`
    drew them: sequences are prompt + completion ids, starts[i] the prompt's length in row i.
    -> logps (B, C) float32 and mask (B, C) bool, C the longest completion.

    One causal forward over the right-padded rows; only the completion positions go through the
    output layer (Gemma 3's is 262k x 640, most of a small model's arithmetic). vocab: the
    tokenizer's size where the embedding has more rows than it has tokens (the engine never
    samples those rows).
    """
    device = next(model.parameters()).device
    lengths = [len(s) for s in sequences]
    width = max(lengths)
    tokens = torch.tensor([list(s) + [0] * (width - len(s)) for s in sequences], device=device)  # (B, T)
    start = torch.tensor(starts, device=device)
    n = torch.tensor(lengths, device=device) - start  # completion lengths (B,)
    C = int(n.max())
    steps = torch.arange(C, device=device)
    mask = steps[None] < n[:, None]  # (B, C)
    # position p's output predicts token p + 1: completion token j comes from position start + j - 1
    where = (start[:, None] - 1 + steps[None]).clamp(max=width - 1)  # (B, C)
    targets = tokens.gather(1, (where + 1).clamp(max=width - 1)).masked_fill(~mask, 0)  # (B, C)

    hidden = {}
    last = model.layers[-1]
    hook = last.register_forward_hook(lambda module, args, out: hidden.__setitem__("h", out))
    try:
        model(tokens, logits=False)  # the blocks only: the output layer runs below on the completions' rows
    finally:
        hook.remove()
    h = hidden["h"]  # (B, T, d)
    h = h.gather(1, where[..., None].expand(-1, -1, h.shape[-1]))  # (B, C, d)
    logits = model.embed.attend(model.norm(h)).float()  # (B, C, V)
    cap = model.config.final_logit_softcap
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    if vocab is not None:
        logits = logits[..., :vocab]
    logits = logits / temperature
    logps = logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)  # (B, C)
    return logps.masked_fill(~mask, 0.0), mask


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate (Schulman's k3): always >= 0, unbiased."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logps: torch.Tensor | None = None, beta: float = 0.0, epsilon: float = 0.2,
              epsilon_high: float | None = None) -> tuple[torch.Tensor, dict]:
    """Per-completion GRPO loss (B,) (its mean is the batch's loss) and token statistics.
    logps, old_logps, ref_logps, mask (B, C); advantages (B,)."""
    maskf = mask.float()
    low, high = 1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high)
    ratio = torch.exp(logps - old_logps)
    a = advantages[:, None]
    per_token = -torch.min(ratio * a, torch.clamp(ratio, low, high) * a)
    stats = {"clipped": (((ratio < low) & (a < 0)) | ((ratio > high) & (a > 0))).float()}
    if beta:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        stats["kl"] = kl.detach()
    per_sequence = (per_token * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)
    return per_sequence, stats


def rloo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              epsilon: float = 0.2, epsilon_high: float | None = None) -> tuple[torch.Tensor, dict]:
    """Per-completion RLOO loss (B,): the clipped ratio of whole-completion probabilities.
    logps, old_logps, mask (B, C); advantages (B,) (the KL penalty already in them)."""
    maskf = mask.float()
    low, high = 1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high)
    ratio = torch.exp((logps * maskf).sum(-1) - (old_logps * maskf).sum(-1))  # (B,)
    per_sequence = -torch.min(ratio * advantages, torch.clamp(ratio, low, high) * advantages)
    clipped_rows = ((ratio < low) & (advantages < 0)) | ((ratio > high) & (advantages > 0))
    return per_sequence, {"clipped": clipped_rows.float()[:, None].expand_as(maskf)}


def sequence_kl(old_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RLOO's KL penalty per completion (B,): the summed log-ratio of the sampled tokens (k1)."""
    return ((old_logps - ref_logps) * mask.float()).sum(-1)
