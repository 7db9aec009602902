"""The GGUF reader: small GGUFs written here with gguf.GGUFWriter (as llama.cpp's converter writes
them), the real Gemma 3 270M Q4_K_M against llama.cpp and transformers, and broken files."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from sentencepiece import sentencepiece_model_pb2 as pb

import gemmakit
from gemmakit.checkpoints import gguf as gguf_reader
from gemmakit.config import GemmaConfig, LayerKind, preset
from gemmakit.errors import CheckpointError, ConfigError
from gemmakit.model import Gemma

Q = gguf.GGMLQuantizationType
DATA = Path(__file__).parent.parent / "data"

# Sizes where every row is a multiple of 256, the K-quants' block.
_SMALL = dict(vocab_size=500, d_model=256, n_heads=4, head_dim=64, ffn_dim=512, max_seq_len=128)
CONFIGS = {
    "gemma": GemmaConfig(family="gemma", n_layers=2, n_kv_heads=1, **_SMALL),  # MQA
    "gemma2": GemmaConfig(family="gemma2", n_layers=2, n_kv_heads=2, **_SMALL, attn_logit_softcap=42.0,
                          final_logit_softcap=27.0, sliding_window=4, global_every=2, post_norms=True,
                          query_pre_attn_scalar=64),  # GQA, soft-caps
    # llama.cpp's Gemma 3: five sliding layers, then a global one.
    "gemma3": GemmaConfig(family="gemma3", n_layers=6, n_kv_heads=1, **_SMALL, sliding_window=4, global_every=6,
                          post_norms=True, qk_norm=True, rope_theta_global=1_000_000.0, query_pre_attn_scalar=64),
}
IDS = torch.tensor([[2, 17, 301, 5, 44, 44, 9, 499, 3, 100, 7, 250, 31, 8]])  # longer than the windows

# Our parameter names -> GGUF names, written out by hand from llama.cpp's tensor table.
_LAYER = {"attn_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
          "attn.o_proj": "attn_output", "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm",
          "post_attn_norm": "post_attention_norm", "mlp_norm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "post_mlp_norm": "post_ffw_norm"}

# Tensor types of the "quantized" files: Q8_0 by gguf.quants.quantize; Q4_K and Q6_K as random valid
# blocks (gguf 0.19 dequantizes K-quants but cannot quantize them); F16/BF16 too while we are here.
QUANTIZED = {"embed": Q.Q8_0, "attn.q_proj": Q.Q4_K, "attn.k_proj": Q.F16, "attn.v_proj": Q.BF16,
             "attn.o_proj": Q.Q6_K, "mlp.gate_proj": Q.Q8_0, "mlp.up_proj": Q.Q4_K, "mlp.down_proj": Q.Q6_K}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gguf_name(ours: str) -> str:
    if ours.startswith("layers."):
        _, i, rest = ours.split(".", 2)
        module, param = rest.rsplit(".", 1)
        return f"blk.{i}.{_LAYER[module]}.{param}"
    return {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}[ours]


def random_model(config: GemmaConfig, seed: int = 0) -> Gemma:
    torch.manual_seed(seed)
    model = Gemma(config)
    # Norm weights random too, so that a norm read into the wrong place changes the logits.
    model.reset_parameters(std=0.05, norm_std=0.3)
    return model.eval()


def _random_kquant(shape: tuple[int, int], qtype, rng: np.random.Generator) -> np.ndarray:
    """Random bytes are valid K-quant blocks once their float16 scales are small finite numbers."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // block, size), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit values
        raw[..., 0:4] = np.array([1e-4, 3e-4], np.float16).view(np.uint8)
    else:  # Q6_K: 128 + 64 bytes of 6-bit values, 16 int8 scales, d (f16) last
        raw[..., -2:] = np.array([2e-5], np.float16).view(np.uint8)
    return raw.reshape(shape[0], -1)


def tokenizer_fields(sentencepiece_model: Path):
    """tokens, scores, token types as llama.cpp's converter writes them (<unk> marked control, as the
    converter does for special tokens listed in tokenizer_config.json)."""
    proto = pb.ModelProto()
    proto.ParseFromString(sentencepiece_model.read_bytes())
    tokens = [p.piece for p in proto.pieces]
    types = [3 if p.piece == "<unk>" else int(p.type) for p in proto.pieces]
    return tokens, [p.score for p in proto.pieces], types


def write_gguf(path: Path, model: Gemma, sentencepiece_model: Path, quantized: bool = False, arch: str | None = None,
               skip: tuple[str, ...] = (), metadata_skip: tuple[str, ...] = (),
               extra: dict[str, np.ndarray] | None = None, chat_template: str | None = None) -> dict[str, torch.Tensor]:
    """Writes `model` as llama.cpp would; returns the weights a reader should give back (dequantized)."""
    c = model.config
    arch = arch or c.family
    w = gguf.GGUFWriter(path, arch)
    keys = {
        "context_length": lambda: w.add_context_length(c.max_seq_len),
        "embedding_length": lambda: w.add_embedding_length(c.d_model),
        "block_count": lambda: w.add_block_count(c.n_layers),
        "feed_forward_length": lambda: w.add_feed_forward_length(c.ffn_dim),
        "head_count": lambda: w.add_head_count(c.n_heads),
        "head_count_kv": lambda: w.add_head_count_kv(c.n_kv_heads),
        "rms_eps": lambda: w.add_layer_norm_rms_eps(c.norm_eps),
        "key_length": lambda: w.add_key_length(c.head_dim),
        "value_length": lambda: w.add_value_length(c.head_dim),
    }
    for key, add in keys.items():
        if key not in metadata_skip:
            add()
    if c.family == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcap)
        w.add_final_logit_softcapping(c.final_logit_softcap)
        w.add_sliding_window(c.sliding_window)
    if c.family == "gemma3":
        w.add_rope_freq_base(c.rope_theta_global)
        w.add_sliding_window(c.sliding_window)
    tokens, scores, types = tokenizer_fields(sentencepiece_model)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    rng = np.random.default_rng(0)
    expected = {}
    for name, p in model.state_dict().items():
        if gguf_name(name) in skip:
            continue
        x = p.detach().numpy().astype(np.float32)
        if name.endswith("norm.weight"):
            w.add_tensor(gguf_name(name), x + 1)  # llama.cpp stores 1 + w
            expected[name] = p.detach().clone()
            continue
        qtype = QUANTIZED[name.split(".", 2)[-1].rsplit(".", 1)[0] if name.startswith("layers.") else "embed"] \
            if quantized else Q.F32
        if qtype == Q.F32:
            data = x
        elif qtype in (Q.Q4_K, Q.Q6_K):
            data = _random_kquant(x.shape, qtype, rng)
        else:
            data = gguf.quants.quantize(x, qtype)
        w.add_tensor(gguf_name(name), data, raw_dtype=None if qtype == Q.F32 else qtype)
        expected[name] = torch.from_numpy(gguf.quants.dequantize(data, qtype).copy()).reshape(p.shape)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def reference_model(config: GemmaConfig, weights: dict[str, torch.Tensor]) -> Gemma:
    model = Gemma(config)
    model.load_state_dict(weights, strict=True)
    return model.eval()


# -- small files written here --------------------------------------------------------------------
@pytest.mark.parametrize("quantized", [False, True], ids=["f32", "quantized"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_small_gguf_round_trip(tmp_path, sentencepiece_model, family, quantized):
    config = CONFIGS[family]
    model = random_model(config)
    path = tmp_path / f"{family}.gguf"
    weights = write_gguf(path, model, sentencepiece_model, quantized=quantized)

    ckpt = gguf_reader.read(path)
    assert ckpt.config == config
    assert ckpt.source == str(path)
    assert set(ckpt.tensors) == set(model.state_dict())
    for name, ref in ckpt.tensors.items():
        assert ref.shape == tuple(model.state_dict()[name].shape), name
    for name in (n for n in ckpt.tensors if n.endswith("norm.weight")):  # the +1 undone
        torch.testing.assert_close(ckpt.tensors[name].load(), model.state_dict()[name], rtol=0, atol=1e-6)
    if quantized:  # the weights really were quantized: the reader's are the dequantized ones
        q = ckpt.tensors["layers.0.attn.q_proj.weight"].load()
        assert not torch.allclose(q, model.state_dict()["layers.0.attn.q_proj.weight"], atol=1e-3)
        torch.testing.assert_close(q, weights["layers.0.attn.q_proj.weight"], rtol=0, atol=0)

    lm = gemmakit.load(path, quantize=None, progress=False)  # the whole path: format detection, read, build (exact)
    ours = lm.logits(IDS)
    with torch.inference_mode():
        theirs = reference_model(config, weights)(IDS)
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 1e-5 * scale, f"max diff {(ours - theirs).abs().max():.3g}"
    assert lm.tokenizer is not None and lm.tokenizer.vocab_size == config.vocab_size


def test_tokenizer_rebuilt_from_metadata(tmp_path, sentencepiece_model):
    import sentencepiece as spm

    path = tmp_path / "tok.gguf"
    write_gguf(path, random_model(CONFIGS["gemma"]), sentencepiece_model)
    tok = gguf_reader.read(path).tokenizer
    original = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    texts = ["the quick brown fox 12345", "  two  spaces\tand a tab\n\nnewlines", "héllo wörld ✓ 😀 ∑",
             "def f(x):\n    return x + 1", "<start_of_turn>user\nHello world!<end_of_turn>", ""]
    for text in texts:
        assert tok.encode(text, add_bos=False) == original.EncodeAsIds(text), text
        assert tok.encode(text) == [2, *original.EncodeAsIds(text)]
        assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert tok.token_id("<start_of_turn>") == original.PieceToId("<start_of_turn>")

    rebuilt, source = pb.ModelProto(), pb.ModelProto()
    rebuilt.ParseFromString(tok.sentencepiece_proto())
    source.ParseFromString(sentencepiece_model.read_bytes())
    assert [(p.piece, p.score, p.type) for p in rebuilt.pieces] == [(p.piece, p.score, p.type) for p in source.pieces]
    assert rebuilt.trainer_spec.model_type == pb.TrainerSpec.BPE and rebuilt.trainer_spec.byte_fallback
    assert rebuilt.normalizer_spec.name == "identity" and not rebuilt.normalizer_spec.add_dummy_prefix
    assert not rebuilt.normalizer_spec.remove_extra_whitespaces



def test_chat_template_from_metadata(tmp_path, sentencepiece_model):
    """tokenizer.chat_template (Google's Gemma 3 template) is the chat format, after a quantized conversion too."""
    template = (DATA / "chat_templates" / "gemma3.jinja").read_text()
    path = tmp_path / "chat.gguf"
    write_gguf(path, random_model(CONFIGS["gemma3"]), sentencepiece_model, chat_template=template)
    meta = gguf_reader.read(path).metadata
    assert meta.chat_template.text == template and meta.chat_template.origin == f"{path} (tokenizer.chat_template)"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": " and? "}]
    for quantize in (None, "int8"):
        lm = gemmakit.load(path, quantize=quantize, compile=None, progress=False)
        assert lm.metadata.chat_template.text == template
        assert lm.chat_format.chat_ids(messages) == lm.tokenizer.chat_ids(messages)  # the built-in's ids
    assert lm.metadata.chat_template.origin == f"{path} (chat template)"  # errors name the GGUF, not the cache
    write_gguf(path, random_model(CONFIGS["gemma3"]), sentencepiece_model)
    assert gguf_reader.read(path).metadata.chat_template is None  # none in the file: the built-in one


def test_user_defined_whitespace_pieces_written_as_llamacpp_writes_them(tmp_path, sentencepiece_model):
    """Gemma's whitespace runs (its 4-space indent, ...) are user-defined pieces "▁▁▁▁"; llama.cpp's
    converter writes them with spaces ("    "), and the rebuilt tokenizer must still use them."""
    import sentencepiece as spm

    def with_piece(text: str) -> Path:
        proto = pb.ModelProto()
        proto.ParseFromString(sentencepiece_model.read_bytes())
        last = proto.pieces[-1]  # the rarest merge, given over to the whitespace piece
        last.piece, last.type, last.score = text, pb.ModelProto.SentencePiece.USER_DEFINED, 0.0
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.model"
        out.write_bytes(proto.SerializeToString())
        return out

    original = spm.SentencePieceProcessor(model_file=str(with_piece("▁▁▁▁")))
    indent = original.GetPieceSize() - 1
    text = "def f(x):\n    return x\n        y  z"
    assert original.EncodeAsIds(text).count(indent) == 3  # the real SentencePiece uses the piece
    path = tmp_path / "ws.gguf"
    write_gguf(path, random_model(CONFIGS["gemma"]), with_piece("    "))
    tok = gguf_reader.read(path).tokenizer
    assert tok.encode(text, add_bos=False) == original.EncodeAsIds(text)
    assert tok.decode(tok.encode(text)) == text


def test_tensors_load_lazily_one_at_a_time(tmp_path, sentencepiece_model, monkeypatch):
    path = tmp_path / "lazy.gguf"
    write_gguf(path, random_model(CONFIGS["gemma"]), sentencepiece_model, quantized=True)
    calls = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, qtype: calls.append(len(data)) or real(data, qtype))
    ckpt = gguf_reader.read(path)
    assert max(calls) == 1  # reading only probes one row of each tensor for a supported type
    calls.clear()
    ckpt.tensors["embed.weight"].load()
    assert sum(calls) == CONFIGS["gemma"].vocab_size  # that tensor's rows, and nothing else


def _metadata_only(path: Path, arch: str, d_model: int, n_layers: int, n_heads: int, ffn: int = 1024,
                   **keys) -> GemmaConfig:
    """The config read from a GGUF holding these metadata and only an embedding (config needs no more)."""
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(8192)
    w.add_embedding_length(d_model)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_layer_norm_rms_eps(1e-6)
    for key, value in keys.items():
        getattr(w, f"add_{key}")(value)
    w.add_tensor("token_embd.weight", np.zeros((8, d_model), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf_reader.read(path).config


def test_config_rules_follow_llamacpp(tmp_path):
    """What llama.cpp's loader derives rather than reads: its defaults and the 27B query scale."""
    f = tmp_path / "m.gguf"
    gemma = _metadata_only(f, "gemma", 2048, 18, 8, 16_384, head_count_kv=1, key_length=256)
    assert gemma == preset("gemma-2b").replace(vocab_size=8)
    # Gemma 2 without the optional keys: window 4096, caps 50 and 30; 27B found by its 46 layers.
    g27 = _metadata_only(f, "gemma2", 4608, 46, 32, 36_864, head_count_kv=16, key_length=128)
    assert g27 == preset("gemma2-27b").replace(vocab_size=8)
    assert g27.query_pre_attn_scalar == 144 and g27.sliding_window == 4096 and g27.global_every == 2
    g9 = _metadata_only(f, "gemma2", 3584, 42, 16, 14_336, head_count_kv=8, key_length=256, sliding_window=4096,
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    assert g9 == preset("gemma2-9b").replace(vocab_size=8)
    # Gemma 3: rope.freq_base is the global base, sliding layers keep 10,000; linear scaling on global
    # layers only; 27B (62 layers) scales queries by d_model / n_heads = 168.
    g4 = _metadata_only(f, "gemma3", 2560, 34, 8, head_count_kv=4, key_length=256, sliding_window=1024,
                        rope_freq_base=1_000_000.0, rope_scaling_type=gguf.RopeScalingType.LINEAR,
                        rope_scaling_factor=8.0)
    assert (g4.rope_theta, g4.rope_theta_global, g4.rope_scale_global) == (10_000.0, 1_000_000.0, 8.0)
    assert (g4.sliding_window, g4.global_every, g4.query_pre_attn_scalar, g4.qk_norm) == (1024, 6, 256, True)
    g27 = _metadata_only(f, "gemma3", 5376, 62, 32, head_count_kv=16, key_length=128, sliding_window=1024)
    assert g27.query_pre_attn_scalar == 168 and g27.rope_theta_global == 10_000.0  # llama.cpp's default base
    # No window: every layer global, at rope.freq_base.
    full = _metadata_only(f, "gemma3", 640, 18, 4, head_count_kv=1, key_length=256, rope_freq_base=1e6)
    assert full.sliding_window is None and LayerKind.SLIDING not in full.layer_kinds
    assert full.global_theta == 1e6
    with pytest.raises(ConfigError, match="m.gguf: RoPE scaling 'yarn'"):
        _metadata_only(f, "gemma3", 640, 18, 4, rope_scaling_type=gguf.RopeScalingType.YARN, rope_scaling_factor=4.0)


# -- the real Gemma 3 270M -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_logits(real_lm, llamacpp_reference) -> dict[tuple[int, ...], torch.Tensor]:
    """(T, V) float32 logits of every reference prompt, computed once for the tests below."""
    return {tuple(item["prompt_token_ids"]): real_lm.logits(item["prompt_token_ids"])[0]
            for item in llamacpp_reference["results"]}


def test_real_config_is_the_preset(real_lm):
    # Every field matches, rope bases and window included (the file stores the global base, 1e6).
    assert real_lm.config == preset("gemma3-270m")
    assert real_lm.num_parameters() == 268_098_176


def test_real_tokenization_matches_llamacpp(real_lm, llamacpp_reference):
    for item in llamacpp_reference["results"]:
        assert real_lm.tokenizer.encode(item["prompt"]) == item["prompt_token_ids"], item["prompt"]


def test_real_logits_match_llamacpp(real_logits, llamacpp_reference):
    """llama.cpp runs the Q4_K_M weights with quantized activations, so logits differ by about 0.1;
    the greedy token and the top-5 must still agree. The differences seen are printed (pytest -s)."""
    report = []
    for item in llamacpp_reference["results"]:
        logits = real_logits[tuple(item["prompt_token_ids"])][-1]
        ours = logits.topk(5).indices.tolist()
        theirs = [t["id"] for t in item["first_position_top5"]]
        diffs = [logits[t["id"]].item() - t["logit"] for t in item["first_position_top5"]]
        report.append(f"{item['prompt']!r}: top-5 shared {len(set(ours) & set(theirs))}/5, logit diffs on "
                      f"llama.cpp's top-5 {', '.join(f'{d:+.3f}' for d in diffs)}")
        assert ours[0] == item["generated_token_ids"][0] == theirs[0], report[-1]
        assert len(set(ours) & set(theirs)) >= 4, report[-1]
        assert max(map(abs, diffs)) < 0.5, report[-1]  # seen: 0.17 at most
    print("\nours vs llama.cpp (Q4_K_M, first generated position):\n" + "\n".join(report))


def test_real_logits_match_transformers(real_logits):
    """transformers' own GGUF loading dequantizes the same bytes with the same gguf package, so the
    float32 weights are identical and only summation order differs: seen ~1e-6 of the largest logit;
    1e-4 leaves room for other BLAS builds and thread counts while catching any real mistake (a norm
    off by one or a wrong RoPE base moves logits by whole units)."""
    reference = json.loads((DATA / "transformers_gguf_logits.json").read_text())
    for item in reference["prompts"]:
        logits = real_logits[tuple(item["token_ids"])]  # (T, V); the same ids as llama.cpp's prompts
        last = torch.tensor(item["last_top100_logits"])
        tol = 1e-4 * last.abs().max()
        got = logits[-1, item["last_top100_ids"]]
        assert (got - last).abs().max() <= tol, f"{item['prompt']!r}: {(got - last).abs().max():.3g}"
        top10 = torch.tensor(item["top10_logits"])
        assert (logits.gather(-1, torch.tensor(item["top10_ids"])) - top10).abs().max() <= 1e-4 * top10.abs().max()
        for stat, ours in (("row_logsumexp", logits.logsumexp(-1)), ("row_max", logits.max(-1).values),
                           ("row_mean", logits.mean(-1)), ("row_std", logits.std(-1))):
            assert (ours - torch.tensor(item[stat])).abs().max() <= tol, (item["prompt"], stat)
        assert logits[-1].argmax().item() == item["last_top100_ids"][0]


def test_real_load_peak_memory(real_gguf):
    """Loading the real GGUF in float32 in a fresh process raises peak resident memory by at most
    1.5x the model's float32 bytes: no second copy of the weights (the interpreter and torch,
    already resident before the load, are not the loader's)."""
    code = ("import json, resource, gemmakit, sys\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
            "lm = gemmakit.load(sys.argv[1], quantize=None, progress=False)\n"
            "print(json.dumps({'before': before, 'peak': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,"
            " 'model': lm.nbytes()}))\n")
    out = subprocess.run([sys.executable, "-c", code, str(real_gguf)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    numbers = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = (numbers["peak"] - numbers["before"]) / numbers["model"]
    print(f"\npeak RSS grew {(numbers['peak'] - numbers['before']) / 2**20:.0f} MiB loading a "
          f"{numbers['model'] / 2**20:.0f} MiB model: {ratio:.2f}x")
    assert ratio <= 1.5, f"loading raised peak RSS by {ratio:.2f}x the float32 model"


def test_truncated_real_file(tmp_path, real_gguf):
    size = real_gguf.stat().st_size
    for cut in (2_000_000, size // 2):  # in the vocabulary, in the weights
        target = tmp_path / "cut.gguf"
        with open(real_gguf, "rb") as src, open(target, "wb") as dst:
            left = cut
            while left:
                left -= dst.write(src.read(min(left, 1 << 24)))
        with pytest.raises(CheckpointError, match="cut.gguf: .*truncated"):
            gguf_reader.read(target)


# -- broken files --------------------------------------------------------------------------------
@pytest.fixture
def small_gguf(tmp_path, sentencepiece_model) -> Path:
    path = tmp_path / "small.gguf"
    write_gguf(path, random_model(CONFIGS["gemma3"]), sentencepiece_model, quantized=True)
    return path


def _patched(path: Path, offset: int, data: bytes) -> Path:
    raw = bytearray(path.read_bytes())
    raw[offset: offset + len(data)] = data
    out = path.with_name("patched.gguf")
    out.write_bytes(bytes(raw))
    return out


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nothing.gguf"):
        gguf_reader.read(tmp_path / "nothing.gguf")
    with pytest.raises(CheckpointError, match="nothing.gguf"):
        gemmakit.load(tmp_path / "nothing.gguf")


def test_wrong_magic_and_empty_file(tmp_path, small_gguf):
    with pytest.raises(CheckpointError, match="patched.gguf: not a GGUF file"):
        gguf_reader.read(_patched(small_gguf, 0, b"GGML"))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.gguf"):
        gguf_reader.read(empty)
    with pytest.raises(CheckpointError, match="patched.gguf: GGUF version 7"):
        gguf_reader.read(_patched(small_gguf, 4, struct.pack("<I", 7)))


def test_truncated_small_file(tmp_path, small_gguf):
    data = small_gguf.read_bytes()
    reader = gguf.GGUFReader(small_gguf)
    last = max(reader.tensors, key=lambda t: t.data_offset)
    data_end = last.data_offset + last.n_bytes  # past this only alignment padding follows
    tokens_at = reader.fields["tokenizer.ggml.tokens"].offset
    cuts = [3, 10, 20, 30, tokens_at + 40, reader.fields["tokenizer.ggml.scores"].offset + 30,
            reader.data_offset - 100, reader.data_offset + 10, (reader.data_offset + data_end) // 2, data_end - 1]
    for cut in cuts:
        target = tmp_path / "cut.gguf"
        target.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="cut.gguf"):
            gguf_reader.read(target)


def test_counts_beyond_the_file(small_gguf):
    for field in (8, 16):  # tensor count, metadata count
        for count in (2**40, 2**64 - 1):
            with pytest.raises(CheckpointError, match="patched.gguf: corrupt or truncated GGUF header"):
                gguf_reader.read(_patched(small_gguf, field, struct.pack("<Q", count)))
    reader = gguf.GGUFReader(small_gguf)
    # A count that fits the coarse check still fails cleanly: the parser then reads tensor infos as
    # metadata and must stop at the end of the file rather than loop or allocate.
    with pytest.raises(CheckpointError, match="patched.gguf"):
        gguf_reader.read(_patched(small_gguf, 16, struct.pack("<Q", len(reader.fields) - 3 + 5)))
    # Array and string lengths claiming more than the file holds.
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores"):
        at = reader.fields[key].offset + 8 + len(key) + 4 + 4  # key length, key, value type, item type
        for count in (2**33, 2**62):
            with pytest.raises(CheckpointError, match="patched.gguf: truncated or corrupt"):
                gguf_reader.read(_patched(small_gguf, at, struct.pack("<Q", count)))
    name = "general.architecture"
    at = reader.fields[name].offset + 8 + len(name) + 4  # the string's length
    with pytest.raises(CheckpointError, match="patched.gguf: truncated or corrupt"):
        gguf_reader.read(_patched(small_gguf, at, struct.pack("<Q", 2**60)))


def test_unknown_architecture(tmp_path, sentencepiece_model):
    path = tmp_path / "llama.gguf"
    write_gguf(path, random_model(CONFIGS["gemma"]), sentencepiece_model, arch="llama")
    with pytest.raises(ConfigError, match="llama.gguf: architecture 'llama' is not a Gemma"):
        gguf_reader.read(path)


def test_missing_tensor_and_metadata(tmp_path, sentencepiece_model):
    path = tmp_path / "holes.gguf"
    write_gguf(path, random_model(CONFIGS["gemma2"]), sentencepiece_model, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match="holes.gguf: missing tensor layers.1.mlp.up_proj.weight"):
        gemmakit.load(path, progress=False)
    write_gguf(path, random_model(CONFIGS["gemma2"]), sentencepiece_model, skip=("token_embd.weight",))
    with pytest.raises(CheckpointError, match="holes.gguf: missing tensor token_embd.weight"):
        gguf_reader.read(path)
    write_gguf(path, random_model(CONFIGS["gemma2"]), sentencepiece_model, metadata_skip=("block_count",))
    with pytest.raises(ConfigError, match="holes.gguf: metadata gemma2.block_count is missing"):
        gguf_reader.read(path)


def test_bad_metadata_values(small_gguf):
    reader = gguf.GGUFReader(small_gguf)

    def value_at(key: str) -> int:
        return reader.fields[key].offset + 8 + len(key) + 4  # key length, key, value type

    with pytest.raises(ConfigError, match="patched.gguf: n_heads 4 is not a multiple of n_kv_heads 3"):
        gguf_reader.read(_patched(small_gguf, value_at("gemma3.attention.head_count_kv"), struct.pack("<I", 3)))
    with pytest.raises(ConfigError, match="patched.gguf: d_model must be a positive integer"):
        gguf_reader.read(_patched(small_gguf, value_at("gemma3.embedding_length"), struct.pack("<I", 0)))
    # A value of the wrong type: the block count's type tag turned into a string's.
    with pytest.raises((ConfigError, CheckpointError), match="patched.gguf"):
        gguf_reader.read(_patched(small_gguf, value_at("gemma3.block_count") - 4, struct.pack("<I", 8)))
    with pytest.raises(ConfigError, match="patched.gguf: metadata gemma3.block_count should be int, found FLOAT32"):
        gguf_reader.read(_patched(small_gguf, value_at("gemma3.block_count") - 4, struct.pack("<I", 6)))


@pytest.mark.parametrize("key,fmt,value,field", [
    ("block_count", "<I", 2**31, "n_layers"),  # built billions of layers on meta: a hang
    ("block_count", "<I", 2**32 - 1, "n_layers"),
    ("feed_forward_length", "<I", 2**31, "ffn_dim"),
    ("attention.key_length", "<I", 2**20, "head_dim"),
    ("context_length", "<I", 2**31, "max_seq_len"),
    ("attention.sliding_window", "<I", 2**31, "sliding_window"),
    ("attention.layer_norm_rms_epsilon", "<f", float("nan"), "norm_eps"),
    ("attention.layer_norm_rms_epsilon", "<f", -1e-6, "norm_eps"),
    ("attention.layer_norm_rms_epsilon", "<f", 1e30, "norm_eps"),
    ("rope.freq_base", "<f", float("inf"), "rope_theta_global"),
    ("rope.freq_base", "<f", -1e4, "rope_theta_global"),
])
def test_metadata_values_out_of_range(small_gguf, key, fmt, value, field):
    """Refused at read time in one line naming the file, the field and the metadata key."""
    reader = gguf.GGUFReader(small_gguf)
    name = "gemma3." + key
    at = reader.fields[name].offset + 8 + len(name) + 4  # key length, key, value type
    with pytest.raises(ConfigError, match=f"patched.gguf: {field} .*got .*metadata {name}") as info:
        gguf_reader.read(_patched(small_gguf, at, struct.pack(fmt, value)))
    assert "\n" not in str(info.value)


def test_block_count_checked_against_the_tensors(small_gguf):
    reader = gguf.GGUFReader(small_gguf)
    name = "gemma3.block_count"
    at = reader.fields[name].offset + 8 + len(name) + 4
    with pytest.raises(CheckpointError, match="patched.gguf: gemma3.block_count is 600 but the file's tensors "
                                              "hold 6 layers"):
        gguf_reader.read(_patched(small_gguf, at, struct.pack("<I", 600)))


def test_token_types_as_strings(tmp_path):
    path = tmp_path / "strings.gguf"
    w = gguf.GGUFWriter(path, "gemma")
    for add, value in ((w.add_context_length, 128), (w.add_embedding_length, 64), (w.add_block_count, 1),
                       (w.add_feed_forward_length, 128), (w.add_head_count, 4), (w.add_layer_norm_rms_eps, 1e-6)):
        add(value)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<pad>", "<eos>", "<bos>", "<unk>"])
    w.add_array("tokenizer.ggml.token_type", ["3", "3", "3", "2"])
    w.add_tensor("token_embd.weight", np.zeros((4, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(gemmakit.TokenizerError, match="strings.gguf: metadata tokenizer.ggml.token_type"):
        gguf_reader.read(path)


def test_unsupported_tensor_type(tmp_path, sentencepiece_model):
    path = tmp_path / "int8.gguf"
    # An int8 final norm: a type that nothing dequantizes.
    write_gguf(path, random_model(CONFIGS["gemma"]), sentencepiece_model, skip=("output_norm.weight",),
               extra={"output_norm.weight": np.zeros(256, np.int8)})
    with pytest.raises(CheckpointError, match="int8.gguf: tensor output_norm.weight has type I8"):
        gguf_reader.read(path)
