"""The `gemmakit` command: argparse subcommands over the same Python API a user would call.

Each area with commands of its own (serve, train, eval, bench) has a `cli.py` with
`register(subparsers)`, which adds its subcommands and sets `func` on each: `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from .errors import GemmaError

AREAS = ["gemmakit.serve.cli", "gemmakit.train.cli", "gemmakit.eval.cli", "gemmakit.bench"]


def add_model_args(p: argparse.ArgumentParser, compile: bool = True) -> None:
    """--model/--dtype/--device..., shared by every command that loads a model; compile=False for
    commands that never decode, where --compile would do nothing."""
    p.add_argument("--model", "-m", default=None,
                   help="HF folder, .ckpt/.bin, .gguf, or preset name (default: the real Gemma 3 270M)")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model or tokenizer.json to use")
    p.add_argument("--variant", default=None, help="preset of an official checkpoint, where shapes do not tell")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only quantized (int8: float32 activations, int4: bfloat16), converted once and cached")
    if compile:
        p.add_argument("--compile", nargs="?", const="torch", choices=["torch", "aot"], default=False,
                       help="compile the decode step: faster tokens after about a minute of compiling on first use; "
                            "`--compile aot`: ahead of time (AOTInductor, no Python left in a step; the compiled "
                            "step is cached on disk)")


def load_model(args: argparse.Namespace, progress: bool = True):
    import gemmakit
    from .default_model import default_model_path, default_model_source

    default = args.model is None
    source = default_model_source(progress) if default else args.model
    if getattr(args, "quantize", None):
        from . import quantize

        if args.device != "cpu" or getattr(args, "tokenizer", None) or getattr(args, "variant", None):
            raise GemmaError("--quantize runs on the CPU with the checkpoint's own tokenizer and variant "
                             "(drop --device, --tokenizer and --variant)")
        # float32 (the flag's default) means the mode's own activation dtype: int4's kernel needs bfloat16.
        dtype = None if args.dtype == "float32" else args.dtype
        lm = quantize.load(source, args.quantize, dtype=dtype, progress=progress)
    else:
        lm = gemmakit.load(source, dtype=args.dtype, device=args.device, variant=getattr(args, "variant", None),
                           tokenizer=getattr(args, "tokenizer", None), progress=progress)
    lm.compile = getattr(args, "compile", False)
    if default:  # named for the checkpoint it was converted from (the name servers show clients)
        lm.source = str(default_model_path())
    return lm


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def sampling_from(args: argparse.Namespace):
    from .sampling import Sampling

    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty, seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise GemmaError("no prompt: pass --prompt or pipe text on standard input")
    sampling = sampling_from(args)  # bad values fail before the model loads
    lm = load_model(args, progress=not args.json)
    stop = args.stop or None
    if args.json:
        start = time.perf_counter()
        text = lm.generate(prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, stop=stop)
        print(json.dumps({"model": str(lm.source), "prompt": prompt, "text": text,
                          "seconds": round(time.perf_counter() - start, 3)}))
        return 0
    for piece in lm.stream(prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, stop=stop):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    sampling = sampling_from(args)
    lm = load_model(args)
    session = lm.chat(system=args.system, sampling=sampling, max_new_tokens=args.max_new_tokens)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with", lm.source, "- /reset starts over, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        for piece in session.stream(line):
            print(piece, end="", flush=True)
        print()
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    lm = load_model(args, progress=not args.json)
    info = {"source": str(lm.source), "parameters": lm.num_parameters(), "dtype": str(lm.dtype).removeprefix("torch."),
            "bytes": lm.nbytes(), "config": lm.config.to_dict(),
            "tokenizer": None if lm.tokenizer is None else {"vocab_size": lm.tokenizer.vocab_size,
                                                          "stop_ids": lm.tokenizer.stop_ids}}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"source      {info['source']}")
    print(f"parameters  {info['parameters']:,}")
    print(f"dtype       {info['dtype']}  ({info['bytes'] / 2**20:,.1f} MiB)")
    for key, value in info["config"].items():
        print(f"{key:<22}{value}")
    if lm.tokenizer is not None:
        print(f"tokenizer   {lm.tokenizer.vocab_size:,} tokens, stop ids {lm.tokenizer.stop_ids}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoints import hf

    args.model = args.src
    lm = load_model(args)
    out = hf.save(lm, args.dst)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemmakit", description="Run, serve, train and evaluate Gemma models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="continue a prompt")
    add_model_args(p)
    p.add_argument("--prompt", "-p", default=None, help="the prompt (default: standard input)")
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    add_sampling_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat (streams tokens)")
    add_model_args(p)
    p.add_argument("--system", default=None, help="system instructions (Gemma 3 only)")
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat, max_new_tokens=512)

    p = sub.add_parser("info", help="config, parameter count, dtype and bytes of a model")
    add_model_args(p, compile=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert any supported checkpoint to a Hugging Face folder")
    p.add_argument("src", help="HF folder, .ckpt/.bin, .gguf or preset name")
    p.add_argument("dst", help="output folder (must not exist or be empty)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--variant", default=None)
    p.set_defaults(func=cmd_convert)
    for name in AREAS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # the area is not there yet; its own imports must work
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GemmaError as e:
        print(f"gemmakit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gemmakit: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a file the user named could not be read or written
        print(f"gemmakit: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
