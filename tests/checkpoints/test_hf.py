"""Hugging Face folders: small random transformers models read by gemmakit, and gemmakit models
written for transformers, compared logit by logit; bad folders fail with one clear error."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

import gemmakit
from gemmakit.checkpoints import hf
from gemmakit.config import GemmaConfig, LayerKind
from gemmakit.errors import CheckpointError, ConfigError, TokenizerError
from gemmakit.lm import LM
from gemmakit.model import Gemma

VOCAB, T = 500, 40  # sequences of 40 tokens run past the sliding window of 8
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, head_dim=16, max_position_embeddings=128)
HF_CONFIGS = {
    "gemma": lambda: transformers.GemmaConfig(**SMALL, num_hidden_layers=4, num_attention_heads=4,
                                              num_key_value_heads=1),  # MQA
    "gemma2": lambda: transformers.Gemma2Config(
        **SMALL, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
        # Caps small enough to bite at these logit sizes, a query scale that is not head_dim.
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, query_pre_attn_scalar=24),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **SMALL, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2, query_pre_attn_scalar=12,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100_000.0}}),
}
HF_CLASSES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, norms included (their weights are 0 at init, which hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "norm" in name else 0.05))


def hf_model(family: str, seed: int = 0):
    config = HF_CONFIGS[family]()
    config._attn_implementation = "eager"
    model = getattr(transformers, HF_CLASSES[family])(config).eval()
    randomise(model, seed)
    return model


def token_ids(seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def hf_folder(request, tmp_path_factory):
    """(family, transformers model, its saved folder)."""
    model = hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder


# -- reading --------------------------------------------------------------------------------------
def test_reads_transformers_models_float32(hf_folder):
    family, model, folder = hf_folder
    lm = gemmakit.load(folder, progress=False)
    assert lm.config.family == family
    assert (lm.config.layer_kind(0) is LayerKind.SLIDING) == (family != "gemma")
    ids = token_ids()
    assert rel_err(lm.logits(ids), hf_logits(model, ids)) <= 1e-5


def test_reads_transformers_models_bfloat16(hf_folder):
    """bf16 on both sides, judged against the float32 reference: rounding differs between the two
    implementations (fused vs eager attention, op order), so equality is not expected; being no
    less accurate than transformers' own bf16 run is."""
    family, model, folder = hf_folder
    ids = token_ids(1)
    reference = hf_logits(model, ids)
    hf_bf16 = hf_logits(hf_model(family).to(torch.bfloat16), ids)
    ours = gemmakit.load(folder, dtype="bfloat16", progress=False)
    assert ours.dtype == torch.bfloat16
    ours_err = (ours.logits(ids) - reference).abs().max().item()
    hf_err = (hf_bf16 - reference).abs().max().item()
    assert hf_err > 0  # the comparison means something only if bf16 does round
    # A bf16 value carries 8 significant bits (relative step 2**-8 = 0.4%); through a few layers the
    # error grows to a few percent of the logit range (transformers: 1-3% here). 1.5x transformers'
    # own error leaves room for a different rounding order; 5% of the range is a loose ceiling.
    assert ours_err <= 1.5 * hf_err
    assert ours_err <= 0.05 * reference.abs().max().item()


def test_reads_multimodal_gemma3(tmp_path):
    """A Gemma3ForConditionalGeneration folder: text_config and the language model's tensors
    under either prefix; the vision tower is left out."""
    text = dict(HF_CONFIGS["gemma3"]().to_dict(), vocab_size=VOCAB)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3,
                                       eoi_token_index=VOCAB - 2)
    config.text_config._attn_implementation = "eager"
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    randomise(model, 3)
    model.save_pretrained(tmp_path / "saved")
    ids = token_ids(3, vocab=VOCAB - 3)  # no image tokens
    reference = hf_logits(model, ids)
    lm = gemmakit.load(tmp_path / "saved", progress=False)
    assert lm.config.family == "gemma3" and lm.config.rope_scale_global == 4.0
    assert rel_err(lm.logits(ids), reference) <= 1e-5

    # transformers' in-memory names (model.language_model.*), as some tools save them.
    other = tmp_path / "renamed"
    other.mkdir()
    (other / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        tensors = {k.replace("language_model.model.", "model.language_model.").replace("vision_tower.", "model.vision_tower."):
                   f.get_tensor(k).clone() for k in f.keys()}
    assert any(k.startswith("model.language_model.layers.") for k in tensors)
    save_file(tensors, other / "model.safetensors")
    assert rel_err(gemmakit.load(other, progress=False).logits(ids), reference) <= 1e-5


def test_reads_sharded_folder(tmp_path):
    model = hf_model("gemma2", seed=4)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / hf.INDEX).is_file() and not (tmp_path / hf.WEIGHTS).exists()
    ids = token_ids(4)
    assert rel_err(gemmakit.load(tmp_path, progress=False).logits(ids), hf_logits(model, ids)) <= 1e-5


def test_reads_legacy_config_fields(tmp_path):
    """Configs written before transformers 5 (rope_theta, rope_local_base_freq, rope_scaling,
    sliding_window_pattern), and the multimodal Hub configs that leave defaults out."""
    legacy = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 12,
              "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": VOCAB,
              "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window": 512,
              "sliding_window_pattern": 6, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    c = hf.config_from_hf(legacy)
    assert (c.global_every, c.sliding_window, c.rope_theta, c.global_theta, c.rope_scale_global) == (6, 512, 1e4, 1e6, 8.0)
    assert c.query_pre_attn_scalar == 256 and c.max_seq_len == 131_072  # transformers' defaults
    assert hf.config_from_hf(hf.hf_config(c)) == c
    without_local = {k: v for k, v in legacy.items() if k != "rope_local_base_freq"}
    assert hf.config_from_hf(without_local).rope_theta == 10_000.0  # transformers' default, not rope_theta
    gemma1 = hf.config_from_hf({"model_type": "gemma", "hidden_act": "gelu", "vocab_size": 256_000,
                                "hidden_size": 2048, "intermediate_size": 16_384, "num_hidden_layers": 18,
                                "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256,
                                "rope_theta": 10_000.0})
    assert gemma1 == gemmakit.PRESETS["gemma-2b"]
    # The Hub's config.json of Gemma 2 2B (transformers 4.42) and Gemma 3 270M (4.55).
    gemma2 = {"model_type": "gemma2", "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
              "head_dim": 256, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
              "hidden_size": 2304, "intermediate_size": 9216, "max_position_embeddings": 8192,
              "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4,
              "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
              "cache_implementation": "hybrid", "vocab_size": 256000}
    assert hf.config_from_hf(gemma2) == gemmakit.PRESETS["gemma2-2b"]
    gemma3 = {"model_type": "gemma3_text", "_sliding_window_pattern": 6, "attn_logit_softcapping": None,
              "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
              "hidden_size": 640, "intermediate_size": 2048,
              "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3, "max_position_embeddings": 32768,
              "num_attention_heads": 4, "num_hidden_layers": 18, "num_key_value_heads": 1,
              "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
              "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 512,
              "use_bidirectional_attention": False, "vocab_size": 262144}
    assert hf.config_from_hf(gemma3) == gemmakit.PRESETS["gemma3-270m"]


@pytest.mark.parametrize("name", list(gemmakit.PRESETS))
def test_every_preset_survives_the_config_round_trip(name):
    config = gemmakit.PRESETS[name]
    assert hf.config_from_hf(hf.hf_config(config)) == config


def test_peak_memory_while_loading(tmp_path):
    """Loading holds about one copy of the weights (the safetensors are mmapped, not read twice)."""
    lm = gemmakit.load("gemma-small", progress=False)  # ~34M parameters, ~140 MB in float32
    lm.save(tmp_path / "model", progress=False)
    checksum = sum(p.double().sum().item() for p in lm.module.parameters())
    script = textwrap.dedent(f"""
        import json, resource
        import gemmakit, safetensors.torch, tqdm.auto
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        lm = gemmakit.load({str(tmp_path / "model")!r}, progress=False)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        checksum = sum(p.double().sum().item() for p in lm.module.parameters())
        print(json.dumps({{"growth": (after - before) * 1024, "bytes": lm.nbytes(), "checksum": checksum}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bytes"] == lm.nbytes() > 100 * 2**20
    assert result["checksum"] == pytest.approx(checksum, rel=1e-9)  # it did load the weights
    assert result["growth"] <= 1.5 * result["bytes"], result


# -- writing --------------------------------------------------------------------------------------
GEMMAKIT_CONFIGS = {
    "gemma": GemmaConfig(family="gemma", vocab_size=VOCAB, d_model=64, n_layers=4, n_heads=4, n_kv_heads=1,
                         head_dim=16, ffn_dim=128, max_seq_len=128),
    "gemma2": GemmaConfig(family="gemma2", vocab_size=VOCAB, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                          head_dim=16, ffn_dim=128, max_seq_len=128, attn_logit_softcap=2.0,
                          final_logit_softcap=3.0, query_pre_attn_scalar=24, sliding_window=8, global_every=2,
                          post_norms=True),
    "gemma3": GemmaConfig(family="gemma3", vocab_size=VOCAB, d_model=64, n_layers=6, n_heads=4, n_kv_heads=4,
                          head_dim=16, ffn_dim=128, max_seq_len=128, rope_theta_global=1e6, rope_scale_global=8.0,
                          query_pre_attn_scalar=16, sliding_window=8, global_every=3, post_norms=True,
                          qk_norm=True),
}


def random_lm(family: str, tokenizer=None) -> LM:
    module = Gemma(GEMMAKIT_CONFIGS[family]).eval()
    randomise(module, 5)
    return LM(module, tokenizer)


@pytest.mark.parametrize("family", list(GEMMAKIT_CONFIGS))
def test_writes_folders_transformers_reads(family, tmp_path, sentencepiece_model):
    tok = gemmakit.Tokenizer.from_file(sentencepiece_model, family=family)
    lm = random_lm(family, tok)
    out = lm.save(tmp_path / "out", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model",
                                                     "tokenizer_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no temp folder left behind
    theirs = transformers.AutoTokenizer.from_pretrained(out)  # what vLLM and transformers users load
    assert theirs("the lazy fox 123")["input_ids"] == tok.encode("the lazy fox 123")  # <bos> first
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "x"}]
    assert theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == tok.render_chat(chat)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}[family]
    assert config["tie_word_embeddings"] is True and config["eos_token_id"] == tok.eos_id

    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(model).__name__ == HF_CLASSES[family]
    ids = token_ids(6)
    ours = lm.logits(ids)
    assert rel_err(ours, hf_logits(model, ids)) <= 1e-5
    back = gemmakit.load(out, progress=False)
    assert back.config == lm.config
    assert torch.equal(back.logits(ids), ours)
    assert back.tokenizer.encode("the lazy fox 123") == tok.encode("the lazy fox 123")


def test_writes_shards_with_an_index(tmp_path):
    lm = random_lm("gemma2")
    out = hf.save(lm.module, tmp_path / "out", lm.tokenizer, progress=False, max_shard_bytes=64 * 1024)
    index = json.loads((out / hf.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids = token_ids(7)
    assert torch.equal(gemmakit.load(out, progress=False).logits(ids), lm.logits(ids))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert rel_err(lm.logits(ids), hf_logits(model, ids)) <= 1e-5


def test_one_name_table_both_ways():
    for config in GEMMAKIT_CONFIGS.values():
        names = hf.tensor_names(config)
        expected = set(Gemma(config).state_dict())
        assert expected <= set(names)  # every parameter has an HF name...
        assert len(set(names.values())) == len(names)  # ...and no two share one


# -- bad input ------------------------------------------------------------------------------------
@pytest.fixture
def good_folder(tmp_path):
    folder = tmp_path / "good"
    random_lm("gemma3").save(folder, progress=False)
    return folder


def rewrite_tensors(folder, change):
    with safe_open(folder / hf.WEIGHTS, "pt") as f:
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    change(tensors)
    save_file(tensors, folder / hf.WEIGHTS, metadata={"format": "pt"})


def raw_safetensors(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def expect(error, *words):
    """The error of `error`'s type, with every word in its one-line message."""
    return pytest.raises(error, match="(?s)" + "".join(f"(?=.*{w})" for w in words))


def test_missing_and_malformed_files(good_folder):
    (good_folder / "config.json").write_text("{not json")
    with expect(CheckpointError, "config.json", "JSON"):
        hf.read(good_folder)
    (good_folder / "config.json").unlink()
    with expect(CheckpointError, "config.json", "missing"):
        hf.read(good_folder)


def test_missing_weights(good_folder):
    (good_folder / hf.WEIGHTS).unlink()
    with expect(CheckpointError, "good", "model.safetensors"):
        gemmakit.load(good_folder, progress=False)


def test_truncated_safetensors(good_folder):
    path = good_folder / hf.WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with expect(CheckpointError, "model.safetensors", "truncated"):
        gemmakit.load(good_folder, progress=False)
    path.write_bytes(b"\x01\x02")
    with expect(CheckpointError, "model.safetensors", "truncated"):
        gemmakit.load(good_folder, progress=False)


def test_corrupted_safetensors_header(good_folder):
    path = good_folder / hf.WEIGHTS
    data = bytearray(path.read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")  # a header length no file has
    path.write_bytes(bytes(data))
    with expect(CheckpointError, "model.safetensors", "header"):
        gemmakit.load(good_folder, progress=False)
    data[:8] = (100).to_bytes(8, "little")  # cuts the JSON short
    path.write_bytes(bytes(data))
    with expect(CheckpointError, "model.safetensors", "corrupted"):
        gemmakit.load(good_folder, progress=False)


def test_header_claiming_more_than_the_file(good_folder):
    """Sizes and offsets are checked against the file before anything that size is allocated."""
    huge = {"dtype": "F32", "shape": [1_000_000, 100_000], "data_offsets": [0, 400_000_000_000]}
    raw_safetensors(good_folder / hf.WEIGHTS, {"model.embed_tokens.weight": huge}, b"\0" * 64)
    with expect(CheckpointError, "model.safetensors", "model.embed_tokens.weight", "truncated"):
        gemmakit.load(good_folder, progress=False)
    wrong = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}  # 64 bytes of data, 32 claimed
    raw_safetensors(good_folder / hf.WEIGHTS, {"model.norm.weight": wrong}, b"\0" * 64)
    with expect(CheckpointError, "model.safetensors", "model.norm.weight", "shape"):
        gemmakit.load(good_folder, progress=False)


def test_index_problems(tmp_path):
    folder = tmp_path / "sharded"
    hf.save(random_lm("gemma").module, folder, progress=False, max_shard_bytes=64 * 1024)
    index_path = folder / hf.INDEX
    index = json.loads(index_path.read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    # A tensor the index puts in a shard that does not hold it.
    name = next(k for k, v in index["weight_map"].items() if v == first)
    index_path.write_text(json.dumps({"weight_map": {**index["weight_map"], name: second}}))
    with expect(CheckpointError, second, name, "not in this shard"):
        gemmakit.load(folder, progress=False)
    # A shard that is not there.
    (folder / first).unlink()
    index_path.write_text(json.dumps(index))
    with expect(CheckpointError, hf.INDEX, first, "missing"):
        gemmakit.load(folder, progress=False)
    index_path.write_text(json.dumps({"weight_map": {name: "../elsewhere.safetensors"}}))
    with expect(CheckpointError, hf.INDEX, "elsewhere"):
        gemmakit.load(folder, progress=False)
    index_path.write_text("[]")
    with expect(CheckpointError, hf.INDEX):
        gemmakit.load(folder, progress=False)


def test_missing_tensor_and_wrong_shape(good_folder):
    rewrite_tensors(good_folder, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with expect(CheckpointError, "good", r"layers\.2\.mlp\.up_proj"):
        gemmakit.load(good_folder, progress=False)
    rewrite_tensors(good_folder, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(128, 60)}))
    with expect(CheckpointError, "good", r"layers\.2\.mlp\.up_proj", "shape"):
        gemmakit.load(good_folder, progress=False)


def test_bad_configs(good_folder):
    path = good_folder / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "model_type": "llama"}))
    with expect(ConfigError, "config.json", "llama"):
        gemmakit.load(good_folder, progress=False)
    odd = ["sliding_attention", "full_attention", "full_attention", "sliding_attention", "sliding_attention",
           "full_attention"]
    path.write_text(json.dumps({**config, "layer_types": odd}))
    with expect(ConfigError, "config.json", "layer_types"):
        gemmakit.load(good_folder, progress=False)
    path.write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with expect(ConfigError, "config.json", "yarn"):
        gemmakit.load(good_folder, progress=False)
    path.write_text(json.dumps({**config, "num_hidden_layers": "six"}))
    with expect(ConfigError, "config.json", "num_hidden_layers", "six"):
        gemmakit.load(good_folder, progress=False)
    path.write_text(json.dumps({**config, "hidden_size": -64}))
    with expect(ConfigError, "config.json", "-64"):
        gemmakit.load(good_folder, progress=False)


@pytest.mark.parametrize("field,value", [
    ("query_pre_attn_scalar", "256"), ("query_pre_attn_scalar", -16), ("sliding_window", [1]),
    ("model_type", ["gemma"]), ("rms_norm_eps", None), ("rms_norm_eps", 1e30), ("attn_logit_softcapping", [50.0]),
    ("final_logit_softcapping", "30"), ("final_logit_softcapping", 2**64), ("vocab_size", 2**40),
    ("head_dim", 2**20), ("intermediate_size", 2**40), ("hidden_size", True), ("max_position_embeddings", 1.5),
    ("num_hidden_layers", 10**6), ("num_hidden_layers", 2**31), ("num_attention_heads", "4"),
    ("rope_parameters", {"sliding_attention": [1], "full_attention": {}}),
    ("rope_parameters", {"rope_type": "default", "rope_theta": "1e4"}),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 10**400}),
    ("rope_parameters", {"rope_type": "default", "rope_theta": -1.0}),
])
def test_config_values_of_the_wrong_type_or_range(good_folder, field, value):
    """A one-line ConfigError naming config.json and the field, at read time: never a TypeError, a
    hang, or a model whose first logits call fails."""
    path = good_folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with expect(ConfigError, "config.json", "rope" if field == "rope_parameters" else field) as info:
        hf.read(good_folder)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_layer_count_checked_against_the_tensors(good_folder):
    path = good_folder / "config.json"
    config = json.loads(path.read_text())
    del config["layer_types"]  # the pattern (every 3rd layer global) then follows the count
    path.write_text(json.dumps({**config, "num_hidden_layers": 900, "sliding_window_pattern": 3}))
    with expect(CheckpointError, "good", "num_hidden_layers is 900", "hold 6 layers"):
        hf.read(good_folder)


def test_deeply_nested_json(good_folder, tmp_path):
    """A RecursionError in Python's JSON parser becomes the file's CheckpointError."""
    nested = "[" * 100_000 + "]" * 100_000
    config = good_folder / "config.json"
    good_config = config.read_text()
    config.write_text(nested)
    with expect(CheckpointError, "config.json", "nested too deeply"):
        hf.read(good_folder)
    config.write_text(good_config)
    raw = (good_folder / hf.WEIGHTS).read_bytes()
    header = f'{{"__metadata__": {nested}}}'.encode()
    (good_folder / hf.WEIGHTS).write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + int.from_bytes(raw[:8], "little"):])
    with expect(CheckpointError, "model.safetensors", "nested too deeply"):
        hf.read(good_folder)
    folder = tmp_path / "sharded"
    hf.save(random_lm("gemma").module, folder, progress=False, max_shard_bytes=64 * 1024)
    (folder / hf.INDEX).write_text('{"weight_map": ' + nested + "}")
    with expect(CheckpointError, hf.INDEX, "nested too deeply"):
        hf.read(folder)


def test_tokenizer_larger_than_the_embedding(tmp_path, sentencepiece_model):
    tok = gemmakit.Tokenizer.from_file(sentencepiece_model)
    config = GEMMAKIT_CONFIGS["gemma"].replace(vocab_size=tok.vocab_size - 1)
    folder = tmp_path / "small-vocab"
    hf.save(Gemma(config), folder, progress=False)
    tok.save(folder)
    with expect(TokenizerError, "tokenizer.model", str(tok.vocab_size), "embed"):
        gemmakit.load(folder, progress=False)


def test_save_refuses_to_overwrite(good_folder, tmp_path):
    before = sorted(p.name for p in good_folder.iterdir())
    with expect(CheckpointError, "good", "not an empty folder"):
        random_lm("gemma").save(good_folder, progress=False)
    assert sorted(p.name for p in good_folder.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]  # no temp folder left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    random_lm("gemma").save(empty, progress=False)  # an empty folder is fine
    assert (empty / "config.json").is_file()


def test_save_refuses_what_hf_cannot_express(tmp_path):
    config = GEMMAKIT_CONFIGS["gemma"].replace(sliding_window=8, global_every=2)  # Gemma 1 has no window
    with expect(ConfigError, "sliding_window"):
        hf.save(Gemma(config), tmp_path / "out", progress=False)
    assert not list(tmp_path.iterdir())



def test_save_refuses_quantized_models(tmp_path):
    from gemmakit.model.quantized import quantize

    lm = random_lm("gemma")
    with expect(CheckpointError, "out", "quantized"):
        hf.save(quantize(lm.module, "int8"), tmp_path / "out", progress=False)
    assert not list(tmp_path.iterdir())
