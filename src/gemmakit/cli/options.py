"""The model and sampling options that every `gemmakit` subcommand shares, and the model they load."""

from __future__ import annotations

import argparse

from ..errors import GemmaError
from ..runtime.sampling import Sampling


def add_model_args(p: argparse.ArgumentParser, compile: bool = True) -> None:
    """--model/--dtype/--device..., shared by every command that loads a model; compile=False for
    commands that never decode, where --compile would do nothing."""
    p.add_argument("--model", "-m", default=None,
                   help="HF folder, .ckpt/.bin, .gguf, or preset name (default: the real Gemma 3 270M)")
    p.add_argument("--dtype", default=None,
                   help="float32 (the default) or bfloat16; with --quantize, the activations' (int4: bfloat16)")
    p.add_argument("--exact", action="store_true",
                   help="the checkpoint's own weights in float32, decoded eagerly: --quantize none --compile eager")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model or tokenizer.json to use")
    p.add_argument("--variant", default=None, help="preset of an official checkpoint, where shapes do not tell")
    p.add_argument("--quantize", choices=("auto", "int8", "int4", "none"), default="auto",
                   help="weight-only quantized (int8: activations rounded to int8 too where the CPU has VNNI, int4: bfloat16), converted once and cached; "
                        "auto (the default): int8 on the CPU where the file's own weights are quantized (a GGUF)")
    if compile:
        p.add_argument("--compile", nargs="?", const="torch", choices=["auto", "eager", "torch", "aot"], default="auto",
                       help="how the decode step runs: auto (the default) compiles it ahead of time for int8 models "
                            "in the background, decoding eagerly until it is ready (cached on disk per shape); "
                            "`--compile` / `torch`: torch.compile (about a minute on first use); `aot`: ahead of "
                            "time, waiting for it; eager: not compiled")


def load_model(args: argparse.Namespace, progress: bool = True):
    """The model the options name (`gemmakit.load` with them); with no --model, the default model."""
    from ..checkpoints.default import default_model_path, default_model_source
    from ..lm import load

    quantize, compile = getattr(args, "quantize", None), getattr(args, "compile", None)
    if getattr(args, "exact", False):
        if (quantize not in ("auto", "none", None) or compile not in ("auto", "eager", None)
                or args.dtype not in (None, "float32")):
            raise GemmaError("--exact is float32 weights decoded eagerly: drop --quantize, --compile and --dtype")
        quantize, compile = None, None
    quantize = None if quantize == "none" else quantize
    default = args.model is None
    # The default model's GGUF for the quantized modes (converted from its own blocks); its float32
    # folder, converted once and memory-mapped after that, for the exact one.
    source = (default_model_path() if quantize else default_model_source(progress)) if default else args.model
    lm = load(source, dtype=args.dtype, device=args.device, quantize=quantize, compile=compile,
              tokenizer=getattr(args, "tokenizer", None), variant=getattr(args, "variant", None), progress=progress)
    if default:  # named for the checkpoint it was converted from (the name servers show clients)
        lm.source = str(default_model_path())
    return lm


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Left out, each takes the checkpoint's generation_config.json default, else greedy and 64 new tokens."""
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the checkpoint's (generation_config.json), else 64 (chat: 512)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 is greedy; default: the checkpoint's (generation_config.json), else greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


def sampling_from(args: argparse.Namespace) -> dict:
    """The sampling fields the user set (the checkpoint's defaults fill in the rest: LM.generate),
    checked now so that bad values fail before the model loads."""
    fields = {f: getattr(args, f) for f in SAMPLING_FLAGS if getattr(args, f) is not None}
    Sampling(**fields)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise GemmaError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    return fields


