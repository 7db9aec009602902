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
