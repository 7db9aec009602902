"""Hugging Face folders: config.json, model.safetensors (or shards + index) and the tokenizer.

The HF layout is described once and used in both directions: `tensor_names` (our parameter names
-> HF names) and `config_from_hf` / `hf_config` (HF config fields <-> GemmaConfig, the writer checks
that the reader gives its config back).

A folder may also be transformers' `*ForSequenceClassification` (a reward model): the same body
and config with a `score.weight` head of `num_labels` rows, which `read` leaves out (the Gemma
module has no place for it) and `save(score=...)` writes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import INT_LIMITS, GemmaConfig, LayerKind, is_int, is_number, short_repr
from ..errors import CheckpointError, ConfigError, TokenizerError
from ..paths import atomic_path
from ..tokenizer import Tokenizer
from . import metadata
from .checkpoint import Checkpoint, TensorRef, check_layer_count

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # in order of preference

# model_type -> (our family, the transformers class). "gemma3" (multimodal) wraps a gemma3_text.
MODEL_TYPES = {
    "gemma": ("gemma", "GemmaForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3_text": ("gemma3", "Gemma3ForCausalLM"),
}
MULTIMODAL = "gemma3"
# model_type -> transformers' sequence classifier on that body (AutoModelForSequenceClassification's
# choice for the model_type): the last non-pad token's final-norm output through `score`, no bias.
CLASSIFIERS = {"gemma": "GemmaForSequenceClassification", "gemma2": "Gemma2ForSequenceClassification",
               "gemma3_text": "Gemma3TextForSequenceClassification"}
SCORE = "score.weight"  # the classifier's head, outside the `model.` prefix

# The defaults of transformers' config classes: Hub configs (the multimodal text_config above all)
# leave out every field that has its default.
_COMMON = dict(head_dim=256, rms_norm_eps=1e-6, max_position_embeddings=8192, vocab_size=256_000)
DEFAULTS = {
    "gemma": dict(_COMMON, hidden_size=3072, intermediate_size=24_576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16),
    "gemma2": dict(_COMMON, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, query_pre_attn_scalar=256,
                   sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(_COMMON, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, query_pre_attn_scalar=256,
                        sliding_window=4096, final_logit_softcapping=None, attn_logit_softcapping=None,
                        max_position_embeddings=131_072, vocab_size=262_208),
}
# Before `layer_types`, the pattern was one number: every n-th layer global (Gemma 2: 2, Gemma 3: 6).
_SLIDING_PATTERN = {"gemma2": 2, "gemma3_text": 6}
# GemmaConfig's fields -> the config.json field each is read from, for error messages.
HF_FIELDS = {
    "vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
    "ffn_dim": "intermediate_size", "max_seq_len": "max_position_embeddings", "norm_eps": "rms_norm_eps",
    "query_pre_attn_scalar": "query_pre_attn_scalar", "attn_logit_softcap": "attn_logit_softcapping",
    "final_logit_softcap": "final_logit_softcapping", "sliding_window": "sliding_window",
    "rope_theta": "rope_theta", "rope_theta_global": "rope_theta", "rope_scale_global": "rope_scaling factor",
}
# RoPE theta when a config does not give one: (sliding layers, global layers).
_THETA = {"gemma": (10_000.0, 10_000.0), "gemma2": (10_000.0, 10_000.0), "gemma3_text": (10_000.0, 1_000_000.0)}
SLIDING, FULL = "sliding_attention", "full_attention"

# Tensor names inside `model.layers.{i}.` (ours -> HF).
_LAYER = {
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
}
# HF's `post_attention_layernorm` is the norm before the MLP in Gemma 1 but the norm after
# attention in Gemma 2/3, which add their own pre/post feed-forward norms.
_NORMS_GEMMA1 = {"mlp_norm.weight": "post_attention_layernorm.weight"}
_NORMS_POST = {
    "post_attn_norm.weight": "post_attention_layernorm.weight",
    "mlp_norm.weight": "pre_feedforward_layernorm.weight",
    "post_mlp_norm.weight": "post_feedforward_layernorm.weight",
}
# Where the language model's tensors live: `model.` in the text models; in the multimodal
# Gemma3ForConditionalGeneration `language_model.model.` (the Hub's and transformers' saved layout)
# or `model.language_model.` (transformers' in-memory layout).
_TEXT_PREFIXES = ("model.",)
_MULTIMODAL_PREFIXES = ("model.language_model.", "language_model.model.")

# safetensors dtypes we read, with their sizes: checked against the file before the library sees it.
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # safetensors' names -> bytes per value
_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


def tensor_names(config: GemmaConfig) -> dict[str, str]:
    """Our parameter name -> the HF name without the `model.` prefix, for every tensor a model of
    `config`'s family may hold (q_norm/k_norm included: only Gemma 3 models have them)."""
    layer = {**_LAYER, **(_NORMS_POST if config.post_norms else _NORMS_GEMMA1)}
    names = {"embed.weight": "embed_tokens.weight", "norm.weight": "norm.weight"}
    for i in range(config.n_layers):
        names.update({f"layers.{i}.{ours}": f"layers.{i}.{hf}" for ours, hf in layer.items()})
    return names


# -- config ---------------------------------------------------------------------------------------
def config_from_hf(hf: dict, path: str | os.PathLike = CONFIG) -> GemmaConfig:
    """The GemmaConfig of a text config.json (model_type gemma, gemma2 or gemma3_text)."""
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        known = ", ".join([*MODEL_TYPES, MULTIMODAL])
        raise ConfigError(f"{path}: model_type {model_type!r} is not a Gemma gemmakit knows ({known})")
    family = MODEL_TYPES[model_type][0]
    c = {**DEFAULTS[model_type], **{k: v for k, v in hf.items() if k in DEFAULTS[model_type] or v is not None}}

    activation = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in ("gelu_pytorch_tanh", "gelu"):  # the first Gemma configs say gelu and mean tanh
        raise ConfigError(f"{path}: hidden_activation {activation!r} is not Gemma's (gelu_pytorch_tanh)")
    for flag in ("attention_bias", "use_bidirectional_attention"):
        if c.get(flag):
            raise ConfigError(f"{path}: {flag} true is not supported (Gemma has no biases and is causal)")
    if c.get("tie_word_embeddings", True) is not True:  # Gemma's output layer is its embedding
        raise ConfigError(f"{path}: tie_word_embeddings {short_repr(c['tie_word_embeddings'])} is not Gemma's (true)")

    n_layers = c["num_hidden_layers"]
    if not is_int(n_layers) or not 0 < n_layers <= INT_LIMITS["n_layers"]:  # before lists of that length
        raise ConfigError(f"{path}: num_hidden_layers must be a positive integer (at most "
                          f"{INT_LIMITS['n_layers']:,}), got {short_repr(n_layers)}")
    sliding_window, global_every = None, 1
    if family != "gemma" and c.get("sliding_window") is not None:
        types = c.get("layer_types")
        if types is None:
            pattern = c.get("sliding_window_pattern", c.get("_sliding_window_pattern", _SLIDING_PATTERN[model_type]))
            if not isinstance(pattern, int) or pattern <= 0:
                raise ConfigError(f"{path}: sliding_window_pattern must be a positive integer, got {pattern!r}")
            types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]
        global_every = _global_every(types, n_layers, path)
        sliding_window = c["sliding_window"] if global_every > 1 else None

    rope = _rope(c, model_type, path)
    theta, scale = rope[SLIDING]
    theta_global, scale_global = rope[FULL]
    if sliding_window is not None and scale != 1.0:
        raise ConfigError(f"{path}: RoPE scaling on sliding-window layers is not supported (factor {scale})")
    if family == "gemma3" or theta_global != theta:
        rope_theta_global = theta_global
    else:
        rope_theta_global = None
    try:
        return GemmaConfig(
            family=family, vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=n_layers,
            n_heads=c["num_attention_heads"], n_kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
            ffn_dim=c["intermediate_size"], max_seq_len=c["max_position_embeddings"], norm_eps=c["rms_norm_eps"],
            rope_theta=theta, rope_theta_global=rope_theta_global, rope_scale_global=scale_global,
            query_pre_attn_scalar=c.get("query_pre_attn_scalar"),
            attn_logit_softcap=c.get("attn_logit_softcapping"), final_logit_softcap=c.get("final_logit_softcapping"),
            sliding_window=sliding_window, global_every=global_every,
            post_norms=family != "gemma", qk_norm=family == "gemma3",
        )
    except ConfigError as e:
        field = HF_FIELDS.get(getattr(e, "field", None))
        raise ConfigError(f"{path}: {e}" + (f" (field {field})" if field else "")) from None


def _global_every(types, n_layers: int, path) -> int:
    """The n of "layer i is global when (i + 1) % n == 0" that gives exactly these layer types."""
    if not isinstance(types, list) or len(types) != n_layers or not all(t in (SLIDING, FULL) for t in types):
        raise ConfigError(f"{path}: layer_types must list {SLIDING} or {FULL} for each of the {n_layers} layers")
    for every in range(1, n_layers + 2):  # n_layers + 1: every layer sliding
        if all((t == FULL) == ((i + 1) % every == 0) for i, t in enumerate(types)):
            return every
    raise ConfigError(f"{path}: layer_types {types} is not a repeating pattern of sliding layers each "
                      "followed by one global layer, the only pattern gemmakit runs")


def _rope(c: dict, model_type: str, path) -> dict[str, tuple[float, float]]:
    """(theta, linear scale) for sliding and for global layers, from transformers 5's
    `rope_parameters` (one dict, or one per layer type) or the older rope_theta /
    rope_local_base_freq / rope_scaling fields."""
    local_default, global_default = _THETA[model_type]
    params = c.get("rope_parameters")
    if params is None:
        scaling = c.get("rope_scaling") or {}
        if not isinstance(scaling, dict):
            raise ConfigError(f"{path}: rope_scaling must be an object, got {short_repr(scaling)}")
        global_params = {"rope_theta": c.get("rope_theta", global_default), **scaling}
        local_params = {"rope_theta": c.get("rope_local_base_freq", local_default)}
        if model_type != "gemma3_text":  # one RoPE for every layer
            local_params = global_params
        params = {SLIDING: local_params, FULL: global_params}
    elif not isinstance(params, dict):
        raise ConfigError(f"{path}: rope_parameters must be an object")
    elif not (set(params) & {SLIDING, FULL}):
        params = {SLIDING: params, FULL: params}
    out = {}
    for kind, default in ((SLIDING, local_default), (FULL, global_default)):
        p = params.get(kind) or {}
        if not isinstance(p, dict):
            raise ConfigError(f"{path}: rope_parameters[{kind!r}] must be an object, got {short_repr(p)}")
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise ConfigError(f"{path}: rope_type {rope_type!r} is not supported (default or linear)")
        theta, factor = p.get("rope_theta", default), p.get("factor", 1.0) if rope_type == "linear" else 1.0
        for name, value in (("rope_theta", theta), ("factor", factor)):
            if not is_number(value):  # GemmaConfig checks the range; a string or a list stops here
                raise ConfigError(f"{path}: RoPE {name} must be a finite number, got {short_repr(value)}")
        out[kind] = (float(theta), float(factor))
    return out


def hf_config(config: GemmaConfig, dtype: torch.dtype = torch.float32, tokenizer: Tokenizer | None = None,
              num_labels: int | None = None) -> dict:
    """The config.json transformers expects for this model (with `num_labels`: for its sequence
    classifier); ConfigError if HF cannot express it."""
    c = config
    model_type = next(t for t, (family, _) in MODEL_TYPES.items() if family == c.family)
    dtype_name = str(dtype).removeprefix("torch.")
    out = {
        "architectures": [MODEL_TYPES[model_type][1] if num_labels is None else CLASSIFIERS[model_type]],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "hidden_act" if c.family == "gemma" else "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_id if tokenizer else 2,
        "eos_token_id": tokenizer.eos_id if tokenizer else 1,
        "pad_token_id": tokenizer.pad_id if tokenizer else 0,
        "dtype": dtype_name,  # transformers 5
        "torch_dtype": dtype_name,  # transformers 4 and other tools
    }
    global_rope = {"rope_type": "default", "rope_theta": c.global_theta}
    if c.rope_scale_global != 1.0:
        global_rope = {"rope_type": "linear", "rope_theta": c.global_theta, "factor": c.rope_scale_global}
    if c.family == "gemma":
        out["rope_parameters"] = global_rope
    else:
        out["query_pre_attn_scalar"] = c.query_pre_attn_scalar or c.head_dim
        out["attn_logit_softcapping"] = c.attn_logit_softcap
        out["final_logit_softcapping"] = c.final_logit_softcap
        out["sliding_window"] = c.sliding_window
        out["layer_types"] = [SLIDING if kind is LayerKind.SLIDING else FULL for kind in c.layer_kinds]
        if c.family == "gemma2":
            out["rope_parameters"] = global_rope
        else:
            out["rope_parameters"] = {SLIDING: {"rope_type": "default", "rope_theta": c.rope_theta}, FULL: global_rope}

    if num_labels is not None:
        # transformers counts the labels from id2label (2 without one), and the classifier scores
        # the last token that is not pad_token_id, set above: each row's own last token.
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    back = config_from_hf(out)
    if _normalised(back) != _normalised(config):
        field = next(f for f, v in _normalised(config).items() if _normalised(back)[f] != v)
        raise ConfigError(f"a {c.family} model with {field}={getattr(config, field)!r} cannot be written as a "
                          f"Hugging Face {model_type} config")
    return out


def _normalised(config: GemmaConfig) -> dict:
    """The fields that change what the model computes, with defaults spelled out."""
    d = config.to_dict()
    d.update(rope_theta_global=config.global_theta, query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim)
    if LayerKind.SLIDING not in config.layer_kinds:  # unused without sliding layers
        d.update(sliding_window=None, global_every=1, rope_theta=config.global_theta)
    return d


# -- reading --------------------------------------------------------------------------------------
def read(folder: str | os.PathLike) -> Checkpoint:
    """A Hugging Face folder as a Checkpoint; tensors are read lazily from mmapped safetensors."""
    folder = Path(folder)
    config_path = folder / CONFIG
    hf = _read_json(config_path)
    multimodal = hf.get("model_type") == MULTIMODAL
    prefixes = _MULTIMODAL_PREFIXES if multimodal else _TEXT_PREFIXES
    if multimodal:
        text = hf.get("text_config") or {}
        if not isinstance(text, dict):
            raise ConfigError(f"{config_path}: text_config must be an object")
        hf = {"model_type": "gemma3_text", **text}
    config = config_from_hf(hf, config_path)

    shapes, loaders = weights(folder)
    # Before the per-layer name table below is built for as many layers as the config claims.
    check_layer_count(folder, config, (n[len(p):] for n in shapes for p in prefixes if n.startswith(p)),
                      "num_hidden_layers")
    ours = {hf_name: name for name, hf_name in tensor_names(config).items()}
    tensors = {}
    for name, shape in shapes.items():
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is not None:
            rest = name[len(prefix):]
            tensors[ours.get(rest, name)] = TensorRef(shape, loaders[name])
        elif name.endswith("lm_head.weight") or name == SCORE or multimodal:
            # the output layer is tied to the embedding; a classifier's head and vision tensors are
            # not the language model's (train/reward.py reads the head)
            continue
        else:
            tensors[name] = TensorRef(shape, loaders[name])  # build() reports it as unexpected

    tokenizer = None
    tokenizer_path = next((folder / n for n in TOKENIZER_FILES if (folder / n).is_file()), None)
    if tokenizer_path is not None:
        tokenizer = Tokenizer.from_file(tokenizer_path, family=config.family)
        rows = tensors["embed.weight"].shape[0] if "embed.weight" in tensors else tokenizer.vocab_size
        if tokenizer.vocab_size > rows:
            raise TokenizerError(f"{tokenizer_path}: {tokenizer.vocab_size} tokens but the embedding "
                                 f"(embed_tokens) has {rows} rows")
    return Checkpoint(source=str(folder), config=config, tensors=tensors, tokenizer=tokenizer,
                      metadata=metadata.from_folder(folder))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:  # Python's parser recurses once per level of nesting
        raise CheckpointError(f"{path}: JSON nested too deeply to be a checkpoint file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def weights(folder: Path, dtypes: dict[str, int] = FLOAT_DTYPES) -> tuple[dict[str, tuple[int, ...]], dict]:
    """Shapes and loaders of every tensor in the folder's safetensors, by HF name."""
    if (folder / WEIGHTS).is_file():
        headers = {WEIGHTS: _header(folder / WEIGHTS, dtypes)}
        files = {name: WEIGHTS for name in headers[WEIGHTS]}
    elif (folder / INDEX).is_file():
        files = _index(folder / INDEX)
        headers = {file: _header(folder / file, dtypes) for file in sorted(set(files.values()))}
    else:
        raise CheckpointError(f"{folder}: no {WEIGHTS} or {INDEX} (gemmakit reads Hugging Face safetensors)")
    shapes, loaders = {}, {}
    for file, header in headers.items():
        path = folder / file
        try:
            from safetensors import safe_open

            handle = safe_open(path, framework="pt")
        except Exception as e:  # SafetensorError carries the library's reason
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        for name in (n for n, f in files.items() if f == file):
            if name not in header:
                raise CheckpointError(f"{path}: tensor {name} listed in {INDEX} is not in this shard")
            shapes[name] = header[name]
            loaders[name] = _loader(handle, name, path)
    return shapes, loaders


def _loader(handle, name: str, path: Path):
    def load() -> torch.Tensor:
        # The tensor stays backed by the file's private (copy-on-write) mapping: no copy is made
        # unless the dtype changes, so loading needs about one model's worth of memory.
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({e})") from None

    return load


def _index(path: Path) -> dict[str, str]:
    data = _read_json(path)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: no weight_map of tensor names to shard files")
    for file in set(weight_map.values()):
        if Path(file).name != file or file in (".", ".."):
            raise CheckpointError(f"{path}: shard {file!r} is not a file name in this folder")
        if not (path.parent / file).is_file():
            raise CheckpointError(f"{path}: shard {file} is missing")
    return weight_map


def _header(path: Path, dtypes: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, after checking that the header and every tensor's
    bytes lie inside the file: a truncated or forged file must fail here, before any reader maps
    or allocates what it claims."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > _MAX_HEADER:
            raise CheckpointError(f"{path}: safetensors header claims {n} bytes but the file has {size} (truncated or corrupted)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors header ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupted safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
    data_size = size - 8 - n
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        info = info if isinstance(info, dict) else {}
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: corrupted safetensors header entry for tensor {name}")
        if dtype not in dtypes:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}; gemmakit reads {', '.join(dtypes)}")
        begin, end = offsets
        if end > data_size:
            raise CheckpointError(f"{path}: tensor {name} claims bytes {begin}..{end} but the file holds "
                                  f"{data_size} bytes of data (truncated or corrupted)")
        if end - begin != math.prod(shape) * dtypes[dtype]:
            raise CheckpointError(f"{path}: tensor {name} has {end - begin} bytes, not the {math.prod(shape)} "
                                  f"{dtype} values of shape {shape}")
        shapes[name] = tuple(shape)
    return shapes


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


# -- writing --------------------------------------------------------------------------------------
def save(module, folder: str | os.PathLike, tokenizer: Tokenizer | None = None, progress: bool = True,
         max_shard_bytes: int = 5 * 2**30, meta: metadata.Metadata | None = None,
         score: torch.Tensor | None = None) -> Path:
    """Writes a model (a Gemma module) as a Hugging Face folder that transformers loads (config.json,
    model.safetensors or shards + index, the tokenizer; `LM.save` passes its own, and its chat template
    and generation defaults as `meta`). With `score` (num_labels, d_model), the folder is transformers'
    sequence classifier on the model (CLASSIFIERS) with that head. All or nothing (paths.atomic_path).
    Never overwrites a non-empty folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    _check_target(folder)
    if score is not None and (score.dim() != 2 or score.shape[1] != module.config.d_model):
        raise CheckpointError(f"{folder}: a classifier head must be (num_labels, {module.config.d_model}), "
                              f"got {list(score.shape)}")
    config = hf_config(module.config, module.dtype, tokenizer, num_labels=None if score is None else score.shape[0])
    meta = meta or metadata.Metadata()
    names = tensor_names(module.config)
    state = {}
    for name, t in module.state_dict().items():
        if name not in names:
            raise CheckpointError(f"{folder}: the model's tensor {name} has no Hugging Face name "
                                  "(quantized models cannot be written; save the float model)")
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger tensor (a sliced, padded embedding): safetensors wants its own
        state["model." + names[name]] = t
    if score is not None:
        state[SCORE] = score.detach().to("cpu", module.dtype).contiguous()
    shards = _shards(state, max_shard_bytes)

    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for file, tensors in tqdm(shards.items(), desc=f"writing {folder.name}", unit="shard",
                                  disable=not progress, leave=False):
            save_file(tensors, tmp / file, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": {name: file for file, tensors in shards.items() for name in tensors}}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp, chat_template=metadata.template_value(meta))
        metadata.save(meta, tmp)
        _check_target(folder)  # again: something may have appeared while we wrote
    return folder


def _check_target(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise CheckpointError(f"{folder}: already exists and is not an empty folder; gemmakit will not overwrite it")


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors grouped into files of at most max_bytes (a bigger tensor gets a file of its own),
    named as transformers names them."""
    groups, size = [{}], 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += n
    if len(groups) == 1:
        return {WEIGHTS: groups[0]}
    return {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)}
