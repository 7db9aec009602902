"""`gemmakit dpo` and `gemmakit reward`: training on preference pairs (see pairs.py for the JSONL)."""

from __future__ import annotations

import argparse

FLAGS = {  # field: (type, help), shared by both commands
    "eval_data": (str, "JSONL of held-out pairs (default: --eval-fraction of --data)"),
    "eval_fraction": (float, "share of --data held out (default 0.1)"),
    "epochs": (int, "passes over the training pairs (default 1)"),
    "max_steps": (int, "optimizer steps (default: --epochs passes)"),
    "batch_size": (int, "pairs per step (default 4)"),
    "lr": (float, "peak learning rate (default 1e-5, LoRA 1e-4)"),
    "warmup_steps": (int, "linear warmup steps (default: 10%% of the steps)"),
    "weight_decay": (float, "AdamW weight decay on matrices (default 0)"),
    "grad_clip": (float, "gradient norm clip (default 1)"),
    "lora_rank": (int, "LoRA rank (0, the default: full fine-tuning)"),
    "lora_alpha": (float, "LoRA alpha (default: 2 * rank)"),
    "max_len": (int, "most tokens of prompt + answer (default 1024); a longer pair is an error"),
    "eval_every": (int, "steps between held-out evaluations (default 50)"),
    "save_every": (int, "steps between checkpoints in OUT/checkpoints (default 50, and one at the end)"),
    "keep_last": (int, "checkpoints kept (default 2; 0: all)"),
    "log_every": (int, "steps between metrics.jsonl records (default 1)"),
    "seed": (int, "seed of the split, the order, the head and LoRA's initialisation"),
    "tokenizer": (str, "tokenizer.model/.json, for a model without one"),
    "device": (str, "cpu or cuda"),
}
DPO_FLAGS = {
    "loss": (str, "dpo (the default), ipo, or simpo (length-normalised, no reference)"),
    "beta": (float, "the loss's beta (default 0.1; simpo 2.0)"),
    "simpo_gamma": (float, "SimPO's target margin (default 0.5)"),
}


def register(sub) -> None:
    for name, doc, extra in (
            ("dpo", "preference tuning (DPO, IPO, SimPO) on JSONL pairs {'prompt' or 'messages', 'chosen', "
                    "'rejected'}, full or LoRA", DPO_FLAGS),
            ("reward", "train a reward model (Gemma + scalar head, Bradley-Terry) on the same JSONL pairs", {})):
        p = sub.add_parser(name, help=doc, description=doc)
        p.add_argument("--model", "-m", required=True, help="HF folder, checkpoint, GGUF or preset to start from")
        p.add_argument("--data", required=True, help="JSONL of preference pairs")
        p.add_argument("--out", required=True, help="output folder")
        for field, (kind, help) in {**extra, **FLAGS}.items():
            p.add_argument("--" + field.replace("_", "-"), type=kind, help=help)
        p.add_argument("--lora-targets", nargs="+", help="modules that get adapters (default: q/k/v/o/gate/up/down)")
        p.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast (weights stay float32)")
        p.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint in --out")
        p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
        p.set_defaults(func=run, objective=name, flags=[*extra, *FLAGS, "lora_targets", "bf16", "resume", "progress"])


def run(args: argparse.Namespace) -> int:
    values = {"model": args.model, "data": args.data, "out": args.out}
    values.update({f: getattr(args, f) for f in args.flags if getattr(args, f) is not None})
    if args.objective == "dpo":
        from .dpo import DPOConfig, dpo

        out, result = dpo(DPOConfig(**values))
    else:
        from .reward import RewardConfig, train_reward

        out, result = train_reward(RewardConfig(**values))
    held = (f", held-out accuracy {result['val_accuracy']:.3f}, margin {result['val_margin']:.3f}"
            if result else "")
    print(f"{out}: {args.objective} done{held}")
    return 0
