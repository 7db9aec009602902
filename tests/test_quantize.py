import copy
import math

import pytest
import torch

import gemmakit
from gemmakit import kernels
from gemmakit.config import GemmaConfig
from gemmakit.errors import ConfigError
from gemmakit.lm import LM
from gemmakit.model import Gemma, KVCache
from gemmakit.model import quantized as Q

# Gemma 3 features (QK-norm, post-norms, sliding window) in a model small enough for every test;
# k_proj/v_proj have 32 outputs, which int4 cannot pack: they exercise the int8 fallback.
TINY3 = GemmaConfig(family="gemma3", vocab_size=512, d_model=64, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=32,
                    ffn_dim=128, max_seq_len=128, rope_theta_global=1e6, sliding_window=8, global_every=3,
                    post_norms=True, qk_norm=True)


def tiny_model(config=TINY3, seed=0) -> Gemma:
    torch.manual_seed(seed)
    model = Gemma(config)
    model.reset_parameters()
    return model.eval()


def weight(n=128, k=64, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_int8_error_is_within_half_a_step_per_group():
    w = weight()
    w[3, :32] = 0  # an all-zero group keeps zero integers (no 0/0)
    q = Q.QuantizedLinear.from_float(w, "int8")
    err = (q.dequantize() - w).abs().view(128, 2, 32)
    step = q.scales.float()[..., None]  # (N, K/32, 1): a float16 scale per group of 32
    assert q.weight.dtype == torch.int8 and q.scales.shape == (128, 2) and q.scales.dtype == torch.float16
    assert (err <= step * 0.5 + 1e-6).all() and err.max() > 0
    assert (q.weight[3, :32] == 0).all() and q.scales[3, 0] == 0


def test_int8_one_large_column_coarsens_only_its_own_group():
    w = weight(256, 64)
    plain = Q.QuantizedLinear.from_float(w, "int8").dequantize()
    w[:, 5] *= 30  # like the few large columns of Gemma's real weights
    spiked = Q.QuantizedLinear.from_float(w, "int8").dequantize()
    # Columns 32..63 share no group with column 5: their integers and scales are unchanged.
    assert torch.equal(spiked[:, 32:], plain[:, 32:])
    assert not torch.equal(spiked[:, :32], plain[:, :32])


def test_int4_error_is_within_half_a_step_per_group():
    w = weight()
    q = Q.QuantizedLinear.from_float(w, "int4", group_size=32)
    err = (q.dequantize().float() - w).abs().view(128, 2, 32)
    step = q.scales[..., 0].float().t()[..., None]  # (N, K/32, 1)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (128, 32)  # two weights a byte
    assert (err <= step * 0.5 + 2e-3 * w.abs().max()).all()
    assert err.max() > 0  # it did quantize


@pytest.mark.parametrize("mode", Q.MODES)
# int8: int8 activations (VNNI, AMX from AMX_ROWS rows) with VNNI; else the FMA loop and dense blocks
@pytest.mark.parametrize("rows", [1, 3, kernels.AMX_ROWS + 1, kernels.FMA_ROWS_NO_VNNI + 1, 65])
def test_forward_equals_the_dequantized_matmul(mode, rows):
    q = Q.QuantizedLinear.from_float(weight(), mode)
    dtype = Q.default_dtype(mode)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = x.double() @ q.dequantize().double().t()
    got = q(x.view(1, rows, 64))
    assert got.shape == (1, rows, 128) and got.dtype == dtype
    # float32 FMA for int8's few rows without VNNI; int8 activations with it; bfloat16 in int4
    # and in int8's dense blocks
    tol = 1e-5 if mode == "int8" and rows <= kernels.fma_rows(kernels.extension().has_vnni()) else 2e-2
    torch.testing.assert_close(got[0].double(), expected, atol=tol, rtol=tol)


def test_int8_without_the_kernel_dequantizes_blocks_of_channels(monkeypatch):
    """Where the kernel cannot be built: blocks of 48 channels (the last one partial) over 128."""
    q = Q.QuantizedLinear.from_float(weight(), "int8")
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(kernels, "FMA_ROWS", 4)  # the FMA loop, VNNI or not: float32 activations, as the fallback
    with_kernel = q(x)
    monkeypatch.setattr(Q, "_CHUNK", 48)
    monkeypatch.setattr(kernels, "_OP", False)
    assert kernels.int8_group_matmul(x, q.weight, q.scales) is None
    torch.testing.assert_close(q(x), with_kernel, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q(x).double(), x.double() @ q.dequantize().double().t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", Q.MODES)
def test_embedding_lookup_dequantizes_exactly_the_rows_asked(mode):
    table = Q.QuantizedLinear.from_float(weight(256, 64), mode)
    tokens = torch.tensor([[0, 31, 32, 63], [64, 100, 255, 32]])  # both nibbles, several blocks
    embed = Q.QuantizedEmbedding(table, Q.default_dtype(mode))
    assert torch.equal(embed(tokens), table.dequantize(dtype=Q.default_dtype(mode))[tokens])
    assert embed(tokens).dtype == Q.default_dtype(mode)
    model = Q.quantize(tiny_model(), mode)
    assert model.dtype == Q.default_dtype(mode)  # the activations', read off the norms that stay float


# Random Gaussian weights are int4's worst case (measured: 0.12-0.28); a wrong layout or scale gives ~1.
@pytest.mark.parametrize("mode, tolerance", [("int8", 0.05), ("int4", 0.4)])
@pytest.mark.parametrize("config", [TINY3, gemmakit.PRESETS["gemma-tiny"].replace(n_layers=2)], ids=["gemma3", "gemma1"])
def test_quantized_model_logits_stay_close_to_float(mode, tolerance, config):
    model = tiny_model(config)
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        reference = model(tokens)
        quantized = Q.quantize(copy.deepcopy(model), mode)
        got = quantized(tokens).float()
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    assert LM(quantized, None).num_parameters() == LM(model, None).num_parameters()
    assert isinstance(quantized.embed, Q.QuantizedEmbedding)
    assert (got - reference).norm() / reference.norm() < tolerance


def test_int4_falls_back_to_int8_where_shapes_do_not_pack():
    model = Q.quantize(tiny_model(), "int4")
    attn = model.layers[0].attn
    assert attn.k_proj.mode == "int8"  # 32 outputs: not a multiple of the kernel's 64
    assert attn.q_proj.mode == "int4" and model.embed.table.mode == "int4"


@pytest.mark.parametrize("mode", Q.MODES)
def test_kv_cached_decoding_of_a_quantized_model_equals_its_full_forward(mode):
    model = Q.quantize(tiny_model(), mode)
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))  # past the window of 8
    with torch.inference_mode():
        full = model(tokens).float()
        cache = KVCache(TINY3, batch_size=2, max_len=32, dtype=Q.default_dtype(mode))
        steps = [model(tokens[:, :5], torch.arange(5).expand(2, 5), cache)]  # a prefill chunk
        for t in range(5, 20):
            steps.append(model(tokens[:, t:t + 1], torch.full((2, 1), t), cache))
    cached = torch.cat(steps, dim=1).float()
    torch.testing.assert_close(cached, full, atol=0.05, rtol=0.05)  # bfloat16 activations, different op order
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean() > 0.9  # a random model has near-ties


def test_bad_mode_and_group_size_are_config_errors():
    with pytest.raises(ConfigError, match="int3"):
        Q.quantize(tiny_model(), "int3")
    with pytest.raises(ConfigError, match="group_size"):
        Q.quantize(tiny_model(), "int4", group_size=48)
    with pytest.raises(ConfigError, match="int4 needs"):
        Q.QuantizedLinear(64, 32, "int4")


@pytest.mark.parametrize("mode", Q.MODES)
def test_load_converts_once_then_reads_the_cache(tmp_path, monkeypatch, mode):
    from gemmakit import checkpoints
    from gemmakit.checkpoints import converted, hf

    monkeypatch.setenv("GEMMAKIT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "model"
    hf.save(tiny_model(), source, progress=False)
    tokens = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(4))
    q = Q.Quantization(mode)

    first = gemmakit.load(source, quantize=mode, progress=False)
    assert converted.path(source, q).joinpath("model.safetensors").is_file()
    assert not list(converted.path(source, q).parent.glob(".partial-*"))  # no temporary left behind

    def no_reading(*args, **kwargs):
        raise AssertionError("the cached model should not read the source checkpoint")

    monkeypatch.setattr(checkpoints, "read", no_reading)
    second = gemmakit.load(source, quantize=mode, progress=False)
    assert second.dtype == Q.default_dtype(mode) and second.quantization == mode
    assert torch.equal(second.logits(tokens), first.logits(tokens))
    # A changed source file is a different key: the cache is not trusted for it.
    (source / "config.json").touch()
    assert converted.path(source, q) != converted.path(source, Q.Quantization("int4" if mode == "int8" else "int8"))
    with pytest.raises(AssertionError, match="should not read"):
        gemmakit.load(source, quantize=mode, progress=False)


def test_quantized_load_takes_the_other_model_options(tmp_path, monkeypatch, sentencepiece_model):
    """--quantize with --tokenizer, --variant and --dtype: each one reaches the model or the cache key."""
    from gemmakit.checkpoints import converted, hf
    from gemmakit.tokenizer import Tokenizer

    monkeypatch.setenv("GEMMAKIT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "model"
    hf.save(tiny_model(), source, progress=False)
    assert converted.path(source, Q.Quantization("int8"), variant="gemma-2b") != converted.path(source, Q.Quantization("int8"))
    bf16 = gemmakit.load(source, quantize="int8", dtype="bfloat16", progress=False)
    assert bf16.dtype == torch.bfloat16 and bf16.logits([[2, 3]]).isfinite().all()
    with pytest.raises(ConfigError, match="int4 runs on torch's CPU"):
        gemmakit.load(source, quantize="int4", device="meta", progress=False)
    with pytest.raises(ConfigError, match="unknown quantization mode 'int3'"):
        gemmakit.load(source, quantize="int3", progress=False)
    lm = gemmakit.load(source, quantize="int8", tokenizer=sentencepiece_model, progress=False)
    assert lm.tokenizer.vocab_size == Tokenizer.from_file(sentencepiece_model).vocab_size and lm.quantization == "int8"


def test_int8_keeps_the_real_model_close_to_float32(real_lm):
    """Perplexity on a fixed real text and greedy agreement (teacher-forced) with float32."""
    from pathlib import Path

    text = (Path(__file__).parent / "data" / "gpl3_preamble.txt").read_text()
    ids = torch.tensor([real_lm.tokenizer.encode(text)])  # the whole text: 128 tokens alone swing by +-0.5%
    quantized = LM(Q.quantize(copy.deepcopy(real_lm.module), "int8"), real_lm.tokenizer)

    def nll(lm):
        logits = lm.logits(ids[:, :-1])[0]
        return torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item(), logits.argmax(-1)

    (base, base_top), (got, got_top) = nll(real_lm), nll(quantized)
    assert math.exp(got) / math.exp(base) < 1.01  # measured +0.7% on the whole text (RESULTS.md)
    assert (got_top == base_top).float().mean() > 0.9
