"""LoRA adapters in PEFT's Hugging Face layout: gemmakit's saves load with transformers + peft onto
the exported base model, peft's saves load onto gemmakit's model, with equal logits; bad adapter
folders get one line naming the file and the tensor or field."""

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from gemmakit.checkpoints import hf
from gemmakit.config import GemmaConfig
from gemmakit.errors import CheckpointError
from gemmakit.model import Gemma
from gemmakit.train import lora

BASE = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64, max_seq_len=64)
CONFIGS = {
    "gemma": GemmaConfig(family="gemma", **BASE),
    "gemma2": GemmaConfig(family="gemma2", **BASE, attn_logit_softcap=5.0, final_logit_softcap=3.0, sliding_window=8,
                          global_every=2, post_norms=True, query_pre_attn_scalar=16),
    "gemma3": GemmaConfig(family="gemma3", **BASE, sliding_window=8, global_every=2, post_norms=True, qk_norm=True,
                          rope_theta_global=1_000_000.0, query_pre_attn_scalar=16),
}
IDS = torch.randint(0, BASE["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(0))  # past the window


def randomise(module, seed, names=None):
    """Every parameter (or those whose name contains one of `names`) random: norms too, LoRA's B too
    (it starts at 0, which would hide a wrongly placed adapter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if names is None or any(n in name for n in names):
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "norm" in name else 0.1))


def base_model(family):
    model = Gemma(CONFIGS[family])
    randomise(model, 1)
    return model.eval()


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family", list(CONFIGS))
def test_gemmakit_adapter_loads_in_peft_with_equal_logits(tmp_path, family):
    ours = base_model(family)
    hf.save(ours, tmp_path / "base", progress=False)  # the base as `gemmakit convert` exports it
    ours = lora.add_lora(ours, rank=4, alpha=12, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    randomise(ours, 2, names=("lora_",))
    lora.save_adapter(ours, tmp_path / "adapter", base_model=str(tmp_path / "base"))

    theirs = peft.PeftModel.from_pretrained(hf_model(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = theirs(input_ids=IDS).logits
        assert rel_err(ours.eval()(IDS), expected) <= 1e-5
        with theirs.disable_adapter():  # the adapter matters at this size
            assert rel_err(theirs(input_ids=IDS).logits, expected) > 1e-2

    # The same file names, tensor names and settings as peft's own save of that model.
    theirs.save_pretrained(tmp_path / "resaved")
    mine = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    again = load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert sorted(mine) == sorted(again)
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in mine
    assert all(torch.equal(mine[k], again[k]) for k in mine)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 12,
        "base_model_name_or_path": str(tmp_path / "base")}
    assert sorted(config["target_modules"]) == ["down_proj", "o_proj", "q_proj", "v_proj"]

    # And gemmakit reads its own save back.
    back = lora.load_adapter(base_model(family), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), ours(IDS), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_peft_adapter_loads_in_gemmakit_with_equal_logits(tmp_path, family):
    hf.save(base_model(family), tmp_path / "base", progress=False)
    # Per-module ranks and alphas, and only some layers: what peft users write.
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "gate_proj", "up_proj"],
                             rank_pattern={"k_proj": 2}, alpha_pattern={"model.layers.1.self_attn.q_proj": 3},
                             layers_to_transform=[1] if family == "gemma3" else None, use_rslora=family == "gemma3",
                             task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf_model(tmp_path / "base"), config)
    randomise(theirs, 3, names=("lora_",))
    theirs.save_pretrained(tmp_path / "adapter")

    ours = lora.load_adapter(base_model(family), tmp_path / "adapter")
    with torch.no_grad():
        assert rel_err(ours(IDS), theirs.eval()(input_ids=IDS).logits) <= 1e-5
    adapted = {n.rsplit(".", 1)[0] for n, _ in ours.named_modules() if n.endswith(".lora_A")}
    layers = [1] if family == "gemma3" else [0, 1]
    assert adapted == {f"layers.{i}.{m}" for i in layers for m in ("attn.q_proj", "attn.k_proj", "mlp.gate_proj",
                                                                    "mlp.up_proj")}


@pytest.fixture
def adapter(tmp_path):
    model = lora.add_lora(base_model("gemma"), rank=2, targets=("q_proj", "v_proj"))
    return lora.save_adapter(model, tmp_path / "adapter")


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensors(folder, change):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
BAD = {
    "no config": (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json: no such file"),
    "no weights": (lambda f: (f / "adapter_model.safetensors").unlink(), "adapter_model.safetensors: no such file"),
    "bad json": (lambda f: (f / "adapter_config.json").write_text("{r: 2"), "adapter_config.json: not valid JSON"),
    "not lora": (lambda f: edit_config(f, peft_type="IA3"), "adapter_config.json: peft_type is 'IA3'"),
    "rank 0": (lambda f: edit_config(f, r=0), "adapter_config.json: r must be a positive number, got 0"),
    "alpha": (lambda f: edit_config(f, lora_alpha="big"), "adapter_config.json: lora_alpha must be a positive number"),
    "alpha pattern": (lambda f: edit_config(f, alpha_pattern={"q_proj(": 2}),
                      r"adapter_config.json: alpha_pattern key 'q_proj\(' is not a regular expression"),
    "saved modules": (lambda f: edit_config(f, modules_to_save=["lm_head"]),
                      r"adapter_config.json: modules_to_save is \['lm_head'\]"),
    "dora": (lambda f: edit_config(f, use_dora=True), "adapter_config.json: use_dora is True"),
    "not safetensors": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x05\x00junk"),
                        "adapter_model.safetensors: not a readable safetensors file"),
    "gemmakit's old names": (
        lambda f: edit_tensors(f, lambda t: t.update({"base_model.model.layers.0.attn.q_proj.lora_A.weight": t.pop(KEY)})),
        "tensor base_model.model.layers.0.attn.q_proj.lora_A.weight is not the lora_A/lora_B weight"),
    "no such layer": (
        lambda f: edit_tensors(f, lambda t: t.update({KEY.replace("layers.0", "layers.7"): t.pop(KEY)})),
        "tensor base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight is not"),
    "lone A": (lambda f: edit_tensors(f, lambda t: t.pop(KEY.replace("lora_A", "lora_B"))),
               f"tensor {KEY} has no lora_B beside it"),
    "wrong shape": (lambda f: edit_tensors(f, lambda t: t.update({KEY: torch.zeros(2, 48)})),
                    rf"tensor {KEY} is torch.float32 \(2, 48\), which does not fit this model's 64x32 projection"),
    "no tensors": (lambda f: edit_tensors(f, lambda t: t.clear()), "adapter_model.safetensors: no LoRA tensors"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_folders_get_one_line(adapter, case):
    spoil, message = BAD[case]
    spoil(adapter)
    with pytest.raises(CheckpointError, match=message) as caught:
        lora.load_adapter(base_model("gemma"), adapter)
    assert "\n" not in str(caught.value) and str(adapter) in str(caught.value)
