"""LoRA through the `peft` library, on our own Gemma module: add adapters, merge them into the
weights, save them alone in PEFT's Hugging Face layout (what transformers + peft and vLLM read), or
load such a folder (gemmakit's or peft's) onto a base model for generation."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import hf
from ..config import is_int, is_number
from ..errors import CheckpointError, ConfigError
from ..paths import atomic_path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA needs the peft package: pip install 'gemmakit[train]'") from None
    return peft


def add_lora(model: nn.Module, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
             targets: tuple[str, ...] = TARGETS) -> nn.Module:
    """The same Gemma module with LoRA adapters on `targets`; only the adapters are trainable.

    Returns the Gemma module itself (its Linears replaced by peft's LoRA layers), so it runs
    everywhere a plain model does: forward with positions and a KV cache, generation, saving.
    """
    peft = _peft()
    if rank <= 0:
        raise ConfigError(f"lora rank must be positive, got {rank}")
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ConfigError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                             target_modules=list(targets), bias="none")
    return peft.get_peft_model(model, config).base_model.model


def has_lora(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("peft.") for m in model.modules())


def merge(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weight (W + B A * alpha/r) and drops the adapter layers."""
    peft = _peft()
    for name, module in list(model.named_modules()):
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# peft wraps a transformers *ForCausalLM, whose decoder is `model`: adapter tensors are named
# `base_model.model.model.` + the decoder's module name + `.lora_A.weight` (and lora_B). On a Gemma 3
# multimodal model the text decoder is `model.language_model` (transformers 5) or
# `language_model.model` (transformers 4), which we read too.
HF_PREFIX = "base_model.model.model."
_READ_PREFIXES = ("base_model.model.model.language_model.", "base_model.model.language_model.model.", HF_PREFIX)
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
# adapter_config.json settings whose non-default values gemmakit cannot put on a Gemma.
_UNSUPPORTED = {"modules_to_save": None, "trainable_token_indices": None, "layer_replication": None,
                "target_parameters": None, "alora_invocation_tokens": None, "bias": "none", "lora_bias": False,
                "fan_in_fan_out": False, "use_dora": False}


def _hf_modules(config) -> dict[str, str]:
    """Our module name -> its name in transformers' decoder (`layers.0.attn.q_proj` -> `layers.0.self_attn.q_proj`)."""
    return {ours.removesuffix(".weight"): theirs.removesuffix(".weight")
            for ours, theirs in hf.tensor_names(config).items() if ours.rsplit(".", 2)[-2] in TARGETS}


def save_adapter(model: nn.Module, folder: str | os.PathLike, base_model: str | None = None) -> Path:
    """adapter_model.safetensors + adapter_config.json as peft writes them for the Hugging Face
    export of the base model (`PeftModel.from_pretrained(AutoModelForCausalLM..., folder)` and
    vLLM's LoRA loader read them). `base_model` goes into the config's base_model_name_or_path."""
    peft = _peft()
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(_lora_config(model), task_type="CAUSAL_LM", base_model_name_or_path=base_model,
                                 inference_mode=True)
    names = _hf_modules(model.config)
    state = {}
    for key, tensor in peft.get_peft_model_state_dict(model).items():
        module, sep, rest = key.partition(".lora_")  # layers.0.attn.q_proj . lora_ A.weight
        state[HF_PREFIX + names[module] + sep + rest] = tensor.detach().contiguous().cpu()
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # peft writes the config; we move it in whole
        config.save_pretrained(tmp)
        os.replace(Path(tmp) / CONFIG, folder / CONFIG)
    return folder


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """A base model with a PEFT LoRA adapter folder on it (gemmakit's saves, or peft's own of a
    transformers Gemma): for generation; call merge() to fold it in."""
    peft = _peft()
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file (a LoRA adapter folder holds {CONFIG} and {WEIGHTS})")
    settings = _read_settings(config_path)
    state = _read_tensors(weights_path, model)

    ranks = {name.partition(".lora_")[0]: int(t.shape[0]) for name, t in state.items() if name.endswith("lora_A.weight")}
    names = _hf_modules(model.config)
    alpha_pattern = settings.get("alpha_pattern") or {}
    # peft's own lookup: the first pattern that matches the end of the module's name in transformers.
    alphas = {m: next((a for key, a in alpha_pattern.items() if re.match(rf"(.*\.)?({key})$", "model." + names[m])),
                      settings["lora_alpha"]) for m in ranks}
    config = peft.LoraConfig(
        r=settings["r"], lora_alpha=settings["lora_alpha"], target_modules=sorted(ranks), bias="none",
        use_rslora=bool(settings.get("use_rslora")),
        # Each module's own rank is its tensors'; patterns name modules exactly.
        rank_pattern={re.escape(m): r for m, r in ranks.items() if r != settings["r"]},
        alpha_pattern={re.escape(m): a for m, a in alphas.items() if a != settings["lora_alpha"]})
    model = peft.get_peft_model(model, config).base_model.model  # adapters exactly where the file has tensors
    peft.set_peft_model_state_dict(model, state)
    return model.eval()


def _read_settings(path: Path) -> dict:
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path}: a JSON object was expected")
    if settings.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {settings.get('peft_type')!r}; gemmakit reads LoRA adapters ('LORA')")
    for field, check in (("r", lambda v: is_int(v) and v > 0), ("lora_alpha", lambda v: is_number(v) and v > 0)):
        if not check(settings.get(field)):
            raise CheckpointError(f"{path}: {field} must be a positive number, got {settings.get(field)!r}")
    alphas = settings.get("alpha_pattern") or {}
    if not isinstance(alphas, dict) or not all(is_number(a) and a > 0 for a in alphas.values()):
        raise CheckpointError(f"{path}: alpha_pattern must map module names to positive numbers, got {alphas!r}")
    for key in alphas:
        try:
            re.compile(key)
        except re.error as e:
            raise CheckpointError(f"{path}: alpha_pattern key {key!r} is not a regular expression ({e})") from None
    for field, default in _UNSUPPORTED.items():
        if settings.get(field, default) not in (default, [], {}):
            raise CheckpointError(f"{path}: {field} is {settings[field]!r}; gemmakit supports only {default!r}")
    return settings


def _read_tensors(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The file's tensors under our module names, each pair checked against the projection it adapts."""
    from safetensors import SafetensorError, safe_open

    ours = {theirs: mine for mine, theirs in _hf_modules(model.config).items()}
    state, keys = {}, {}  # our name -> tensor, and -> the file's name for it
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                prefix = next((p for p in _READ_PREFIXES if key.startswith(p)), "")
                module, _, part = key[len(prefix):].partition(".lora_")
                if not prefix or module not in ours or part not in ("A.weight", "B.weight"):
                    raise CheckpointError(f"{path}: tensor {key} is not the lora_A/lora_B weight of a Gemma "
                                          "q/k/v/o/gate/up/down projection, named as peft names them for transformers")
                name = f"{ours[module]}.lora_{part}"
                state[name], keys[name] = f.get_tensor(key), key
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if not state:
        raise CheckpointError(f"{path}: no LoRA tensors")
    for module in {name.partition(".lora_")[0] for name in state}:
        a, b = state.get(module + ".lora_A.weight"), state.get(module + ".lora_B.weight")
        if a is None or b is None:
            key = keys[module + (".lora_B.weight" if a is None else ".lora_A.weight")]
            raise CheckpointError(f"{path}: tensor {key} has no lora_{'A' if a is None else 'B'} beside it")
        out_features, in_features = model.get_submodule(module).weight.shape
        for part, tensor, fits in (("A", a, a.dim() == 2 and a.shape[1] == in_features),
                                   ("B", b, b.dim() == 2 and tuple(b.shape) == (out_features, a.shape[0]))):
            if not fits or not tensor.is_floating_point():
                raise CheckpointError(f"{path}: tensor {keys[f'{module}.lora_{part}.weight']} is {tensor.dtype} "
                                      f"{tuple(tensor.shape)}, which does not fit this model's {out_features}x{in_features} "
                                      "projection (an adapter of another model?)")
    return state


def _lora_config(model: nn.Module):
    peft = _peft()
    for m in model.modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            break
    else:
        raise ConfigError("the model has no LoRA adapters")
    config = getattr(model, "peft_config", None)
    if config:
        return config["default"]
    raise ConfigError("the model's LoRA config was lost")
