"""Online RL of a Gemma policy: GRPO or RLOO, rewards from a Python function or a reward model,
a KL penalty to the reference policy, full or LoRA; on one process or many under torchrun.

Each step: the step's prompts are split over the processes; each process samples k completions
of each of its prompts with the engine on the policy's current weights (rollout.py; by default
a bfloat16 copy of them, refreshed each step, as trl samples with vLLM in bfloat16), scores
them (rewards.py), computes the advantages within each prompt's group, and takes the gradient
of the loss (policy_gradient.py) through a training forward on the sampled tokens; gradients are
summed over the processes, so a run's updates do not depend on how many processes share it.

The reference policy (beta > 0) is the starting model: with LoRA the same module with its
adapters switched off, otherwise a frozen copy (taken before a resumed run loads its checkpoint).
`updates` > 1 takes that many optimizer steps on each batch of rollouts, PPO-style, through the
clipped probability ratio.

Checkpoints (state.py) every `save_every` steps; `resume` continues from the last one exactly:
the prompt order and every sample's seed are pure functions of the seed and the step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..chat_template import ChatFormat
from ..checkpoints.metadata import Metadata
from ..config import check_fields, check_positive_ints, is_int
from ..errors import ConfigError
from ..lm import LM
from ..model import Gemma
from ..runtime.sampling import Sampling
from ..tokenizer import Tokenizer
from . import distributed, lora, metrics, rewards, rollout, state
from .loop import _base_model, save_model
from .policy_gradient import (
    completion_logprobs,
    group_advantages,
    grpo_loss,
    leave_one_out_advantages,
    rloo_loss,
    sequence_kl,
)

ALGOS = ("grpo", "rloo")


@dataclass
class RLConfig:
    model: str  # a checkpoint (or a preset / GemmaConfig .json with random weights) to start from
    prompts: str  # JSONL of {"prompt": ...} or {"messages": [...]}, plus fields the reward reads
    out: str
    reward: str | None = None  # module:function (a module or a .py file)
    reward_model: str | None = None  # or a trained reward model's folder
    algo: str = "grpo"
    steps: int = 100
    batch_prompts: int = 8  # prompts per step, over all processes
    samples: int = 8  # completions per prompt: the group its advantages are relative to
    max_new_tokens: int = 64
    temperature: float = 1.0
    stop: list[str] = field(default_factory=list)  # stop strings, besides the tokenizer's stop ids
    beta: float = 0.04  # KL penalty to the reference policy (0: no reference model)
    epsilon: float = 0.2  # the clipped ratio's range [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # None: epsilon
    updates: int = 1  # optimizer steps per batch of rollouts (the GRPO paper's mu)
    micro_batch: int = 8  # completions per training forward
    lr: float | None = None  # None: 1e-6 full, 1e-5 LoRA
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    bf16: bool = False  # bfloat16 autocast of the training forwards
    # The engine's copy of the weights: "bfloat16", refreshed from the policy before each rollout
    # (matmuls on AMX/AVX512-BF16 and GPUs several times float32's), or "float32": the policy's own tensors
    rollout_dtype: str = "bfloat16"
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: list[str] = field(default_factory=lambda: list(lora.TARGETS))
    eval_prompts: str | None = None  # held-out prompts, scored with greedy completions
    eval_every: int = 10
    log_every: int = 1
    save_every: int = 10  # steps between checkpoints (and one at the end)
    keep_last: int = 2  # checkpoints kept (0: all)
    resume: bool = False  # continue from the last checkpoint in `out`
    seed: int = 0
    tokenizer: str | None = None
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        check_positive_ints(self, ("steps", "batch_prompts", "samples", "max_new_tokens", "updates", "micro_batch",
                                   "eval_every", "log_every", "save_every"), ConfigError)
        if not is_int(self.keep_last) or self.keep_last < 0:
            raise ConfigError(f"keep_last must be a non-negative integer, got {self.keep_last!r}")
        if self.algo not in ALGOS:
            raise ConfigError(f"algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        if (self.reward is None) == (self.reward_model is None):
            raise ConfigError("give one of --reward module:function or --reward-model DIR")
        if self.samples < 2:
            raise ConfigError(f"samples must be >= 2: advantages compare a prompt's completions, got {self.samples}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"temperature must be > 0 (the policy samples), got {self.temperature!r}")
        if not self.beta >= 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        if not self.epsilon > 0 or (self.epsilon_high is not None and not self.epsilon_high > 0):
            raise ConfigError("epsilon and epsilon_high must be > 0")
        if self.rollout_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"rollout_dtype must be float32 or bfloat16, got {self.rollout_dtype!r}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        self.stop = list(self.stop or [])

    @classmethod
    def from_dict(cls, values: dict) -> RLConfig:
        check_fields(cls, values, ConfigError, "RL setting")
        return cls(**values)


@dataclass
class Result:
    out: Path
    steps: int
    records: list[dict]  # the metrics of each step this call ran (the same on every process)
    eval_rewards: list[tuple[int, float]]  # (step, mean held-out reward) of the evaluations it ran


# -- set-up ------------------------------------------------------------------------------------------
def _policy(cfg: RLConfig) -> tuple[Gemma, Tokenizer, Metadata]:
    model, tok, meta = _base_model(cfg)  # the weights as the file has them, never the fast mode
    if tok is None:
        raise ConfigError(f"{cfg.model} has no tokenizer; RL needs one to read prompts and score text (--tokenizer)")
    return model, tok, meta


def _reward(cfg: RLConfig) -> rewards.Reward:
    return rewards.load(cfg.reward) if cfg.reward is not None else rewards.from_reward_model(cfg.reward_model)


@contextlib.contextmanager
def _adapters_off(model: torch.nn.Module):
    """The base model's forward: every LoRA layer bypassed for the duration."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def _rollout_weights(model: torch.nn.Module, dtype: torch.dtype):
    """The module the engine samples with, and a function that brings it up to date with the
    policy: the policy itself in its own dtype; else a copy in `dtype` whose trainable
    parameters are copied over (the frozen ones never change)."""
    if dtype == model.dtype:
        return model, lambda: None
    copy_ = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
    pairs = [(mine, theirs) for mine, theirs in zip(copy_.parameters(), model.parameters()) if theirs.requires_grad]

    def refresh() -> None:
        with torch.no_grad():
            for mine, theirs in pairs:
                mine.copy_(theirs)

    return copy_, refresh


def _sum_gradients(params: list[torch.Tensor], world) -> None:
    """Every process's gradients summed into each (one flat all-reduce)."""
    if world.size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g)
        offset += g.numel()


def prompt_order(n: int, batch: int, seed: int) -> Iterator[list[int]]:
    """Each step's prompt indices: epochs of the n prompts, each in its own seeded order, cut into
    batches (one may straddle two epochs)."""
    generator = torch.Generator().manual_seed(seed)
    queue: list[int] = []
    while True:
        while len(queue) < batch:
            queue += torch.randperm(n, generator=generator).tolist()
        yield queue[:batch]
        queue = queue[batch:]


def _score(reward: rewards.Reward, completions: list) -> list[float]:
    """The reward of each (Prompt, Request), with the prompts' other JSONL fields passed along."""
    names = sorted({name for p, _ in completions for name in p.fields})
    fields = {name: [p.fields.get(name) for p, _ in completions] for name in names}
    return reward([p.prompt for p, _ in completions], [r.text for _, r in completions], fields)


@dataclass
class _Batch:
    """One process's share of a step's rollouts, flattened prompt-major: row p * k + j."""

    sequences: list[list[int]]  # prompt + completion ids
    starts: list[int]  # prompt lengths
    rewards: torch.Tensor  # (P, k) as the reward gave them
    completion_tokens: int
    seconds: float  # the engine's, generating them


# -- the loop ----------------------------------------------------------------------------------------
def train_rl(cfg: RLConfig, on_step: Callable[[int, dict], None] | None = None) -> Result:
    """Runs (or, with cfg.resume, resumes) an RL run (see RLConfig); the result is a Hugging Face
    folder in cfg.out, with metrics.jsonl, reward.png, checkpoints/ and, for LoRA, the adapter
    alone in out/adapter. `on_step(step, record)` is called after each step on every process."""
    world = distributed.init(cfg.device)
    out = Path(cfg.out)
    state.check_fresh(out, cfg.resume)
    if (out / "config.json").exists() and not cfg.resume:
        raise ConfigError(f"{out} already holds a model; choose another --out")
    if cfg.batch_prompts % world.size:
        raise ConfigError(f"batch_prompts ({cfg.batch_prompts}) must divide over the {world.size} processes")
    reward = _reward(cfg)
    model, tok, meta = _policy(cfg)
    chat = ChatFormat(tok, meta.chat_template)  # prompts as messages: the checkpoint's own template
    prompts = rollout.read_prompts(cfg.prompts, chat)
    held = rollout.read_prompts(cfg.eval_prompts, chat) if cfg.eval_prompts else []
    lr = cfg.lr if cfg.lr is not None else (1e-5 if cfg.lora_rank else 1e-6)

    config = model.config
    reference = None
    if cfg.lora_rank > 0:
        torch.manual_seed(cfg.seed)  # the adapters' initialisation: a run is a function of its settings
        model = lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha, targets=tuple(cfg.lora_targets))
    elif cfg.beta:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    model = model.to(world.device).train()
    reference = reference.to(world.device) if reference is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    sampler, refresh = _rollout_weights(model, getattr(torch, cfg.rollout_dtype))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=True)
    prompt_ids = hashlib.sha256(json.dumps([p.ids for p in prompts]).encode()).hexdigest()
    checkpoint_meta = {"config": config.to_dict(), "run": state.run_settings(cfg) | {"prompts": prompt_ids}}
    # After the reference and the rollout copy are taken from the starting weights.
    first = state.resume(out, model, optimizer, None, checkpoint_meta) if cfg.resume else 0
    autocast = partial(torch.autocast, world.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    vocab = min(model.config.vocab_size, tok.vocab_size)
    logprobs = partial(completion_logprobs, temperature=cfg.temperature, vocab=vocab)
    sampling = Sampling(temperature=cfg.temperature)
    share = cfg.batch_prompts // world.size
    k = cfg.samples

    def reference_logprobs(rows, starts):
        with torch.no_grad(), autocast():
            if reference is not None:
                return logprobs(reference, rows, starts)[0]
            with _adapters_off(model):
                return logprobs(model, rows, starts)[0]

    def rollouts(step: int, picks: list[int]) -> _Batch:
        mine = picks[world.rank * share: (world.rank + 1) * share]
        chosen = [prompts[i] for i in mine]
        seeds = [[rollout.sample_seed(cfg.seed, step, i, j) for j in range(k)] for i in mine]
        start = time.perf_counter()
        refresh()
        requests = rollout.generate(sampler, tok, chosen, k, cfg.max_new_tokens, sampling, seeds, cfg.stop)
        seconds = time.perf_counter() - start
        flat = [(p, r) for p, group in zip(chosen, requests) for r in group]
        scores = _score(reward, flat)
        return _Batch([p.ids + r.output_ids for p, r in flat], [len(p.ids) for p, _ in flat],
                      torch.tensor(scores, dtype=torch.float32).view(len(chosen), k),
                      sum(len(r.output_ids) for _, r in flat), seconds)

    def held_out_reward() -> float | None:
        """Mean reward of greedy completions of the held-out prompts (each process scores its share)."""
        if not held:
            return None
        mine = held[world.rank:: world.size]
        total = 0.0
        if mine:
            refresh()
            requests = rollout.generate(sampler, tok, mine, 1, cfg.max_new_tokens, Sampling(), stop=cfg.stop,
                                        max_batch=min(len(mine), 64))
            total = sum(_score(reward, [(p, group[0]) for p, group in zip(mine, requests)]))
        return distributed.all_sum(total, world) / len(held)

    log = None
    records, evals = [], []

    def write(record: dict) -> None:
        nonlocal log
        if not world.main:
            return
        if log is None:  # the folder appears with the first record: a run that fails at once leaves nothing
            out.mkdir(parents=True, exist_ok=True)
            (out / "rl_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
            log = metrics.MetricsLog(out / "metrics.jsonl", resume_step=first)
        log.write(record)

    def evaluate(step: int) -> None:
        value = held_out_reward()
        if value is not None:
            evals.append((step, value))
            write({"step": step, "eval_reward": value})

    batches = itertools.islice(prompt_order(len(prompts), cfg.batch_prompts, cfg.seed), first, None)
    bar = tqdm(total=cfg.steps, initial=first, desc=f"{cfg.algo}", unit="step",
               disable=not (cfg.progress and world.main))
    if first == 0:  # a resumed run's curve already has its baseline
        evaluate(0)
    for step in range(first, cfg.steps):
        picks = next(batches)
        start = time.perf_counter()
        batch = rollouts(step, picks)
        rows, starts = batch.sequences, batch.starts
        chunks = [slice(i, i + cfg.micro_batch) for i in range(0, len(rows), cfg.micro_batch)]

        # Before any update: the rollout policy's and the reference's log-probs, where the loss needs them.
        need_old = cfg.updates > 1 or (cfg.algo == "rloo" and cfg.beta)
        old, ref, masks = {}, {}, {}
        for c in chunks:
            if need_old:
                with torch.no_grad(), autocast():
                    old[c.start], masks[c.start] = logprobs(model, rows[c], starts[c])
            if cfg.beta:
                ref[c.start] = reference_logprobs(rows[c], starts[c])
        scores = batch.rewards
        if cfg.algo == "grpo":
            advantages = group_advantages(scores).view(-1)
        else:
            if cfg.beta:  # RLOO's KL penalty is part of the reward
                kl = torch.cat([sequence_kl(old[c.start], ref[c.start], masks[c.start]) for c in chunks])
                scores = scores - cfg.beta * kl.view_as(scores)
            advantages = leave_one_out_advantages(scores).view(-1)

        n_global = cfg.batch_prompts * k
        stats = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "tokens": 0.0}  # summed over the updates
        for _ in range(cfg.updates):
            for c in chunks:
                with autocast():
                    lp, mask = logprobs(model, rows[c], starts[c])
                    before = old.get(c.start, lp.detach())
                    if cfg.algo == "grpo":
                        per_seq, extra = grpo_loss(lp, before, advantages[c], mask, ref.get(c.start), cfg.beta,
                                                   cfg.epsilon, cfg.epsilon_high)
                    else:
                        per_seq, extra = rloo_loss(lp, before, advantages[c], mask, cfg.epsilon, cfg.epsilon_high)
                (per_seq.sum() / n_global).backward()
                stats["loss"] += float(per_seq.detach().sum())
                stats["tokens"] += float(mask.sum())
                stats["clipped"] += float((extra["clipped"] * mask).sum())
                if "kl" in extra:
                    stats["kl"] += float((extra["kl"] * mask).sum())
            _sum_gradients(params, world)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        totals = {name: distributed.all_sum(v, world) for name, v in stats.items()}
        reward_sum = distributed.all_sum(float(batch.rewards.sum()), world)
        reward_sq = distributed.all_sum(float((batch.rewards ** 2).sum()), world)
        sampled = distributed.all_sum(batch.completion_tokens, world)
        mean = reward_sum / n_global
        record = {"step": step + 1, "reward": mean, "reward_std": math.sqrt(max(0.0, reward_sq / n_global - mean ** 2)),
                  "loss": totals["loss"] / (n_global * cfg.updates), "grad_norm": grad_norm,
                  "completion_length": sampled / n_global, "clipped": totals["clipped"] / max(totals["tokens"], 1.0),
                  "rollout_tokens_per_s": sampled / distributed.all_sum(batch.seconds, world) * world.size,
                  "step_s": time.perf_counter() - start}
        if cfg.beta and cfg.algo == "grpo":
            record["kl"] = totals["kl"] / max(totals["tokens"], 1.0)
        records.append(record)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            write(record)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            evaluate(step + 1)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            state.save(out / state.FOLDER, model, optimizer, None, step + 1, checkpoint_meta, cfg.keep_last, world.main)
        bar.set_postfix(reward=f"{mean:.3f}")
        bar.update(1)
        if on_step is not None:
            on_step(step + 1, record)
    bar.close()

    if world.main:
        plot(out / "metrics.jsonl", out / "reward.png")

        final = model
        if cfg.lora_rank > 0:
            lora.save_adapter(final, out / "adapter", base_model=str(cfg.model))
            final = lora.merge(final)
        save_model(LM(final.float().eval(), tok, metadata=meta), out, progress=cfg.progress)
    if world.size > 1:
        torch.distributed.barrier()
    return Result(out, cfg.steps, records, evals)


def plot(path: Path, out: Path) -> Path:
    """Mean reward of each step's rollouts and of the held-out prompts, in one PNG."""
    return metrics.plot(path, out, ("reward", "reward of the step's samples"),
                        ("eval_reward", "held-out reward (greedy)"), ylabel="mean reward")
