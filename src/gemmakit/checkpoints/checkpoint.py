"""What every checkpoint reader returns (`Checkpoint`, `TensorRef`), and the model built from one.

A Checkpoint holds the config, the tokenizer (when the files hold one), the chat template and
generation defaults (metadata.py) and the tensors under the
model's own names as lazy references, so that a model is built one tensor at a time and never
holds two full copies of the weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..config import GemmaConfig
from ..errors import CheckpointError
from ..model import Gemma
from ..model.quantized import Quantization, quantized_skeleton
from ..tokenizer import Tokenizer
from .metadata import Metadata

_LAYER_NAME = re.compile(r"layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorRef:
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]  # reads the tensor (from an mmap where the format allows)


@dataclass
class Checkpoint:
    source: str  # the path, for error messages
    config: GemmaConfig
    tensors: dict[str, TensorRef]  # the model's own parameter names
    tokenizer: Tokenizer | None = None
    quantization: Quantization | None = None  # tensors already quantized (converted.py), in their final dtypes
    metadata: Metadata = field(default_factory=Metadata)  # the chat template and generation defaults


def layers_in(names) -> int:
    """How many layers tensor names show (`layers.{i}.` in the model's own names): the highest i + 1."""
    indices = [int(m.group(1)) for m in map(_LAYER_NAME.match, names) if m]
    return max(indices) + 1 if indices else 0


def check_layer_count(source, config: GemmaConfig, tensors, field: str = "n_layers", required: bool = False) -> None:
    """CheckpointError unless the config's layer count is the number of layers the tensors show: checked
    before a model of the config's depth is built, so that a forged count fails at once. A file with no
    layer tensors at all passes unless `required` (the GGUF and HF readers serve configs alone too)."""
    found = layers_in(tensors)
    if found != config.n_layers and (found or required):
        raise CheckpointError(f"{source}: {field} is {config.n_layers} but the file's tensors hold {found} layers")


def _finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """Whether every value is finite, a few MB at a time (a whole-tensor isfinite would cost an
    extra byte per weight at once)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i: i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def build(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
          progress: bool = True) -> Gemma:
    """The model with the checkpoint's weights, every parameter accounted for (no partial loads).
    A quantized checkpoint's tensors keep their own dtypes (`dtype` is the float ones')."""
    config = ckpt.config
    check_layer_count(ckpt.source, config, ckpt.tensors, required=True)
    if ckpt.quantization is None:
        with torch.device("meta"):
            model = Gemma(config)
    else:
        model = quantized_skeleton(config, ckpt.quantization)
        dtype = None
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(ckpt.tensors))
    unexpected = sorted(set(ckpt.tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{ckpt.source}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"{ckpt.source}: unexpected tensor {unexpected[0]}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name, shape in expected.items():
        got = tuple(ckpt.tensors[name].shape)
        # The JAX checkpoints pad the embedding to 256128 rows; the tokenizer's size is the truth.
        padded_embedding = name == "embed.weight" and got[1:] == shape[1:] and got[0] > shape[0]
        if got != shape and not padded_embedding:
            if name == "embed.weight" and got[1:] == shape[1:]:
                raise CheckpointError(f"{ckpt.source}: embed.weight has {got[0]} rows but the tokenizer has {shape[0]} tokens")
            raise CheckpointError(f"{ckpt.source}: tensor {name} has shape {list(got)}, expected {list(shape)}")

    state = {}
    for name in tqdm(expected, desc=f"loading {Path(ckpt.source).name}", unit="tensor", disable=not progress, leave=False):
        t = ckpt.tensors[name].load()
        if name == "embed.weight":
            t = t[: config.vocab_size]
        if t.is_floating_point() and not _finite(t):
            raise CheckpointError(f"{ckpt.source}: tensor {name} holds NaN or infinite values")
        state[name] = t.to(device=device, dtype=dtype)
        del t
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    # Finite weights can still be too large for float32 (a tensor's bytes read as another type, say):
    # three tokens through the model name such a file at load, not at a user's first prompt.
    with torch.no_grad():
        probe = torch.tensor([[2, 17, 5]], device=device) % config.vocab_size
        if not bool(torch.isfinite(model(probe)).all()):
            raise CheckpointError(f"{ckpt.source}: its weights give infinite or NaN logits (values too large "
                                  "for float arithmetic)")
    return model
