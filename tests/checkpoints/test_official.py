"""The gemma_pytorch reader: .ckpt and sharded .bin checkpoints written here in the official layout."""

import json

import pytest
import torch

import gemmakit
from gemmakit import checkpoints
from gemmakit.checkpoints import official
from gemmakit.config import PRESETS, GemmaConfig
from gemmakit.errors import CheckpointError, ConfigError
from gemmakit.model import Gemma

_SMALL = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
              max_seq_len=64)
CONFIGS = {
    "gemma": GemmaConfig(family="gemma", **_SMALL),
    "gemma2": GemmaConfig(family="gemma2", **_SMALL, attn_logit_softcap=50.0, final_logit_softcap=30.0,
                          sliding_window=4, global_every=2, post_norms=True, query_pre_attn_scalar=16),
    "gemma3": GemmaConfig(family="gemma3", **_SMALL, sliding_window=4, global_every=2, post_norms=True,
                          qk_norm=True, rope_theta_global=1_000_000.0),
}
IDS = torch.tensor([[2, 17, 301, 5, 44, 44, 9, 511, 3, 100, 7, 250]])


def random_model(config: GemmaConfig, seed: int = 0) -> Gemma:
    torch.manual_seed(seed)
    model = Gemma(config)
    # Norm weights random too, so that a norm read into the wrong place changes the logits.
    model.reset_parameters(std=0.05, norm_std=0.3)
    return model.eval()


def official_state_dict(module: Gemma) -> dict[str, torch.Tensor]:
    """The module's weights under gemma_pytorch's names (written from gemma/model.py by hand)."""
    c, sd = module.config, module.state_dict()
    out = {"embedder.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(c.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        out[theirs + "self_attn.qkv_proj.weight"] = torch.cat(
            [sd[ours + f"attn.{x}_proj.weight"] for x in "qkv"])  # q heads, then k heads, then v heads
        out[theirs + "self_attn.o_proj.weight"] = sd[ours + "attn.o_proj.weight"]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[theirs + f"mlp.{proj}.weight"] = sd[ours + f"mlp.{proj}.weight"]
        out[theirs + "input_layernorm.weight"] = sd[ours + "attn_norm.weight"]
        if c.post_norms:
            out[theirs + "post_attention_layernorm.weight"] = sd[ours + "post_attn_norm.weight"]
            out[theirs + "pre_feedforward_layernorm.weight"] = sd[ours + "mlp_norm.weight"]
            out[theirs + "post_feedforward_layernorm.weight"] = sd[ours + "post_mlp_norm.weight"]
        else:
            out[theirs + "post_attention_layernorm.weight"] = sd[ours + "mlp_norm.weight"]  # Gemma 1: before the MLP
        if c.qk_norm:
            out[theirs + "self_attn.query_norm.weight"] = sd[ours + "attn.q_norm.weight"]
            out[theirs + "self_attn.key_norm.weight"] = sd[ours + "attn.k_norm.weight"]
    return out


def save_official(state: dict[str, torch.Tensor], path, shards: int = 1):
    """A .ckpt (shards=1), or `shards` .bin files plus pytorch_model.bin.index.json in folder `path`."""
    if shards == 1:
        torch.save({"model_state_dict": state}, path)
        return path
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    files = [f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin" for k in range(shards)]
    weight_map = {name: files[n % shards] for n, name in enumerate(names)}
    for file in files:
        torch.save({n: state[n] for n in names if weight_map[n] == file}, path / file)
    index = path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def logits(module: Gemma) -> torch.Tensor:
    with torch.inference_mode():
        return module(IDS)


@pytest.mark.parametrize("family", CONFIGS)
def test_ckpt_loads_with_identical_logits(tmp_path, family):
    model = random_model(CONFIGS[family])
    path = save_official(official_state_dict(model), tmp_path / "model.ckpt")
    ckpt = official.read(path, variant=CONFIGS[family])
    loaded = checkpoints.build(ckpt, progress=False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(logits(loaded), logits(model))
    assert ckpt.tokenizer is None


@pytest.mark.parametrize("family", CONFIGS)
def test_sharded_bin_with_index_loads_with_identical_logits(tmp_path, family):
    model = random_model(CONFIGS[family], seed=1)
    index = save_official(official_state_dict(model), tmp_path / "shards", shards=3)
    for source in (index, tmp_path / "shards"):  # the index json, or the folder holding it
        loaded = checkpoints.build(official.read(source, variant=CONFIGS[family]), progress=False)
        assert torch.equal(logits(loaded), logits(model))


def test_qkv_is_split_lazily_as_views_of_one_mapped_tensor(tmp_path):
    model = random_model(CONFIGS["gemma"])
    ckpt = official.read(save_official(official_state_dict(model), tmp_path / "m.ckpt"), variant=CONFIGS["gemma"])
    q, k, v = (ckpt.tensors[f"layers.0.attn.{x}_proj.weight"].load() for x in "qkv")
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert torch.equal(torch.cat([q, k, v]), official_state_dict(model)["model.layers.0.self_attn.qkv_proj.weight"])


def test_folder_with_tokenizer_through_gemmakit_load(tmp_path, sentencepiece_model):
    model = random_model(CONFIGS["gemma3"])
    save_official(official_state_dict(model), tmp_path / "gemma3-tiny.ckpt")
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model.read_bytes())
    lm = gemmakit.load(tmp_path, variant=CONFIGS["gemma3"], progress=False)
    assert lm.tokenizer is not None and lm.tokenizer.family == "gemma3"
    assert lm.tokenizer.encode("Hello world") == gemmakit.Tokenizer.from_file(sentencepiece_model).encode("Hello world")
    assert torch.equal(lm.logits(IDS), logits(model))


def test_variant_by_preset_name_and_by_inference(tmp_path, monkeypatch):
    model = random_model(CONFIGS["gemma2"])
    path = save_official(official_state_dict(model), tmp_path / "m.ckpt")
    monkeypatch.setitem(PRESETS, "gemma2-test-tiny", CONFIGS["gemma2"])
    assert official.read(path, variant="gemma2-test-tiny").config == CONFIGS["gemma2"]
    assert official.read(path).config == CONFIGS["gemma2"]  # inferred from the shapes
    lm = gemmakit.load(path, progress=False)
    assert torch.equal(lm.logits(IDS), logits(model))


def _official_shapes(config: GemmaConfig, embedding_rows: int | None = None) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # real preset shapes, no memory
        state = official_state_dict(Gemma(config))
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    if embedding_rows is not None:
        shapes["embedder.weight"] = (embedding_rows, config.d_model)
    return shapes


@pytest.mark.parametrize("name", ["gemma-2b", "gemma-7b", "gemma2-2b", "gemma2-9b", "gemma2-27b", "gemma3-270m",
                                  "gemma3-1b", "gemma-tiny", "gemma-small"])
def test_inference_finds_each_preset_from_its_shapes(name):
    assert official.infer_config(_official_shapes(PRESETS[name])) == PRESETS[name]


def test_inference_accepts_the_padded_embedding():
    assert official.infer_config(_official_shapes(PRESETS["gemma-7b"], embedding_rows=256_128)) == PRESETS["gemma-7b"]


def test_inference_fails_with_a_clear_message_when_no_preset_fits():
    shapes = _official_shapes(CONFIGS["gemma3"])
    with pytest.raises(ConfigError, match=r"no preset fits.*gemma3, d_model 64, 2 layers.*variant="):
        official.infer_config(shapes, "x.ckpt")
    # Too few embedding rows for the 2B's vocabulary.
    with pytest.raises(ConfigError, match="no preset fits"):
        official.infer_config(_official_shapes(PRESETS["gemma-2b"], embedding_rows=1000))


def test_inference_refuses_to_guess_between_presets_with_the_same_shapes(monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny-a", CONFIGS["gemma3"])
    monkeypatch.setitem(PRESETS, "tiny-b", CONFIGS["gemma3"].replace(sliding_window=8))
    with pytest.raises(ConfigError, match=r"several presets fit its shapes \(tiny-a, tiny-b\); pass variant="):
        official.infer_config(_official_shapes(CONFIGS["gemma3"]), "x.ckpt")
    # The same model under two names is not ambiguous.
    monkeypatch.setitem(PRESETS, "tiny-b", CONFIGS["gemma3"])
    assert official.infer_config(_official_shapes(CONFIGS["gemma3"])) == CONFIGS["gemma3"]


def test_padded_embedding_rows_are_dropped(tmp_path):
    model = random_model(CONFIGS["gemma"])
    state = official_state_dict(model)
    state["embedder.weight"] = torch.cat([state["embedder.weight"], torch.randn(128, 64)])
    loaded = checkpoints.build(official.read(save_official(state, tmp_path / "m.ckpt"), variant=CONFIGS["gemma"]),
                               progress=False)
    assert torch.equal(logits(loaded), logits(model))


def test_gemma3_multimodal_names_and_rope_buffers(tmp_path):
    model = random_model(CONFIGS["gemma3"])
    state = official_state_dict(model)
    state["text_token_embedder.weight"] = state.pop("embedder.weight")
    state["siglip_vision_model.encoder.0.weight"] = torch.randn(4, 4)
    state["mm_input_projection.weight"] = torch.randn(64, 4)
    state["local_freqs_cis"] = torch.randn(8, 8)
    loaded = checkpoints.build(official.read(save_official(state, tmp_path / "m.ckpt"), variant=CONFIGS["gemma3"]),
                               progress=False)
    assert torch.equal(logits(loaded), logits(model))


def test_bfloat16_and_int8_checkpoints(tmp_path):
    model = random_model(CONFIGS["gemma"])
    state = official_state_dict(model)
    bf16 = {k: v.bfloat16() for k, v in state.items()}
    loaded = checkpoints.build(official.read(save_official(bf16, tmp_path / "bf16.ckpt"), variant=CONFIGS["gemma"]),
                               progress=False)
    assert loaded.embed.weight.dtype == torch.float32
    assert torch.equal(loaded.layers[1].attn.v_proj.weight, bf16["model.layers.1.self_attn.qkv_proj.weight"][-32:].float())

    # gemma_pytorch's quantized checkpoints: int8 weights and one scale per output row.
    quant = dict(state)
    for name in [n for n in state if n.endswith("proj.weight")]:
        w = state[name]
        scale = w.abs().amax(dim=1) / 127
        quant[name] = torch.round(w / scale[:, None]).to(torch.int8)
        quant[name.removesuffix(".weight") + ".weight_scaler"] = scale
    loaded = checkpoints.build(official.read(save_official(quant, tmp_path / "q.ckpt"), variant=CONFIGS["gemma"]),
                               progress=False)
    qkv = "model.layers.0.self_attn.qkv_proj"
    expected_k = quant[qkv + ".weight"][64:96].float() * quant[qkv + ".weight_scaler"][64:96, None]
    assert torch.equal(loaded.layers[0].attn.k_proj.weight, expected_k)
    assert (loaded.layers[0].attn.k_proj.weight - model.layers[0].attn.k_proj.weight).abs().max() < 2e-3


def test_legacy_torch_format_still_loads(tmp_path):
    model = random_model(CONFIGS["gemma"])
    path = tmp_path / "legacy.ckpt"
    torch.save({"model_state_dict": official_state_dict(model)}, path, _use_new_zipfile_serialization=False)
    loaded = checkpoints.build(official.read(path, variant=CONFIGS["gemma"]), progress=False)
    assert torch.equal(logits(loaded), logits(model))


# -- bad input ------------------------------------------------------------------------------------

@pytest.fixture()
def good_ckpt(tmp_path):
    return save_official(official_state_dict(random_model(CONFIGS["gemma"])), tmp_path / "good.ckpt")


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="nope.ckpt: no such file"):
        official.read(tmp_path / "nope.ckpt", variant=CONFIGS["gemma"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no \.ckpt, \.bin or index json"):
        official.read(tmp_path / "empty", variant=CONFIGS["gemma"])


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_unreadable_files(tmp_path, good_ckpt, damage):
    data = good_ckpt.read_bytes()
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00\xffnot torch" * 50}[damage])
    with pytest.raises(CheckpointError, match=r"bad\.ckpt: not a readable PyTorch checkpoint"):
        official.read(bad, variant=CONFIGS["gemma"])


_UNPICKLED = []


def _record_unpickling():
    _UNPICKLED.append(True)
    return "ran"


class _Payload:
    def __reduce__(self):
        return (_record_unpickling, ())


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path):
    state = official_state_dict(random_model(CONFIGS["gemma"]))
    path = tmp_path / "evil.ckpt"
    torch.save({"model_state_dict": state, "extra": _Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: holds objects other than tensors \(.*_record_unpickling\).*weights only"):
        official.read(path, variant=CONFIGS["gemma"])
    assert not _UNPICKLED


def test_not_a_dict_of_tensors(tmp_path):
    path = tmp_path / "odd.ckpt"
    torch.save({"model_state_dict": {"embedder.weight": [1, 2, 3]}}, path)
    with pytest.raises(CheckpointError, match=r"odd\.ckpt: expected a dict of tensors"):
        official.read(path, variant=CONFIGS["gemma"])


def test_missing_unexpected_and_misshapen_tensors(tmp_path):
    state = official_state_dict(random_model(CONFIGS["gemma"]))

    def read_with(change):
        s = dict(state)
        change(s)
        return checkpoints.build(official.read(save_official(s, tmp_path / "m.ckpt"), variant=CONFIGS["gemma"]),
                                 progress=False)

    with pytest.raises(CheckpointError, match=r"missing tensor layers\.1\.mlp\.up_proj\.weight"):
        read_with(lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.mlp\.extra\.weight"):
        read_with(lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"qkv_proj\.weight has 120 rows, expected 128"):
        read_with(lambda s: s.update({"model.layers.0.self_attn.qkv_proj.weight": torch.zeros(120, 64)}))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.o_proj\.weight has shape \[64, 32\], expected \[64, 64\]"):
        read_with(lambda s: s.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 32)}))
    # A Gemma 2 checkpoint read as Gemma 1: its extra norms do not fit.
    gemma2 = official_state_dict(random_model(CONFIGS["gemma2"]))
    with pytest.raises(CheckpointError, match="unexpected tensor .*pre_feedforward_layernorm.* for a gemma model"):
        official.read(save_official(gemma2, tmp_path / "g2.ckpt"), variant=CONFIGS["gemma"])
    # Inference needs the first layer's tensors.
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.0\.mlp\.gate_proj\.weight"):
        official.read(save_official({k: v for k, v in state.items() if "layers.0.mlp.gate" not in k},
                                    tmp_path / "m2.ckpt"))


def test_unknown_variant(good_ckpt):
    with pytest.raises(ConfigError, match="unknown preset 'gemma-5b'"):
        official.read(good_ckpt, variant="gemma-5b")
    with pytest.raises(ConfigError, match="variant must be a preset name or a GemmaConfig"):
        official.read(good_ckpt, variant=7)
    with pytest.raises(ConfigError, match="no preset fits"):
        official.read(good_ckpt)


def test_bad_shards_and_indexes(tmp_path):
    state = official_state_dict(random_model(CONFIGS["gemma"]))
    index = save_official(state, tmp_path / "s", shards=2)
    # One shard alone lacks the other's tensors.
    with pytest.raises(CheckpointError, match="missing tensor"):
        checkpoints.build(official.read(tmp_path / "s" / "pytorch_model-00001-of-00002.bin", variant=CONFIGS["gemma"]),
                          progress=False)
    # Two weight files and no index: which one?
    (tmp_path / "noindex").mkdir()
    for f in (tmp_path / "s").glob("*.bin"):
        (tmp_path / "noindex" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="several weight files .* and no index"):
        official.read(tmp_path / "noindex", variant=CONFIGS["gemma"])
    # An index naming a tensor its shard does not hold.
    data = json.loads(index.read_text())
    data["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "pytorch_model-00001-of-00002.bin"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"index puts model\.layers\.9\.mlp\.up_proj\.weight in pytorch_model-00001"):
        official.read(index, variant=CONFIGS["gemma"])
    # A missing shard, and an index that is not json.
    (tmp_path / "s" / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="shard pytorch_model-00002-of-00002.bin is missing"):
        official.read(index, variant=CONFIGS["gemma"])
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin\.index\.json: not a valid index json"):
        official.read(tmp_path / "s", variant=CONFIGS["gemma"])
