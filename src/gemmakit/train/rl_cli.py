"""`gemmakit rl`: online RL (GRPO, RLOO) with rewards from a Python function or a reward model;
flags, or a TOML/YAML/JSON file with the same fields. Under torchrun:
`torchrun --nproc_per_node N -m gemmakit.train rl ARGS`."""

from __future__ import annotations

import argparse
import os

from ..errors import ConfigError
from .cli import read_config_file

FLAGS = {  # field: (type, help); every RLConfig field a user sets from the command line
    "reward": (str, "module:function (an importable module or a .py file) called as "
                    "fn(prompts=..., completions=..., **other_jsonl_fields) -> one number per completion"),
    "reward_model": (str, "a trained reward model's folder (`gemmakit reward`), instead of --reward"),
    "eval_prompts": (str, "held-out prompts (same JSONL), scored with greedy completions"),
    "steps": (int, "RL steps (rollouts, then updates)"),
    "batch_prompts": (int, "prompts per step, over all processes"),
    "samples": (int, "completions per prompt (the group)"),
    "max_new_tokens": (int, "tokens per completion at most"),
    "temperature": (float, "sampling temperature of the rollouts (and of the log-probs)"),
    "beta": (float, "KL penalty to the reference (starting) policy; 0: no reference"),
    "epsilon": (float, "clip range of the probability ratio"),
    "epsilon_high": (float, "upper clip range (default: epsilon)"),
    "updates": (int, "optimizer steps per batch of rollouts (> 1: PPO-style clipped ratio)"),
    "micro_batch": (int, "completions per training forward"),
    "lr": (float, "learning rate (default: 1e-6 full, 1e-5 LoRA)"),
    "weight_decay": (float, "AdamW weight decay"),
    "grad_clip": (float, "gradient norm clip"),
    "eval_every": (int, "steps between held-out evaluations"),
    "log_every": (int, "steps between metrics.jsonl records"),
    "save_every": (int, "steps between checkpoints in OUT/checkpoints (and one at the end)"),
    "keep_last": (int, "checkpoints kept (0: all)"),
    "seed": (int, "seed of the prompt order, of every sample and of LoRA's initialisation"),
    "tokenizer": (str, "tokenizer.model/.json to use"),
    "lora_rank": (int, "LoRA rank (0: full fine-tuning)"),
    "lora_alpha": (float, "LoRA alpha (default: 2 * rank)"),
    "rollout_dtype": (str, "the engine's copy of the weights: bfloat16 (the default; refreshed each step) or "
                           "float32 (the policy's own tensors)"),
    "device": (str, "cpu or cuda"),
}


def register(sub) -> None:
    doc = "online RL (GRPO or RLOO) against a reward function, with rollouts on gemmakit's engine"
    p = sub.add_parser("rl", help=doc, description=doc)
    p.add_argument("--config", help="TOML, YAML or JSON file with the same fields (flags override it)")
    p.add_argument("--model", "-m", help="checkpoint to start from (or a preset / GemmaConfig .json)")
    p.add_argument("--prompts", help='JSONL: {"prompt": ...} or {"messages": [...]} a line, plus fields the reward reads')
    p.add_argument("--out", help="output folder (a Hugging Face folder at the end)")
    p.add_argument("--algo", choices=("grpo", "rloo"), default=None, help="grpo (the default) or rloo")
    for name, (kind, help) in FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=help)
    p.add_argument("--stop", action="append", help="a stop string ending completions (repeatable)")
    p.add_argument("--lora-targets", nargs="+", help="modules that get adapters (default: q/k/v/o/gate/up/down)")
    p.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast of the training forwards")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .rl import RLConfig, train_rl

    values = read_config_file(args.config) if args.config else {}
    for name in ["model", "prompts", "out", "algo", "stop", "lora_targets", "bf16", "resume", "progress", *FLAGS]:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    for required in ("model", "prompts", "out"):
        if values.get(required) is None:
            raise ConfigError(f"--{required} is required (on the command line or in --config)")
    result = train_rl(RLConfig.from_dict(values))
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process gets here: one summary
        last = f", reward {result.records[-1]['reward']:.3f}" if result.records else ""  # none: resumed at the end
        held = f", held-out reward {result.eval_rewards[0][1]:.3f} -> {result.eval_rewards[-1][1]:.3f}" \
            if result.eval_rewards else ""
        print(f"{result.out}: {result.steps} steps{last}{held}")
    return 0
