"""`gemmakit train` and `gemmakit finetune`: flags, or a TOML/YAML file with the same fields."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..errors import ConfigError

FLAGS = {  # field: (type, help); every TrainConfig field a user sets from the command line
    "max_steps": (int, "optimizer steps"),
    "seq_len": (int, "tokens per sequence"),
    "batch_size": (int, "sequences per micro-batch on each process"),
    "grad_accum": (int, "micro-batches per optimizer step"),
    "lr": (float, "peak learning rate"),
    "warmup_steps": (int, "linear warmup steps (default: 5%% of max-steps)"),
    "weight_decay": (float, "AdamW weight decay on matrices"),
    "grad_clip": (float, "gradient norm clip"),
    "val_fraction": (float, "share of each source held out"),
    "eval_every": (int, "steps between held-out evaluations"),
    "eval_batches": (int, "global batches of held-out rows per evaluation"),
    "save_every": (int, "steps between checkpoints"),
    "keep_last": (int, "checkpoints kept"),
    "log_every": (int, "steps between metrics.jsonl records"),
    "seed": (int, "seed of the initialisation and the data order"),
    "tokenizer": (str, "tokenizer.model/.json (a model without one gets one trained on the data)"),
    "lora_rank": (int, "LoRA rank (0: full fine-tuning)"),
    "lora_alpha": (float, "LoRA alpha (default: 2 * rank)"),
    "strategy": (str, "ddp or fsdp, under torchrun"),
    "device": (str, "cpu or cuda"),
}


def register(sub) -> None:
    for name, sft in (("train", False), ("finetune", True)):
        doc = ("pretrain a model on text and code files" if not sft else
               "supervised fine-tuning on chat JSONL ({'messages': [...]} per line), full or LoRA")
        p = sub.add_parser(name, help=doc, description=doc)
        p.add_argument("--config", help="TOML or YAML file with the same fields (flags override it)")
        p.add_argument("--model", "-m", help="preset name, GemmaConfig .json, or checkpoint to start from")
        p.add_argument("--data", nargs="+", help="files, folders or globs; 'path:weight' to mix by weight")
        p.add_argument("--out", help="output folder (a Hugging Face folder at the end)")
        for field, (kind, help) in FLAGS.items():
            p.add_argument("--" + field.replace("_", "-"), type=kind, help=help)
        p.add_argument("--lora-targets", nargs="+", help="modules that get adapters (default: q/k/v/o/gate/up/down)")
        p.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast: weights and AdamW stay float32; the fastest "
                       "mode where the CPU has AMX or AVX512-BF16, or on a GPU")
        p.add_argument("--activation-checkpointing", action="store_true", default=None)
        p.add_argument("--clean-packing", action=argparse.BooleanOptionalAction, default=None,
                       help="documents packed into one row restart their positions and attend only to themselves "
                            f"(default: {'on' if sft else 'off'})")
        p.add_argument("--compile", action="store_true", default=None, help="torch.compile the forward (faster steps)")
        p.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint in --out")
        p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
        p.set_defaults(func=run, sft=sft)


def read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            import tomllib

            values = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"{p}: YAML needs the pyyaml package (or use TOML)") from None
            values = yaml.safe_load(text) or {}
        elif p.suffix == ".json":
            values = json.loads(text)
        else:
            raise ConfigError(f"{p}: a config file is .toml, .yaml or .json")
    except ConfigError:
        raise
    except Exception as e:  # tomllib, yaml and json each have their own error type
        raise ConfigError(f"{p}: cannot parse ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{p}: expected a table of settings")
    return {k.replace("-", "_"): v for k, v in values.items()}


def run(args: argparse.Namespace) -> int:
    from .loop import TrainConfig, train

    values = read_config_file(args.config) if args.config else {}
    for name in ["model", "data", "out", "lora_targets", "bf16", "activation_checkpointing", "clean_packing", "compile", "resume", "progress",
                 *FLAGS]:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    values["sft"] = args.sft
    for required in ("model", "data", "out"):
        if values.get(required) is None:
            raise ConfigError(f"--{required} is required (on the command line or in --config)")
    if isinstance(values["data"], str):
        values["data"] = [values["data"]]
    if args.sft and "lr" not in values:
        values["lr"] = 2e-4 if values.get("lora_rank") else 2e-5
    result = train(TrainConfig.from_dict(values))
    last = f"loss {result.losses[-1]:.4f}" if result.losses else "nothing to do"
    held = f", held-out loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process gets here: one summary
        print(f"{result.out}: {result.steps} steps, {last}{held}")
    return 0
