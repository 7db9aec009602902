import pytest
import torch

from gemmakit.config import PRESETS, GemmaConfig, LayerKind, preset

GLOBAL, SLIDING = LayerKind.GLOBAL, LayerKind.SLIDING
from gemmakit.errors import ConfigError
from gemmakit.model import Gemma


@pytest.mark.parametrize("name,count", [
    ("gemma-2b", 2_506_172_416),
    ("gemma-7b", 8_537_680_896),
    ("gemma3-270m", 268_098_176),
    ("gemma-1.1-2b", 2_506_172_416),
    ("codegemma-7b", 8_537_680_896),
])
def test_preset_parameter_counts(name, count):
    with torch.device("meta"):
        model = Gemma(PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == count


def test_every_preset_builds_on_meta():
    for name, config in PRESETS.items():
        with torch.device("meta"):
            Gemma(config)


def test_layer_patterns():
    g2, g3 = preset("gemma2-9b"), preset("gemma3-1b")
    assert g2.layer_kinds[:4] == [SLIDING, GLOBAL, SLIDING, GLOBAL]
    assert [i for i, kind in enumerate(g3.layer_kinds) if kind is GLOBAL] == [5, 11, 17, 23]
    assert set(preset("gemma-7b").layer_kinds) == {GLOBAL}
    assert preset("gemma2-27b").attn_scale == pytest.approx(144 ** -0.5)
    assert preset("gemma2-9b").attn_scale == pytest.approx(256 ** -0.5)


def test_bad_configs_are_rejected():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        GemmaConfig("gemma", 100, 64, 2, 4, 3, 16, 128, 64)
    with pytest.raises(ConfigError, match="family"):
        GemmaConfig("llama", 100, 64, 2, 4, 1, 16, 128, 64)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("gemma-99b")
    with pytest.raises(ConfigError, match="unknown config field 'bogus'"):
        GemmaConfig.from_dict({**PRESETS["gemma-2b"].to_dict(), "bogus": 1})


GOOD = PRESETS["gemma2-2b"].to_dict()


@pytest.mark.parametrize("field,value", [
    ("query_pre_attn_scalar", "256"), ("query_pre_attn_scalar", -256), ("query_pre_attn_scalar", 0),
    ("sliding_window", [1]), ("sliding_window", 0), ("sliding_window", 4096.0), ("sliding_window", True),
    ("family", ["gemma"]), ("norm_eps", None), ("norm_eps", 0.0), ("norm_eps", -1e-6), ("norm_eps", 1e30),
    ("norm_eps", float("nan")), ("norm_eps", "1e-6"),
    ("attn_logit_softcap", [50.0]), ("attn_logit_softcap", "50"), ("attn_logit_softcap", 2**64),
    ("final_logit_softcap", float("inf")), ("final_logit_softcap", -30.0),
    ("rope_theta", 0.0), ("rope_theta", float("inf")), pytest.param("rope_theta", 10**400, id="rope_theta-10**400"), ("rope_theta", None),
    ("rope_theta_global", -1.0), ("rope_scale_global", 0.0),
    ("vocab_size", 2**31), ("vocab_size", True), ("vocab_size", 256_000.0), ("d_model", 2**20),
    ("n_layers", 2**31), ("n_layers", 10**6), ("n_layers", 0), ("head_dim", 2**20), ("ffn_dim", 2**40),
    ("max_seq_len", 2**40), ("n_heads", "8"), ("n_kv_heads", None), ("global_every", -2),
    ("post_norms", "yes"), ("qk_norm", 1),
])
def test_bad_field_types_and_ranges(field, value):
    """Every field's type and range is checked where the config is built, in one line that names the
    field and the value, so that no reader can hand a model a config that fails later."""
    with pytest.raises(ConfigError, match=field) as info:
        GemmaConfig(**{**GOOD, field: value})
    message = str(info.value)
    assert "\n" not in message and len(message) < 200
    if field != "family":  # the family's message lists the known ones
        assert info.value.field == field and "got " in message


def test_field_limits_leave_every_real_gemma_inside():
    for config in PRESETS.values():
        GemmaConfig(**config.to_dict())
    GemmaConfig(**{**GOOD, "norm_eps": 1e-5, "query_pre_attn_scalar": 168.0, "rope_theta": 1e6,
                   "attn_logit_softcap": None, "final_logit_softcap": None, "sliding_window": None})


def test_a_long_bad_value_is_shortened():
    with pytest.raises(ConfigError, match=r"sliding_window .*\.\.\.$"):
        GemmaConfig(**{**GOOD, "sliding_window": list(range(10**5))})
