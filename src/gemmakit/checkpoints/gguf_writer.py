"""Writes a model as a GGUF file in llama.cpp's layout, the inverse of gguf.py.

What llama.cpp's `convert_hf_to_gguf.py` writes for `gemma`, `gemma2` and `gemma3`, and reads in
`src/models/gemma*.cpp`:
- tensor names from gguf.py's table, shapes innermost first, norm weights stored as `1 + w`;
- norms and other 1-D tensors always F32; matrices in the file type's own (Q8_0 falls back to F16
  for rows that are not a multiple of its 32-value block, as the converter does);
- every hyperparameter llama.cpp reads for these architectures; what it cannot express (a query
  scale other than its rule, a sliding pattern or soft-cap the architecture does not have) is
  refused, never written in a way llama.cpp would run differently;
- the SentencePiece vocabulary as `tokenizer.ggml.*` (model "llama"), the special ids and the chat
  template.

`q4_k_m` is llama.cpp's own mixture (Q4_K with Q6_K for half the V and FFN-down matrices, and its
fallbacks for rows that are no multiple of 256), made by llama.cpp's quantizer: gguf 0.19 cannot
quantize K-quants, so a float32 GGUF is written first and handed to `llama_model_quantize`
(llama-cpp-python, an optional dependency: `pip install 'gemmakit[llamacpp]'`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from ..chat_template import ChatTemplate
from ..config import GemmaConfig
from ..errors import CheckpointError, ConfigError, TokenizerError
from ..paths import atomic_path
from ..tokenizer import CHAT_TEMPLATE, Tokenizer
from .gguf import _LAYERS_OF_27B, _SLIDING_PATTERN, LAYER_NAMES, TOP_NAMES

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
# --type -> (the tensor type of matrices, the file type llama.cpp records)
TYPES = {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
         "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_k_m": (None, F.MOSTLY_Q4_K_M)}
_GGUF_NAME = {**{ours: theirs for theirs, ours in LAYER_NAMES.items()}, **{ours: theirs for theirs, ours in TOP_NAMES.items()}}
_UNUSED_PIECE = 5  # SentencePiece's and llama.cpp's token type of an unused id


def check_type(type: str) -> str:
    """The GGUF file type named by `type` (f32, f16, bf16, q8_0, q4_k_m); ConfigError otherwise."""
    if type not in TYPES:
        raise ConfigError(f"unknown GGUF type {type!r}; use one of {', '.join(TYPES)}")
    return type


def gguf_name(name: str) -> str:
    """`layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight` (gguf.our_name's inverse)."""
    parts = name.split(".")
    if parts[0] == "layers" and len(parts) >= 4:
        module, param = ".".join(parts[2:-1]), parts[-1]
        if module in _GGUF_NAME:
            return f"blk.{parts[1]}.{_GGUF_NAME[module]}.{param}"
    elif len(parts) == 2 and parts[0] in _GGUF_NAME:
        return f"{_GGUF_NAME[parts[0]]}.{parts[1]}"
    raise CheckpointError(f"the model's tensor {name} has no GGUF name "
                          "(quantized models cannot be written; save the float model)")


def save(module, path: str | os.PathLike, type: str = "f16", tokenizer: Tokenizer | None = None,
         chat_template: ChatTemplate | None = None,
         progress: bool = True) -> Path:
    """Writes a Gemma module and its tokenizer as one GGUF file that llama.cpp runs. All or nothing
    (written beside `path`, then renamed); never overwrites an existing file."""
    path = Path(path)
    matrix_type, file_type = TYPES[check_type(type)]
    config = module.config
    arch = _check_expressible(config)
    if tokenizer is None:
        raise TokenizerError(f"{path}: a GGUF file carries its tokenizer and this model has none: pass --tokenizer")
    check_target(path)
    state = module.state_dict()
    names = {ours: gguf_name(ours) for ours in state}  # unknown names fail before anything is written
    try:
        with atomic_path(path) as tmp:
            if matrix_type is None:  # q4_k_m: llama.cpp quantizes a float32 file of ours
                f32 = tmp.with_name(tmp.name + ".f32")
                try:
                    _write(f32, state, names, config, arch, tokenizer, chat_template, Q.F32, F.ALL_F32,
                           progress and path.name)
                    _llama_quantize(f32, tmp, file_type)
                finally:
                    f32.unlink(missing_ok=True)
            else:
                _write(tmp, state, names, config, arch, tokenizer, chat_template, matrix_type, file_type,
                       progress and path.name)
            check_target(path)  # again: something may have appeared while we wrote
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write the GGUF file ({e.strerror or e})") from None
    return path


def check_target(path: str | os.PathLike) -> None:
    """CheckpointError if `path` exists (never overwritten) or cannot be made (its folder is a file)."""
    path = Path(path)
    if path.exists():
        raise CheckpointError(f"{path}: already exists; gemmakit will not overwrite it")
    folder = next((p for p in path.parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise CheckpointError(f"{path}: cannot write there: {folder} is a file, not a folder")


def _check_expressible(c: GemmaConfig) -> str:
    """The architecture llama.cpp runs this config as; ConfigError naming the first field llama.cpp
    would read differently."""
    arch = c.family

    def refuse(field: str, value, why: str):
        raise ConfigError(f"{arch} in llama.cpp {why}: {field} {value!r} cannot be written to GGUF")

    expected = {"gemma": (False, False), "gemma2": (True, False), "gemma3": (True, True)}[arch]
    if (c.post_norms, c.qk_norm) != expected:
        refuse("post_norms/qk_norm", (c.post_norms, c.qk_norm), f"has post_norms={expected[0]} and qk_norm={expected[1]}")
    big = arch in _LAYERS_OF_27B and c.n_layers == _LAYERS_OF_27B[arch]
    scalar = c.d_model // c.n_heads if big else c.head_dim  # llama.cpp's query scale rule
    if (c.query_pre_attn_scalar or c.head_dim) != scalar:
        refuse("query_pre_attn_scalar", c.query_pre_attn_scalar,
               f"scales queries by {scalar:g} ** -0.5 for a model of {c.n_layers} layers")
    if arch != "gemma3" and c.global_theta != c.rope_theta:
        refuse("rope_theta_global", c.rope_theta_global, "has one RoPE base for every layer")
    if arch == "gemma":
        for field in ("sliding_window", "attn_logit_softcap", "final_logit_softcap"):
            if getattr(c, field) is not None:
                refuse(field, getattr(c, field), "has no sliding window and no soft-caps")
    if arch == "gemma2":
        for field in ("attn_logit_softcap", "final_logit_softcap", "sliding_window"):
            if getattr(c, field) is None:
                refuse(field, None, "always applies the sliding window and both soft-caps")
    if arch != "gemma" and c.sliding_window is not None and c.global_every != _SLIDING_PATTERN[arch]:
        refuse("global_every", c.global_every, f"makes every {_SLIDING_PATTERN[arch]}th layer global")
    if arch == "gemma3" and c.attn_logit_softcap is not None:
        refuse("attn_logit_softcap", c.attn_logit_softcap, "has no attention soft-cap")
    if c.rope_scale_global != 1.0 and arch != "gemma3":
        refuse("rope_scale_global", c.rope_scale_global, "scales RoPE only on Gemma 3's global layers")
    return arch


def _metadata(w: gguf.GGUFWriter, c: GemmaConfig, arch: str, file_type) -> None:
    w.add_type(gguf.GGUFType.MODEL)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.global_theta)  # every layer of Gemma 1, the global ones of 2 and 3
    if c.sliding_window is not None:
        w.add_sliding_window(c.sliding_window)
        if arch == "gemma3":  # its sliding layers' base (llama.cpp's default is 10,000 too)
            w.add_float32(f"{arch}.rope.freq_base_swa", c.rope_theta)  # a key older gguf packages lack
    if c.rope_scale_global != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_scale_global)
    if c.attn_logit_softcap is not None:
        w.add_attn_logit_softcapping(c.attn_logit_softcap)
    if c.final_logit_softcap is not None:
        w.add_final_logit_softcapping(c.final_logit_softcap)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _vocabulary(w: gguf.GGUFWriter, tokenizer: Tokenizer, chat_template: ChatTemplate | None, vocab_size: int,
                path: Path) -> None:
    """The SentencePiece model as llama.cpp's converter writes it (`_set_vocab_sentencepiece`):
    pieces, scores and SentencePiece's own token types, user-defined pieces with "▁" turned back into
    spaces, ids past the tokenizer's padded as unused `[PADi]` pieces."""
    proto_bytes = tokenizer.sentencepiece_proto()
    if proto_bytes is None:
        raise TokenizerError(f"{path}: GGUF's 'llama' vocabulary is a SentencePiece model, and this model's "
                             "tokenizer is a tokenizer.json: pass --tokenizer tokenizer.model")
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(proto_bytes)
    user_defined = pb.ModelProto.SentencePiece.USER_DEFINED
    tokens = [p.piece.replace("▁", " ") if p.type == user_defined else p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    pad = vocab_size - len(tokens)
    if pad < 0:
        raise TokenizerError(f"{path}: the tokenizer has {len(tokens)} tokens but the model's embedding has "
                             f"{vocab_size} rows")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    scores += [-10000.0] * pad
    types += [_UNUSED_PIECE] * pad
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    spec = proto.trainer_spec
    for add, i in ((w.add_bos_token_id, spec.bos_id), (w.add_eos_token_id, spec.eos_id),
                   (w.add_unk_token_id, spec.unk_id), (w.add_pad_token_id, spec.pad_id)):
        if i >= 0:
            add(i)
    w.add_add_bos_token(True)  # Gemma prompts start with <bos>, and never end with <eos>
    w.add_add_eos_token(False)
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    # the checkpoint's own template(s) where it has them (a "tool_use" one as tokenizer.chat_template.tool_use)
    w.add_chat_template([{"name": n, "template": t} for n, t in chat_template.variants] if chat_template
                        else CHAT_TEMPLATE)


def _write(path: Path, state: dict[str, torch.Tensor], names: dict[str, str], config: GemmaConfig, arch: str,
           tokenizer: Tokenizer, chat_template: ChatTemplate | None, matrix_type, file_type,
           progress: str | bool) -> None:
    """One pass: metadata, tensor infos, then each tensor converted and written in turn (the file
    never holds more than one converted tensor in memory). `progress`: the name a bar shows, or False."""
    w = gguf.GGUFWriter(path, arch)
    _metadata(w, config, arch, file_type)
    _vocabulary(w, tokenizer, chat_template, config.vocab_size, path)
    plan = []
    for ours, t in state.items():
        shape = tuple(t.shape)
        # llama.cpp reads norms and every 1-D tensor as F32 only
        qtype = Q.F32 if len(shape) == 1 or ours.endswith("norm.weight") else matrix_type
        if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = Q.F16  # as the converter falls back
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))
        w.add_tensor_info(names[ours], shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        plan.append((ours, qtype))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for ours, qtype in tqdm(plan, desc=f"writing {progress}", unit="tensor", disable=not progress, leave=False):
            x = state[ours].detach().to("cpu", torch.float32).numpy()
            if ours.endswith("norm.weight"):
                x = x + np.float32(1.0)  # llama.cpp stores 1 + w
            w.write_tensor_data(gguf.quants.quantize(np.ascontiguousarray(x), qtype))
    finally:
        w.close()


def _llama_quantize(src: Path, dst: Path, file_type) -> None:
    try:
        import llama_cpp
    except ImportError:
        raise CheckpointError("--type q4_k_m uses llama.cpp's quantizer: pip install 'gemmakit[llamacpp]' "
                              "(llama-cpp-python)") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    params.nthread = 0  # llama.cpp picks the number of threads
    with tempfile.TemporaryFile() as log:  # llama.cpp logs every tensor on stderr: kept for errors only
        stderr = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)
        log.seek(0)
        last = [line for line in log.read().decode(errors="replace").splitlines() if line.strip()][-1:]
    if status != 0:
        raise CheckpointError(f"{dst}: llama.cpp's quantizer failed (status {status}): {' '.join(last)}")
