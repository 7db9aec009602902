"""Reader for google/gemma_pytorch checkpoints: one `.ckpt`, or sharded `.bin` files with an index.

The `.ckpt` holds `{"model_state_dict": {...}}`; shards hold the bare state dict and the index
(`pytorch_model.bin.index.json`) maps each tensor name to its shard. Queries, keys and values are
one fused `qkv_proj` matrix (rows: q heads, then k heads, then v heads). The files do not record
the model's config: it is a preset (`variant=`) or inferred from the tensor shapes.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import PRESETS, GemmaConfig, preset
from ..errors import CheckpointError, ConfigError
from ..tokenizer import Tokenizer
from .checkpoint import Checkpoint, TensorRef

WEIGHT_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
EMBEDDINGS = ("embedder.weight", "text_token_embedder.weight")  # the second in Gemma 3's multimodal model
# Gemma 3 multimodal checkpoints also hold the vision tower; gemmakit runs the text model only.
VISION_PREFIXES = ("siglip_vision_model.", "mm_soft_embedding_norm.", "mm_input_projection.")
ROPE_BUFFERS = ("freqs_cis", "local_freqs_cis", "global_freqs_cis")  # recomputed by the model

# Per-layer names, official -> gemmakit. Gemma 1 has two norms per layer, and its
# `post_attention_layernorm` is the norm *before the MLP*; Gemma 2/3 use that name for the norm
# applied to the attention output and add the pre/post-feedforward norms.
_LAYER_COMMON = {
    "input_layernorm": "attn_norm",
    "self_attn.o_proj": "attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}
_LAYER_GEMMA1 = {**_LAYER_COMMON, "post_attention_layernorm": "mlp_norm"}
_LAYER_POST_NORMS = {
    **_LAYER_COMMON,
    "post_attention_layernorm": "post_attn_norm",
    "pre_feedforward_layernorm": "mlp_norm",
    "post_feedforward_layernorm": "post_mlp_norm",
}
_QK_NORM = {"self_attn.query_norm": "attn.q_norm", "self_attn.key_norm": "attn.k_norm"}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def read(path: str | os.PathLike, variant: str | GemmaConfig | None = None) -> Checkpoint:
    """An official checkpoint: the .ckpt, a .bin, the index json, or a folder holding them.

    variant: a preset name from gemmakit.PRESETS or a GemmaConfig; without it the preset is
    inferred from the tensor shapes. A `tokenizer.model` next to the weights becomes the
    checkpoint's tokenizer.
    """
    path = Path(path)
    files, index = _weight_files(path)
    raw: dict[str, torch.Tensor] = {}
    for file in tqdm(files, desc="opening shards", unit="file", disable=len(files) < 2, leave=False):
        for name, tensor in _load(file).items():
            if name in raw:
                raise CheckpointError(f"{file}: tensor {name} is also in another shard")
            raw[name] = tensor
    if index is not None:
        absent = sorted(set(index) - set(raw))
        if absent:
            raise CheckpointError(f"{path}: the index puts {absent[0]} in {index[absent[0]]}, which does not hold it")
    raw = {k: v for k, v in raw.items() if not k.startswith(VISION_PREFIXES) and k not in ROPE_BUFFERS}
    _check_tensors(raw, path)

    config = _config(variant, {k: tuple(v.shape) for k, v in raw.items()}, str(path))
    tensors = _rename(raw, config, str(path))
    folder = path if path.is_dir() else path.parent
    tokenizer = None
    if (folder / "tokenizer.model").is_file():
        tokenizer = Tokenizer.from_file(folder / "tokenizer.model", family=config.family)
    return Checkpoint(source=str(path), config=config, tensors=tensors, tokenizer=tokenizer)


FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_tensors(raw: dict[str, torch.Tensor], path: Path) -> None:
    """Plain dense float tensors, or int8 weights with one float scale per row (gemma_pytorch's quantized
    checkpoints): anything else (sparse, meta, quantized, integer or complex tensors) would be cast or
    fail deep inside torch, so it is named here."""
    for name, t in raw.items():
        kind = ("not a dense tensor" if t.layout != torch.strided or t.is_nested else
                "a tensor without data (meta)" if t.is_meta else "a quantized tensor" if t.is_quantized else None)
        if kind is None and t.dtype not in FLOATS + (torch.int8,):
            kind = f"of dtype {str(t.dtype).removeprefix('torch.')} (gemmakit reads float weights and int8 with scalers)"
        if kind is not None:
            raise CheckpointError(f"{path}: tensor {name} is {kind}")
        if name.endswith(".weight_scaler"):
            weight = raw.get(name.removesuffix("_scaler"))
            if weight is None or weight.dtype != torch.int8:
                raise CheckpointError(f"{path}: {name} has no int8 weight {name.removesuffix('_scaler')} to scale")
            if t.dtype == torch.int8 or tuple(t.shape) != tuple(weight.shape[:1]):
                raise CheckpointError(f"{path}: {name} should hold {weight.shape[0]} float scales (one per row), "
                                      f"found {t.dtype} of shape {list(t.shape)}")
        elif t.dtype == torch.int8 and name.removesuffix(".weight") + ".weight_scaler" not in raw:
            raise CheckpointError(f"{path}: int8 tensor {name} has no weight_scaler")


def infer_config(shapes: Mapping[str, Sequence[int]], source: str = "checkpoint") -> GemmaConfig:
    """The preset whose shapes match these official tensor shapes (name -> shape).

    The family comes from the tensors present (QK-norm: Gemma 3; pre-feedforward norm: Gemma 2).
    Raises ConfigError when no preset, or more than one different preset, fits.
    """
    names = set(shapes)
    if any(n.endswith("self_attn.query_norm.weight") for n in names):
        family = "gemma3"
    elif any(n.endswith("pre_feedforward_layernorm.weight") for n in names):
        family = "gemma2"
    else:
        family = "gemma"

    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise CheckpointError(f"{source}: missing tensor {name}")
        return tuple(shapes[name])

    embedding = next((n for n in EMBEDDINGS if n in shapes), EMBEDDINGS[0])
    vocab_rows, d_model = shape(embedding)
    layers = {int(m.group(1)) for n in names if (m := _LAYER_NAME.fullmatch(n))}
    n_layers = max(layers) + 1 if layers else 0
    ffn_dim = shape("model.layers.0.mlp.gate_proj.weight")[0]
    q_width = shape("model.layers.0.self_attn.o_proj.weight")[1]  # n_heads * head_dim
    kv_width = (shape("model.layers.0.self_attn.qkv_proj.weight")[0] - q_width) // 2
    head_dim = shape("model.layers.0.self_attn.query_norm.weight")[0] if family == "gemma3" else None

    def fits(c: GemmaConfig) -> bool:
        return (c.family == family and c.d_model == d_model and c.n_layers == n_layers and c.ffn_dim == ffn_dim
                and c.n_heads * c.head_dim == q_width and c.n_kv_heads * c.head_dim == kv_width
                and head_dim in (None, c.head_dim) and c.vocab_size <= vocab_rows)

    matches = [name for name, c in PRESETS.items() if fits(c)]
    found = (f"{family}, d_model {d_model}, {n_layers} layers, ffn {ffn_dim}, q/kv widths {q_width}/{kv_width}, "
             f"{vocab_rows} embedding rows")
    if not matches:
        raise ConfigError(f"{source}: no preset fits its shapes ({found}); pass variant= (a preset name or a GemmaConfig)")
    # Presets that are one model under several names (gemma-2b, gemma-1.1-2b, codegemma-2b) are no ambiguity.
    if len({PRESETS[m] for m in matches}) > 1:
        raise ConfigError(f"{source}: several presets fit its shapes ({', '.join(matches)}); pass variant= to choose")
    return PRESETS[matches[0]]


def _config(variant, shapes: dict[str, tuple[int, ...]], source: str) -> GemmaConfig:
    if variant is None:
        return infer_config(shapes, source)
    if isinstance(variant, GemmaConfig):
        return variant
    if isinstance(variant, str):
        return preset(variant)
    raise ConfigError(f"variant must be a preset name or a GemmaConfig, got {type(variant).__name__}")


def _rename(raw: dict[str, torch.Tensor], config: GemmaConfig, source: str) -> dict[str, TensorRef]:
    """gemmakit's names for the official tensors; qkv_proj becomes three lazy row slices."""
    table = dict(_LAYER_POST_NORMS if config.post_norms else _LAYER_GEMMA1)
    if config.qk_norm:
        table.update(_QK_NORM)
    q_rows = config.n_heads * config.head_dim
    kv_rows = config.n_kv_heads * config.head_dim
    tensors: dict[str, TensorRef] = {}
    for name in raw:
        if name.endswith(".weight_scaler"):
            continue  # read together with its int8 weight
        if name in EMBEDDINGS:
            tensors["embed.weight"] = _ref(raw, name)
        elif name == "model.norm.weight":
            tensors["norm.weight"] = _ref(raw, name)
        elif (m := _LAYER_NAME.fullmatch(name)) and m.group(2) == "self_attn.qkv_proj":
            rows = raw[name].shape[0]
            if rows != q_rows + 2 * kv_rows:
                raise CheckpointError(f"{source}: tensor {name} has {rows} rows, expected {q_rows + 2 * kv_rows} "
                                      f"({config.n_heads} query and 2 x {config.n_kv_heads} key/value heads of {config.head_dim})")
            layer = f"layers.{m.group(1)}.attn"
            tensors[f"{layer}.q_proj.weight"] = _ref(raw, name, 0, q_rows)
            tensors[f"{layer}.k_proj.weight"] = _ref(raw, name, q_rows, q_rows + kv_rows)
            tensors[f"{layer}.v_proj.weight"] = _ref(raw, name, q_rows + kv_rows, rows)
        elif m and m.group(2) in table:
            tensors[f"layers.{m.group(1)}.{table[m.group(2)]}.weight"] = _ref(raw, name)
        else:
            raise CheckpointError(f"{source}: unexpected tensor {name} for a {config.family} model")
    return tensors


def _ref(raw: dict[str, torch.Tensor], name: str, start: int | None = None, stop: int | None = None) -> TensorRef:
    """A lazy view of rows [start, stop) of one tensor, dequantized where the file is int8."""
    tensor = raw[name]
    scaler = raw.get(name.removesuffix(".weight") + ".weight_scaler")
    rows = slice(start, stop)
    shape = (len(range(*rows.indices(tensor.shape[0]))), *tensor.shape[1:])

    def load() -> torch.Tensor:
        t = tensor[rows]  # a view of the (memory-mapped) tensor: nothing is copied yet
        if scaler is not None:
            # gemma_pytorch's quantized checkpoints: int8 weights with one float scale per row.
            t = t.float() * scaler[rows].float().unsqueeze(-1)
        return t

    return TensorRef(shape=shape, load=load)


def _weight_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files to open, and the index's weight_map where there is one."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        indexes = sorted(path.glob("*.index.json"))
        weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
        ckpts = [p for p in weights if p.suffix == ".ckpt"]
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: several index files ({', '.join(p.name for p in indexes)}); pass one of them")
        if indexes:
            path = indexes[0]
        elif len(ckpts) == 1 or len(weights) == 1:
            return [(ckpts or weights)[0]], None
        elif weights:
            raise CheckpointError(f"{path}: several weight files ({', '.join(p.name for p in weights)}) and no index; pass one of them")
        else:
            raise CheckpointError(f"{path}: no .ckpt, .bin or index json in this folder")
    if not path.name.endswith(".json"):
        return [path], None
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid index json ({type(e).__name__}: {e})") from None
    except RecursionError:  # Python's JSON parser recurses once per level of nesting
        raise CheckpointError(f"{path}: not a valid index json (nested too deeply)") from None
    files = [path.parent / f for f in sorted(set(weight_map.values()))]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{path}: shard {f.name} is missing")
    return files, weight_map


def _load(file: Path) -> dict[str, torch.Tensor]:
    """The state dict in one file, tensors memory-mapped; never unpickles anything but weights."""
    try:
        # mmap needs torch's zip format; older (legacy) files are read whole.
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler refused something: a class or function (which a full
        # unpickle would import and run) or bytes that are no pickle at all.
        refused = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        if refused:
            raise CheckpointError(f"{file}: holds objects other than tensors ({refused.group(1)}); gemmakit loads "
                                  "weights only and never unpickles arbitrary code") from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*$", str(e), re.MULTILINE | re.DOTALL)
        detail = reason.group(1).splitlines()[0] if reason else type(e).__name__
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({detail})") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ... on truncated or foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({first[:200]})") from None
    state = obj.get("model_state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{file}: expected a dict of tensors (or one under 'model_state_dict')")
    return state
