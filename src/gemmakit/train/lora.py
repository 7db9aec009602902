"""LoRA through the `peft` library, on our own Gemma module: add adapters, merge them into the
weights, save them alone, or load them onto a base model for generation."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

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


def save_adapter(model: nn.Module, folder: str | os.PathLike) -> Path:
    """adapter_model.safetensors + adapter_config.json, peft's own layout."""
    peft = _peft()
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = _lora_config(model)
    state = peft.get_peft_model_state_dict(model)
    with atomic_path(folder / "adapter_model.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    config.save_pretrained(str(folder))
    return folder


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """A base model with a saved adapter on it (for generation; call merge() to fold it in)."""
    peft = _peft()
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise CheckpointError(f"{folder}: no adapter_config.json + adapter_model.safetensors here")
    config = peft.LoraConfig.from_pretrained(str(folder))
    model = peft.get_peft_model(model, config).base_model.model
    try:
        result = peft.set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    except RuntimeError as e:  # shape mismatch: an adapter of another model
        raise CheckpointError(f"{folder}: adapter does not fit this model ({str(e).splitlines()[0]})") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise CheckpointError(f"{folder}: adapter lacks tensor {missing[0]}")
    return model.eval()


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
