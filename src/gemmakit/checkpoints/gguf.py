"""llama.cpp's GGUF files: the config from the metadata, the tensors dequantized lazily one at a time,
and the SentencePiece tokenizer rebuilt from the vocabulary stored in the metadata.

Conventions follow llama.cpp (`convert_hf_to_gguf.py` writes, `llama-model.cpp` reads):
- norm weights are stored as `1 + w` (every `*norm.weight`, QK-norms included); we subtract 1;
- Q and K are stored as in Hugging Face, not permuted (the converter permutes them for Llama only);
- dimensions are listed innermost first, so a torch shape is the GGUF shape reversed;
- Gemma 2 layers alternate sliding and global (sliding first), Gemma 3 has five sliding layers per
  global one, sliding Gemma 3 layers use RoPE base 10,000 and only global layers read
  `rope.freq_base` and the linear `rope.scaling.factor`;
- the attention scale is head_dim ** -0.5, except for the 27B models, which llama.cpp tells by their
  layer count (Gemma 2: 46, Gemma 3: 62) and scales by (d_model / n_heads) ** -0.5.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import torch

from ..config import GemmaConfig
from ..errors import CheckpointError, ConfigError, TokenizerError
from ..tokenizer import Tokenizer
from . import metadata
from .checkpoint import Checkpoint, TensorRef, check_layer_count

ARCHITECTURES = ("gemma", "gemma2", "gemma3")

# Per-layer GGUF names -> ours (`blk.{i}.attn_q.weight` -> `layers.{i}.attn.q_proj.weight`).
LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm",
    "post_attention_norm": "post_attn_norm",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_mlp_norm",
}
TOP_NAMES = {"token_embd": "embed", "output_norm": "norm"}

# The 27B models, the only ones whose query scale is not head_dim (llama.cpp tells them by depth).
_LAYERS_OF_27B = {"gemma2": 46, "gemma3": 62}
_SLIDING_PATTERN = {"gemma2": 2, "gemma3": 6}  # layer i is global when (i + 1) % pattern == 0
# GemmaConfig's fields -> the metadata (after "{arch}.") each is read from, for error messages.
_METADATA_OF = {
    "vocab_size": "the rows of token_embd.weight", "d_model": "embedding_length", "n_layers": "block_count",
    "n_heads": "attention.head_count", "n_kv_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
    "ffn_dim": "feed_forward_length", "max_seq_len": "context_length",
    "norm_eps": "attention.layer_norm_rms_epsilon", "rope_theta_global": "rope.freq_base",
    "rope_scale_global": "rope.scaling.factor", "query_pre_attn_scalar": "attention.key_length",
    "attn_logit_softcap": "attn_logit_softcapping", "final_logit_softcap": "final_logit_softcapping",
    "sliding_window": "attention.sliding_window",
}
_DEQUANTIZE_CHUNK = 1 << 20  # elements per gguf.quants call: bounds the temporaries to ~10 MB


def read(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    reader = _open(path)
    meta = _Metadata(reader, path)
    arch = meta.get("general.architecture", str)
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{path}: architecture {arch!r} is not a Gemma text model ({', '.join(ARCHITECTURES)})")

    _check_layout(reader, path)
    tensors: dict[str, TensorRef] = {}
    release = _page_releaser(reader)
    for t in reader.tensors:
        name = our_name(t.name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists the innermost dim first
        if not shape or min(shape) <= 0:
            raise CheckpointError(f"{path}: tensor {t.name} has shape {list(shape)}")
        if name in tensors:  # blk.01 and blk.1, say
            raise CheckpointError(f"{path}: tensor {t.name} is a second copy of {name}")
        _check_supported(t, path)
        tensors[name] = TensorRef(shape, partial(_load, t, shape, 1.0 if name.endswith("norm.weight") else 0.0, release))
    if "embed.weight" not in tensors:
        raise CheckpointError(f"{path}: missing tensor token_embd.weight")
    try:
        config = _config(meta, arch, vocab_size=tensors["embed.weight"].shape[0])
    except ConfigError as e:
        message = str(e)
        if not message.startswith(str(path)):
            key = _METADATA_OF.get(getattr(e, "field", None))
            where = "" if key is None else f" (from {key})" if " " in key else f" (metadata {arch}.{key})"
            message = f"{path}: {message}{where}"
        raise ConfigError(message) from None
    check_layer_count(path, config, tensors, f"{arch}.block_count")
    return Checkpoint(source=str(path), config=config, tensors=tensors, tokenizer=_tokenizer(meta, path),
                      metadata=metadata.from_gguf(meta, path))


FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)


def stores_quantized(path: str | os.PathLike) -> bool:
    """Whether any of the file's tensors is in a quantized block type (Q4_K, Q8_0, ...)."""
    return any(t.tensor_type not in FLOAT_TYPES for t in _open(Path(path)).tensors)


def our_name(gguf_name: str) -> str:
    """`blk.3.ffn_up.weight` -> `layers.3.mlp.up_proj.weight`; names we do not know pass unchanged
    (so that `build` reports them as unexpected tensors)."""
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{parts[1]}"
    return gguf_name


# -- the file ------------------------------------------------------------------------------------
class _Truncated(Exception):
    pass


class _Reader(gguf.GGUFReader):
    """gguf.GGUFReader with every read checked against the file's length, and arrays read whole.

    The stock reader slices its memmap without bounds checks (a count past the end yields empty
    arrays, and an array of numbers then loops without end) and builds one numpy memmap view per
    array element, which takes ~30 s and ~0.5 GB for a 262,144-token vocabulary.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:  # a plain ndarray over the same mapping: memmap slicing costs ~10x more
            plain = self._plain = self.data.view(np.ndarray)
        dtype, count = np.dtype(dtype), int(count)
        end = offset + dtype.itemsize * count
        if count < 0 or end > plain.shape[0]:
            raise _Truncated(f"needs bytes up to {end:,} but the file has {plain.shape[0]:,}")
        arr = plain[offset:end].view(dtype)
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type != gguf.GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        itype = self._get(orig_offs, np.uint32)
        count = self._get(orig_offs + 4, np.uint64)
        item = gguf.GGUFValueType(int(itype[0]))
        types = [gguf.GGUFValueType.ARRAY, item]
        offs = orig_offs + 12
        if (numbers := self.gguf_scalar_to_np.get(item)) is not None:
            values = self._get(offs, numbers, count[0])  # one part for the whole array
            return 12 + values.nbytes, [itype, count, values], [2], types
        if item != gguf.GGUFValueType.STRING:
            return super()._get_field_parts(orig_offs, raw_type)
        n, size, plain = int(count[0]), self._plain.shape[0], self._plain
        if n * 8 > size - offs:
            raise _Truncated(f"an array of {n:,} strings cannot fit in the {size:,}-byte file")
        length = struct.Struct("<Q" if (self.byte_order == "I") == (sys.byteorder == "little") else ">Q")
        parts = [itype, count]
        for _ in range(n):
            (k,) = length.unpack_from(plain, offs)
            if offs + 8 + k > size:
                raise _Truncated(f"a string needs bytes up to {offs + 8 + k:,} but the file has {size:,}")
            parts.append(plain[offs + 8: offs + 8 + k])
            offs += 8 + k
        return offs - orig_offs, parts, list(range(2, len(parts))), types


def _open(path: Path):
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')")
    if len(head) < 24:
        raise CheckpointError(f"{path}: truncated GGUF file ({size} bytes, shorter than the header)")
    order = "<" if int.from_bytes(head[4:8], "little") & 0xFFFF else ">"  # big-endian files exist
    version, n_tensors, n_kv = struct.unpack(order + "IQQ", head[4:24])
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    # Each metadata entry takes at least 12 bytes and each tensor entry 24: counts beyond what the
    # file can hold mean a corrupt header, and parsing it would only read garbage.
    if 24 + 12 * n_kv + 24 * n_tensors > size:
        raise CheckpointError(f"{path}: corrupt or truncated GGUF header: it lists {n_tensors:,} tensors and "
                              f"{n_kv:,} metadata entries, more than a {size:,}-byte file can hold")
    try:
        return _Reader(path)
    except _Truncated as e:
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({e})") from None
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, struct.error,
            MemoryError) as e:
        raise CheckpointError(f"{path}: corrupt GGUF file ({type(e).__name__}: {e})") from None


def _check_layout(reader, path: Path) -> None:
    """Each tensor's offset as the format and llama.cpp require: a multiple of the alignment, no two
    tensors sharing bytes (bytes past the end are refused as the file is read). The stock reader adds
    offsets with wrap-around, so a forged offset could land on another tensor and load as wrong
    weights without a word."""
    spans = []
    for t in reader.tensors:
        offset = int(t.field.parts[-1][0])  # as stored, relative to the data section
        if offset % reader.alignment:
            raise CheckpointError(f"{path}: tensor {t.name} starts at offset {offset:,}, not a multiple of the "
                                  f"alignment {reader.alignment}")
        spans.append((offset, offset + t.n_bytes, t.name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"{path}: tensors {first} and {second} overlap in the file")


def _check_supported(t, path: Path) -> None:
    try:  # one row, so that an unsupported type fails at read time, not halfway through a build
        gguf.quants.dequantize(t.data.reshape(-1, t.data.shape[-1])[:1], t.tensor_type)
    except (NotImplementedError, ValueError) as e:
        raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gemmakit cannot "
                              f"dequantize ({e})") from None


def _load(t, shape: tuple[int, ...], shift: float, release) -> torch.Tensor:
    """The tensor in float32, dequantized a few rows at a time straight into its final buffer, so that
    the 262k x 640 embedding costs its own size and not three times that in temporaries."""
    out = torch.empty(shape, dtype=torch.float32)
    rows_out = out.view(-1, shape[-1]).numpy()
    rows_in = t.data.reshape(-1, t.data.shape[-1])  # quantized rows are bytes: (rows, bytes per row)
    step = max(1, _DEQUANTIZE_CHUNK // shape[-1])
    for start in range(0, rows_in.shape[0], step):
        rows_out[start: start + step] = gguf.quants.dequantize(rows_in[start: start + step], t.tensor_type)
    if shift:
        out -= shift  # llama.cpp stores norm weights as 1 + w
    release()
    return out


def _page_releaser(reader):
    """A function that drops the mapped file's pages from this process's memory after each tensor.

    The pages stay in the OS cache, but every page read (and the pages the kernel maps around it)
    counts in the process's resident size until released: without this a loaded model is charged its
    weights plus most of the file. The whole mapping is released, not just the tensor's range, to catch
    those neighbours too; a page needed again is mapped again from the cache."""
    mapping = getattr(reader.data, "_mmap", None)  # numpy keeps the mmap.mmap of a memmap here
    if mapping is None or not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return lambda: None

    def release() -> None:
        try:
            mapping.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # an advice refused costs memory, never correctness
            pass

    return release


# -- metadata ------------------------------------------------------------------------------------
_MISSING = object()


class _Metadata:
    def __init__(self, reader, path: Path):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, kind: type, default=_MISSING):
        """A scalar of `kind` (int, float, str or bool); ConfigError if it is missing or of another type."""
        T = gguf.GGUFValueType
        kinds = {int: (T.UINT8, T.INT8, T.UINT16, T.INT16, T.UINT32, T.INT32, T.UINT64, T.INT64),
                 float: (T.FLOAT32, T.FLOAT64, T.UINT32, T.INT32, T.UINT64, T.INT64), str: (T.STRING,),
                 bool: (T.BOOL,)}
        field = self.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise ConfigError(f"{self.path}: metadata {key} is missing")
            return default
        if len(field.types) != 1 or field.types[0] not in kinds[kind]:
            raise ConfigError(f"{self.path}: metadata {key} should be {kind.__name__}, "
                              f"found {'/'.join(t.name for t in field.types)}")
        try:
            value = field.contents()
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: metadata {key} is not valid UTF-8") from None
        if field.types[0] == T.FLOAT32:
            value = float(str(np.float32(value)))  # the decimal that was written: 1e-06, not 9.99999997e-07
        return kind(value)

    def array(self, key: str) -> np.ndarray | list[str] | None:
        """A numeric array as numpy, a string array as a list of str; None when missing."""
        field = self.fields.get(key)
        if field is None:
            return None
        if field.types[0] != gguf.GGUFValueType.ARRAY or len(field.types) != 2:
            raise TokenizerError(f"{self.path}: metadata {key} should be an array")
        parts = [field.parts[i] for i in field.data]
        if field.types[1] == gguf.GGUFValueType.STRING:
            try:
                return [bytes(p).decode("utf-8") for p in parts]
            except UnicodeDecodeError:
                raise TokenizerError(f"{self.path}: metadata {key} holds a string that is not valid UTF-8") from None
        return np.concatenate(parts) if parts else np.zeros(0)


def _config(meta: _Metadata, arch: str, vocab_size: int) -> GemmaConfig:
    p = arch + "."
    d_model = meta.get(p + "embedding_length", int)
    n_layers = meta.get(p + "block_count", int)
    n_heads = meta.get(p + "attention.head_count", int)
    head_dim = meta.get(p + "attention.key_length", int, d_model // max(n_heads, 1))
    rope_base = meta.get(p + "rope.freq_base", float, 10_000.0)
    rope_scale = meta.get(p + "rope.scaling.factor", float, 1.0) or 1.0
    scaling = meta.get(p + "rope.scaling.type", str, "linear")
    if rope_scale != 1.0 and (scaling != "linear" or arch == "gemma2"):
        raise ConfigError(f"{meta.path}: RoPE scaling {scaling!r} x{rope_scale} on {arch} is not supported "
                          "(only linear scaling of Gemma 3's global layers)")
    fields = dict(
        family=arch, vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=meta.get(p + "attention.head_count_kv", int, n_heads), head_dim=head_dim,
        ffn_dim=meta.get(p + "feed_forward_length", int), max_seq_len=meta.get(p + "context_length", int),
        norm_eps=meta.get(p + "attention.layer_norm_rms_epsilon", float), rope_theta=rope_base,
        rope_scale_global=rope_scale)
    if arch == "gemma2":
        fields.update(post_norms=True, global_every=_SLIDING_PATTERN[arch],
                      sliding_window=meta.get(p + "attention.sliding_window", int, 4096) or None,
                      attn_logit_softcap=meta.get(p + "attn_logit_softcapping", float, 50.0) or None,
                      final_logit_softcap=meta.get(p + "final_logit_softcapping", float, 30.0) or None)
    elif arch == "gemma3":
        window = meta.get(p + "attention.sliding_window", int, 0) or None
        fields.update(post_norms=True, qk_norm=True, sliding_window=window,
                      global_every=_SLIDING_PATTERN[arch] if window else 1,
                      final_logit_softcap=meta.get(p + "final_logit_softcapping", float, 0.0) or None,
                      # rope.freq_base is the global layers' base; sliding layers keep 10,000
                      rope_theta=meta.get(p + "rope.freq_base_swa", float, 10_000.0), rope_theta_global=rope_base)
    if arch in _LAYERS_OF_27B:
        big = n_layers == _LAYERS_OF_27B[arch] and n_heads > 0 and d_model % n_heads == 0
        fields["query_pre_attn_scalar"] = d_model // n_heads if big else head_dim
    config = GemmaConfig(**fields)  # validates, and raises ConfigError on nonsense values
    if meta.get(p + "attention.value_length", int, head_dim) != head_dim:  # llama.cpp sizes V by it
        raise ConfigError(f"{meta.path}: metadata {p}attention.value_length "
                          f"{meta.get(p + 'attention.value_length', int)} differs from key_length {head_dim}")
    return config


# -- tokenizer -----------------------------------------------------------------------------------
def _tokenizer(meta: _Metadata, path: Path) -> Tokenizer | None:
    """A SentencePiece model rebuilt from the vocabulary, with Gemma's settings: BPE, byte fallback,
    identity normalisation, whitespace kept, no dummy prefix."""
    tokens = meta.array("tokenizer.ggml.tokens")
    if tokens is None:
        return None
    model = meta.get("tokenizer.ggml.model", str, "llama")
    if model != "llama":
        raise TokenizerError(f"{path}: tokenizer.ggml.model is {model!r}; gemmakit rebuilds only SentencePiece "
                             "('llama') vocabularies: pass a tokenizer file instead")
    n = len(tokens)
    scores = meta.array("tokenizer.ggml.scores")
    types = meta.array("tokenizer.ggml.token_type")
    scores = np.zeros(n, np.float32) if scores is None else scores
    types = np.ones(n, np.int64) if types is None else types
    for key, values in (("scores", scores), ("token_type", types)):
        if not isinstance(values, np.ndarray):  # an array of strings comes back as a list
            raise TokenizerError(f"{path}: metadata tokenizer.ggml.{key} should hold numbers, not strings")
    if len(scores) != n or len(types) != n:
        raise TokenizerError(f"{path}: {n} tokens but {len(scores)} scores and {len(types)} token types")

    from sentencepiece import sentencepiece_model_pb2 as pb

    piece_type = pb.ModelProto.SentencePiece.Type
    # llama.cpp numbers token types as SentencePiece does (0 is "undefined": a normal piece).
    kinds = {0: piece_type.NORMAL, 1: piece_type.NORMAL, 2: piece_type.UNKNOWN, 3: piece_type.CONTROL,
             4: piece_type.USER_DEFINED, 5: piece_type.UNUSED, 6: piece_type.BYTE}
    ids = {}
    for role, default in (("bos", "<bos>"), ("eos", "<eos>"), ("unknown", "<unk>"), ("padding", "<pad>")):
        i = meta.get(f"tokenizer.ggml.{role}_token_id", int, tokens.index(default) if default in tokens else -1)
        if not -1 <= i < n:
            raise TokenizerError(f"{path}: tokenizer.ggml.{role}_token_id {i} is outside the {n}-token vocabulary")
        ids[role] = i
    if ids["unknown"] < 0:
        raise TokenizerError(f"{path}: the vocabulary has no unknown token")

    proto = pb.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens, scores.tolist(), types.tolist())):
        if kind not in kinds:
            raise TokenizerError(f"{path}: token {i} ({piece!r}) has token type {kind}, not one of 0-6")
        # SentencePiece wants exactly one UNKNOWN piece; converters often mark <unk> as control.
        kind = piece_type.UNKNOWN if i == ids["unknown"] else (
            piece_type.CONTROL if kinds[kind] == piece_type.UNKNOWN else kinds[kind])
        if kind == piece_type.USER_DEFINED:
            # llama.cpp's converter writes user-defined pieces with "▁" turned back into spaces (it
            # matches them in raw text); SentencePiece matches them after escaping spaces, so a
            # whitespace run such as Gemma's 4-space indent would otherwise never be one token.
            piece = piece.replace(" ", "▁")
        proto.pieces.add(piece=piece, score=score, type=kind)
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = n
    spec.byte_fallback = bool((types == 6).any())
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    spec.unk_id, spec.unk_piece = ids["unknown"], tokens[ids["unknown"]]
    spec.bos_id, spec.eos_id, spec.pad_id = ids["bos"], ids["eos"], ids["padding"]
    for role, field in (("bos", "bos_piece"), ("eos", "eos_piece"), ("padding", "pad_piece")):
        if ids[role] >= 0:
            setattr(spec, field, tokens[ids[role]])
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = meta.get("tokenizer.ggml.add_space_prefix", bool, False)
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return Tokenizer.from_sentencepiece(proto.SerializeToString(), family=meta.get("general.architecture", str),
                                        name=str(path))
