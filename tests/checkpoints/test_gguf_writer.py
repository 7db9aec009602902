"""GGUF out: small random models written with checkpoints.gguf_writer, read back by the GGUF reader
(config, tokenizer, tensors), written again bit for bit, and the bad inputs. llama.cpp running the
files is benchmarks/gguf_roundtrip.py (llama-cpp-python has no wheel on PyPI: CI would build it)."""

import sys

import gguf
import numpy as np
import pytest
import torch
from test_gguf import CONFIGS, IDS, random_model

import gemmakit
from gemmakit.checkpoints import gguf as gguf_reader
from gemmakit.checkpoints import gguf_writer
from gemmakit.cli.main import main
from gemmakit.errors import CheckpointError, ConfigError, TokenizerError
from gemmakit.lm import LM
from gemmakit.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
TYPES = ("f32", "f16", "bf16", "q8_0")
ARCH = {"gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3}
# What llama.cpp's loaders read for every Gemma (src/models/gemma*.cpp and llama_model_base::load_hparams).
REQUIRED_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
                 "attention.head_count_kv", "attention.key_length", "attention.value_length",
                 "attention.layer_norm_rms_epsilon", "rope.freq_base")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(sentencepiece_model):
    tok = Tokenizer.from_file(sentencepiece_model)
    return {family: LM(random_model(config), tok) for family, config in CONFIGS.items()}


def tensors(path):
    """name -> (type, raw bytes) of every tensor in a GGUF file."""
    return {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def metadata(path):
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def expected_weight(w: torch.Tensor, qtype) -> torch.Tensor:
    """What the reader should give back for a weight written as `qtype`: its own rounding, nothing more."""
    x = w.detach().numpy().astype(np.float32)
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).copy()).reshape(w.shape)


@pytest.mark.parametrize("type", TYPES)
@pytest.mark.parametrize("family", list(CONFIGS))
def test_written_file_reads_back(tmp_path, models, family, type):
    lm = models[family]
    path = lm.save_gguf(tmp_path / f"{family}-{type}.gguf", type=type, progress=False)
    matrix_type = gguf_writer.TYPES[type][0]

    written = gguf.GGUFReader(path)
    assert written.fields["general.architecture"].contents() == family
    for key in REQUIRED_KEYS:
        assert f"{family}.{key}" in written.fields, key
    # Names are llama.cpp's own for the architecture (gguf's table), shapes innermost first.
    known = {gguf.TENSOR_NAMES[t].format(bid=i) + ".weight"
             for t in gguf.MODEL_TENSORS[ARCH[family]] for i in range(lm.config.n_layers)}
    state = lm.module.state_dict()
    assert {t.name for t in written.tensors} <= known
    for t in written.tensors:
        ours = gguf_reader.our_name(t.name)
        assert tuple(reversed(t.shape.tolist())) == tuple(state[ours].shape)
        assert t.tensor_type == (Q.F32 if ours.endswith("norm.weight") else matrix_type), t.name
        if ours.endswith("norm.weight"):  # stored as llama.cpp's 1 + w
            np.testing.assert_array_equal(t.data, state[ours].numpy() + np.float32(1))

    ckpt = gguf_reader.read(path)
    assert ckpt.config == lm.config
    for name, ref in ckpt.tensors.items():
        want = state[name] if name.endswith("norm.weight") else expected_weight(state[name], matrix_type)
        torch.testing.assert_close(ref.load(), want, rtol=0, atol=1e-6 if name.endswith("norm.weight") else 0)
    text = "the quick brown fox 12345 <start_of_turn>user\nhéllo"
    assert ckpt.tokenizer.encode(text) == lm.tokenizer.encode(text)
    assert written.fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert "<start_of_turn>" in written.fields["tokenizer.chat_template"].contents()

    again = gemmakit.load(path, quantize=None, compile=None, progress=False)
    if type == "f32":  # the same weights: the same logits, bit for bit
        assert torch.equal(again.logits(IDS), lm.logits(IDS))


@pytest.mark.parametrize("type", TYPES)
@pytest.mark.parametrize("family", list(CONFIGS))
def test_gguf_to_gemmakit_to_gguf_is_bit_equal(tmp_path, models, family, type):
    first = models[family].save_gguf(tmp_path / "first.gguf", type=type, progress=False)
    loaded = gemmakit.load(first, quantize=None, compile=None, progress=False)
    second = loaded.save_gguf(tmp_path / "second.gguf", type=type, progress=False)
    assert tensors(second) == tensors(first)
    assert metadata(second) == metadata(first)


def test_trained_folder_converts_from_the_command_line(tmp_path, models, capsys):
    """A Hugging Face folder with a tokenizer.model, as `gemmakit train` leaves it, to GGUF and back."""
    folder = models["gemma"].save(tmp_path / "run", progress=False)
    out = tmp_path / "run.gguf"
    assert main(["convert", str(folder), str(out), "--type", "q8_0"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    again = gemmakit.load(out, quantize=None, compile=None, progress=False)
    want = gemmakit.load(folder, quantize=None, compile=None, progress=False).logits(IDS)
    # Q8_0's rounding of each weight is at most half a step (max|block| / 254): a small fraction of the logits.
    assert (again.logits(IDS) - want).abs().max() < 0.05 * want.abs().max()


def test_q4_k_m_is_llamacpp_mixture(tmp_path, models):
    pytest.importorskip("llama_cpp", reason="--type q4_k_m needs llama-cpp-python (no wheel on PyPI)")
    lm = models["gemma3"]
    path = lm.save_gguf(tmp_path / "q4km.gguf", type="q4_k_m", progress=False)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_up.weight"] == Q.Q4_K and types["blk.0.attn_norm.weight"] == Q.F32
    assert Q.Q6_K in types.values()  # llama.cpp gives half the V and FFN-down matrices more bits
    assert metadata(path)["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert gguf_reader.read(path).config == lm.config
    assert list(tmp_path.iterdir()) == [path]  # the float32 intermediate is gone


# -- bad input -----------------------------------------------------------------------------------
def assert_one_line_error(capsys, args, *fragments):
    """`gemmakit ARGS` (in this process: the CLI's main) fails with one line naming the problem."""
    assert main(list(args)) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_types_and_targets_are_one_line_errors(tmp_path, models, capsys):
    folder = str(models["gemma"].save(tmp_path / "model", progress=False))
    assert_one_line_error(capsys, ["convert", folder, str(tmp_path / "a.gguf"), "--type", "q5_k"],
                          "unknown GGUF type 'q5_k'", "q4_k_m")
    assert_one_line_error(capsys, ["convert", folder, str(tmp_path / "out"), "--type", "f16"], "--type", ".gguf")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(capsys, ["convert", folder, str(blocker / "a.gguf")], "is a file, not a folder")
    taken = blocker.rename(tmp_path / "taken.gguf")
    assert_one_line_error(capsys, ["convert", folder, str(taken)], "taken.gguf", "already exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "taken.gguf"]  # nothing else written


def test_nothing_is_left_when_writing_fails(tmp_path, models, monkeypatch):
    calls = []
    real = gguf.quants.quantize

    def fail_on_the_fifth(data, qtype):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", fail_on_the_fifth)
    with pytest.raises(CheckpointError, match="out.gguf: cannot write the GGUF file \\(No space left on device\\)"):
        models["gemma2"].save_gguf(tmp_path / "out.gguf", type="q8_0", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_q4_k_m_without_llamacpp_is_one_error(tmp_path, models, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails
    with pytest.raises(CheckpointError, match="q4_k_m uses llama.cpp's quantizer: pip install 'gemmakit\\[llamacpp\\]'"):
        models["gemma"].save_gguf(tmp_path / "out.gguf", type="q4_k_m", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_what_llamacpp_cannot_run_is_refused(tmp_path, models, gemma_tokenizer_json):
    tok = models["gemma"].tokenizer
    cases = [
        (CONFIGS["gemma2"].replace(attn_logit_softcap=None), "attn_logit_softcap None"),
        (CONFIGS["gemma3"].replace(query_pre_attn_scalar=50), "query_pre_attn_scalar 50"),
        (CONFIGS["gemma3"].replace(global_every=3), "global_every 3"),
        (CONFIGS["gemma"].replace(final_logit_softcap=30.0), "final_logit_softcap 30.0"),
        (CONFIGS["gemma2"].replace(rope_theta_global=1e6), "rope_theta_global 1000000.0"),
        (CONFIGS["gemma"].replace(post_norms=True), "post_norms"),
    ]
    for config, fragment in cases:
        with pytest.raises(ConfigError, match=fragment):
            LM(random_model(config), tok).save_gguf(tmp_path / "x.gguf", progress=False)
    with pytest.raises(TokenizerError, match="has none: pass --tokenizer"):
        LM(random_model(CONFIGS["gemma"]), None).save_gguf(tmp_path / "x.gguf", progress=False)
    with pytest.raises(TokenizerError, match="tokenizer.json: pass --tokenizer tokenizer.model"):
        LM(random_model(CONFIGS["gemma"]), Tokenizer.from_file(gemma_tokenizer_json)).save_gguf(tmp_path / "x.gguf")
    quantized = gemmakit.load(CONFIGS["gemma"], quantize="int8", compile=None)
    quantized.tokenizer = tok
    with pytest.raises(CheckpointError, match="quantized models cannot be written"):
        quantized.save_gguf(tmp_path / "x.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_the_checkpoints_own_chat_template_goes_into_the_file(tmp_path, models):
    from gemmakit.chat_template import ChatTemplate
    from gemmakit.checkpoints.metadata import Metadata
    from gemmakit.lm import LM

    own = ChatTemplate.of([{"name": "default", "template": "{% for m in messages %}[{{ m.content }}]{% endfor %}"},
                           {"name": "tool_use", "template": "{{ tools | tojson }}"}], "test")
    base = models["gemma3"]
    lm = LM(base.module, base.tokenizer, metadata=Metadata(chat_template=own))
    path = lm.save_gguf(tmp_path / "own.gguf", type="f32", progress=False)
    again = gemmakit.load(path, quantize=None, compile=None, progress=False)
    assert again.metadata.chat_template.variants == own.variants
    assert again.chat_format.render([{"role": "user", "content": "hi"}]) == "[hi]"
