"""The `gemmakit` command: argparse subcommands over the same Python API a user would call.

Each area with commands of its own (serve, train, eval, bench) has a `cli.py` with
`register(subparsers)`, which adds its subcommands and sets `func` on each: `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import GemmaError

AREAS = ["gemmakit.serve.cli", "gemmakit.train.cli", "gemmakit.eval.cli", "gemmakit.bench"]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model/--dtype/--device, shared by every command that loads a model."""
    p.add_argument("--model", "-m", default=None,
                   help="HF folder, .ckpt/.bin, .gguf, or preset name (default: the real Gemma 3 270M)")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model or tokenizer.json to use")
    p.add_argument("--variant", default=None, help="preset of an official checkpoint, where shapes do not tell")


def load_model(args: argparse.Namespace, progress: bool = True):
    import gemmakit
    from .default_model import default_model_path

    source = args.model if args.model is not None else default_model_path()
    return gemmakit.load(source, dtype=args.dtype, device=args.device, variant=getattr(args, "variant", None),
                         tokenizer=getattr(args, "tokenizer", None), progress=progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemmakit", description="Run, serve, train and evaluate Gemma models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
