"""Quantized conversions of checkpoints, kept on disk: a checkpoint source like any other.

`read(source, quantization)` converts `source` the first time (read, build in float32, quantize,
write safetensors, the tokenizer and quantized.json under the cache directory) and returns the
converted files as a Checkpoint, so later starts skip reading and dequantizing the source: int8
tensors stay memory-mapped from the converted file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..config import GemmaConfig
from ..errors import CheckpointError
from ..model.quantized import Quantization, quantize
from ..paths import atomic_path, cache_dir, fingerprint
from ..tokenizer import Tokenizer
from . import hf, is_gguf, metadata
from .checkpoint import Checkpoint, TensorRef, build

_FORMAT = 5  # bump when the files change meaning (5: the checkpoint's chat template and generation defaults)
WEIGHTS = "model.safetensors"
META = "quantized.json"


def auto(source: str | os.PathLike, device: torch.device) -> Quantization | None:
    """What quantize="auto" means for `source`: int8 on the CPU for a file whose own weights are
    quantized (a GGUF of Q4_K, Q5_0, Q6_K, Q8_0 blocks): int8's rounding is a small part of the
    file's own (perplexity within 1% of the file's float32 dequantization; RESULTS.md), and a
    decode step reads a quarter of float32's bytes. Float checkpoints load as they are. The answer
    is remembered per file, so a warm start does not read the GGUF's header again."""
    src = Path(source)
    if device.type != "cpu" or not src.is_file() or not is_gguf(src):
        return None
    memo = cache_dir() / "quantized" / f"{src.stem}-{fingerprint([src], _FORMAT)}.auto"
    try:
        quantized = memo.read_text() == "int8"
    except OSError:
        from . import gguf

        quantized = gguf.stores_quantized(src)
        with atomic_path(memo) as tmp:
            tmp.write_text("int8" if quantized else "none")
    return Quantization("int8") if quantized else None


def path(source: str | os.PathLike, q: Quantization, variant: str | None = None) -> Path:
    """Where the conversion of `source` lives: keyed by its files as they are now, the variant,
    the quantization, and the torch version and CPU capability (int4's layout is the kernel's)."""
    src = Path(source).resolve()
    files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
    key = fingerprint(files, q.mode, q.group_size, str(q.dtype), variant, torch.__version__,
                      torch.backends.cpu.get_cpu_capability(), _FORMAT)
    return cache_dir() / "quantized" / f"{src.stem}-{q.mode}-{key}"


def read(source: str | os.PathLike, q: Quantization, variant: str | None = None, progress: bool = True) -> Checkpoint:
    """The quantized `source`, converted now if it has not been before."""
    # looked up when called (tests replace the reader)
    from . import read as read_source

    folder = path(source, q, variant)
    if not (folder / WEIGHTS).is_file():
        ckpt = read_source(source, variant=variant)
        module = quantize(build(ckpt, torch.float32, progress=progress), q.mode, q.group_size, q.dtype)
        with atomic_path(folder) as tmp:  # a later run never trusts half a model
            tmp.mkdir()
            meta = {"config": ckpt.config.to_dict(), "mode": q.mode, "group_size": q.group_size,
                    "dtype": str(q.dtype).removeprefix("torch.")}
            (tmp / META).write_text(json.dumps(meta))
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp / WEIGHTS))
            if ckpt.tokenizer is not None:
                ckpt.tokenizer.save(tmp, chat_template=metadata.template_value(ckpt.metadata))
            metadata.save(ckpt.metadata, tmp)
        del module
    try:
        meta = json.loads((folder / META).read_text())
        config = GemmaConfig.from_dict(meta["config"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{folder / META}: unreadable ({e}); delete {folder} to convert again") from None
    shapes, loaders = hf.weights(folder, {**hf.FLOAT_DTYPES, "I8": 1, "U8": 1})  # int8 and packed int4 weights
    # int8 tensors stay memory-mapped (never held twice: 270 MB less at peak for the default
    # model). int4 ones are copied into torch's own memory: torch's int4 CPU kernel segfaulted
    # (torch 2.13) on mapped tensors, whose start is only 8-byte aligned.
    copy = q.mode == "int4"
    tensors = {name: TensorRef(shape, (lambda f=loaders[name]: f().clone()) if copy else loaders[name])
               for name, shape in shapes.items()}
    tokenizer_file = next((folder / n for n in hf.TOKENIZER_FILES if (folder / n).is_file()), None)
    tokenizer = Tokenizer.from_file(tokenizer_file, family=config.family) if tokenizer_file else None
    meta = metadata.from_folder(folder)
    if meta.chat_template is not None:  # errors name the file the user gave, not the cache
        meta = dataclasses.replace(meta, chat_template=dataclasses.replace(meta.chat_template,
                                                                           origin=f"{source} (chat template)"))
    return Checkpoint(source=str(folder), config=config, tensors=tensors, tokenizer=tokenizer, quantization=q,
                      metadata=meta)
