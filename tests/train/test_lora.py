"""gemmakit.train.lora: adapters through peft on our Gemma module."""

import pytest
import torch

from gemmakit.errors import CheckpointError, ConfigError
from gemmakit.model import Gemma
from gemmakit.train import lora


def model(config, seed=0):
    torch.manual_seed(seed)
    m = Gemma(config)
    m.reset_parameters()
    return m


def test_training_changes_only_adapters_and_merge_keeps_logits(tiny_config, tmp_path):
    m = lora.add_lora(model(tiny_config), rank=4, alpha=8)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == set(lora.TARGETS)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, tiny_config.vocab_size, (2, 16))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in trainable if "lora_B" in n or "lora_A" in n} and changed
    assert not any("base_layer" in n or "norm" in n or "embed" in n for n in changed)

    m.eval()
    with torch.no_grad():
        unmerged = m(x)
    lora.save_adapter(m, tmp_path / "adapter")
    merged = lora.merge(m)
    assert not lora.has_lora(merged)
    assert set(merged.state_dict()) == set(model(tiny_config).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged, atol=1e-5, rtol=1e-5)

    # base + saved adapter gives the tuned model back
    reloaded = lora.load_adapter(model(tiny_config), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), unmerged, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(tiny_config)(x), unmerged, atol=1e-4)


def test_bad_lora_settings(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="unknown LoRA target 'lm_head'"):
        lora.add_lora(model(tiny_config), targets=("lm_head",))
    with pytest.raises(CheckpointError, match="adapter_config.json: no such file"):
        lora.load_adapter(model(tiny_config), tmp_path)
    small = lora.add_lora(model(tiny_config), rank=2)
    lora.save_adapter(small, tmp_path / "a")
    bigger = tiny_config.replace(d_model=96)
    with pytest.raises(CheckpointError, match="does not fit"):
        lora.load_adapter(model(bigger), tmp_path / "a")
