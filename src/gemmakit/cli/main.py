"""The `gemmakit` command: argparse subcommands over the same Python API a user would call.

generate, chat, info and convert are here; each area with commands of its own (serve, train,
eval, bench) has a `register(subparsers)` that adds its subcommands and sets `func` on each:
`func(args) -> int`. The model and sampling options they share are in options.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .. import bench
from ..errors import GemmaError
from ..eval import cli as eval_cli
from ..serve import cli as serve_cli
from ..train import cli as train_cli
from ..train import preference_cli, rl_cli
from .options import add_model_args, add_sampling_args, load_model, sampling_from

AREAS = (serve_cli, train_cli, preference_cli, rl_cli, eval_cli, bench)


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise GemmaError("no prompt: pass --prompt or pipe text on standard input")
    sampling = sampling_from(args)  # bad values fail before the model loads
    lm = load_model(args, progress=not args.json)
    stop = args.stop or None
    if args.json:
        start = time.perf_counter()
        text = lm.generate(prompt, max_new_tokens=args.max_new_tokens, stop=stop, **sampling)
        print(json.dumps({"model": str(lm.source), "prompt": prompt, "text": text,
                          "seconds": round(time.perf_counter() - start, 3)}))
        return 0
    for piece in lm.stream(prompt, max_new_tokens=args.max_new_tokens, stop=stop, **sampling):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    sampling = sampling_from(args)
    lm = load_model(args)
    session = lm.chat(system=args.system, max_new_tokens=args.max_new_tokens, **sampling)
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
            "quantize": lm.quantization, "bytes": lm.nbytes(), "config": lm.config.to_dict(),
            "tokenizer": None if lm.tokenizer is None else {"vocab_size": lm.tokenizer.vocab_size,
                                                          "stop_ids": lm.stop_ids},
            "chat_template": None if lm.metadata.chat_template is None else lm.metadata.chat_template.origin,
            "generation_config": lm.metadata.generation.fields() or None}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"source      {info['source']}")
    print(f"parameters  {info['parameters']:,}")
    print(f"dtype       {info['dtype']}  ({info['bytes'] / 2**20:,.1f} MiB)")
    print(f"quantize    {info['quantize'] or 'none'}")
    for key, value in info["config"].items():
        print(f"{key:<22}{value}")
    if lm.tokenizer is not None:
        print(f"tokenizer   {lm.tokenizer.vocab_size:,} tokens, stop ids {lm.stop_ids}")
        print(f"chat        {info['chat_template'] or 'the built-in Gemma template'}")
    generation = info["generation_config"]
    if generation:
        print(f"generation  {', '.join(f'{k}={v}' for k, v in generation.items())}  ({lm.metadata.generation.origin})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..checkpoints import gguf_writer

    to_gguf = args.dst.lower().endswith(".gguf")
    if args.type is not None and not to_gguf:
        raise GemmaError(f"--type {args.type} is for a .gguf destination; {args.dst} is written as a Hugging Face folder")
    if to_gguf:  # bad options and targets fail before the model loads
        gguf_writer.check_type(args.type or "f16")
        gguf_writer.check_target(args.dst)
    args.model = args.src
    lm = load_model(args)
    out = lm.save_gguf(args.dst, type=args.type or "f16") if to_gguf else lm.save(args.dst)
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
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="config, parameter count, dtype and bytes of a model")
    add_model_args(p, compile=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert any supported checkpoint to a Hugging Face folder or a GGUF file")
    p.add_argument("src", help="HF folder, .ckpt/.bin, .gguf or preset name")
    p.add_argument("dst", help="output folder (must not exist or be empty), or a new .gguf file")
    p.add_argument("--type", default=None, help="of a .gguf destination: f32, f16 (the default), bf16, q8_0, "
                                                "q4_k_m (llama.cpp's mixture; needs llama-cpp-python)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--variant", default=None)
    p.set_defaults(func=cmd_convert)
    for area in AREAS:
        area.register(sub)
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
