"""Weight-only int8 and int4 quantization, gpt-fast style: a module swap the model file never sees.

`quantize(module, "int8")` swaps every `nn.Linear` and the tied embedding/output head for modules
that hold integer weights and their scales; norms, attention and the KV cache run in `dtype`.

- int8: symmetric, a float16 scale per group of 32 input features of each output channel (the
  layout of llama.cpp's Q8_0, so the real model's Q8_0 embedding converts without loss). Products
  run in gemmakit's own kernel (`kernels/`), the weights streamed once per step whatever the number
  of rows: where the CPU has VNNI the kernel rounds the activations to int8 per group (Q8_0 x Q8_0)
  at every row count, so a row's result does not depend on the batch; without it, float32
  activations for a few rows and dense blocks for many. Activations default to float32: the
  kernel takes them.
- int4: asymmetric, a scale and a zero per group of `group_size` input features of each output
  channel (`torch.ops.aten._weight_int4pack_mm_for_cpu`, whose packed layout we also read back);
  bfloat16 activations, which that kernel needs.

Converted models are kept on disk by `checkpoints/converted.py`, a checkpoint source like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from .. import kernels
from ..errors import ConfigError
from .gemma import Gemma, TiedEmbedding

MODES = ("int8", "int4")
INT8_GROUP = 32  # int8's group size: the kernel's (and Q8_0's)
_CHUNK = 4096  # output channels dequantized at a time where the kernel is unavailable
_INT4_BLOCK_N = 64  # int4 layers take multiples of 64 output channels (torch packs blocks of 64 or 32: _int4_unpack)
GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class Quantization:
    """How a model's weights are quantized: `mode` "int8" or "int4", int4's `group_size`, and the
    activations' `dtype` (None: the mode's own, see `default_dtype`)."""

    mode: str
    group_size: int = 32
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        _check_mode(self.mode)
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}")
        if self.dtype is None:
            object.__setattr__(self, "dtype", default_dtype(self.mode))


# -- the quantized modules ----------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """y = x W^T with W (out_features, in_features) stored as int8 or int4 with its scales."""

    def __init__(self, in_features: int, out_features: int, mode: str, group_size: int = 32,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None):
        super().__init__()
        _check_mode(mode)
        if mode == "int8":
            group_size = INT8_GROUP
            if in_features % group_size:
                raise ConfigError(f"int8 needs in_features % {group_size} == 0, got {in_features}x{out_features}")
        self.in_features, self.out_features, self.mode, self.group_size = in_features, out_features, mode, group_size
        if mode == "int8":
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, in_features // group_size, dtype=torch.float16,
                                                       device=device))  # (N, K/32)
        else:
            if not int4_fits(in_features, out_features, group_size):
                raise ConfigError(f"int4 needs in_features % group_size == 0 and out_features % {_INT4_BLOCK_N} == 0, "
                                  f"got {in_features}x{out_features} with group_size {group_size}")
            self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
            # (K / group, N, 2): scale and zero of each group; w = (q - 8) * scale + zero
            self.register_buffer("scales", torch.empty(in_features // group_size, out_features, 2, dtype=dtype, device=device))

    @classmethod
    def from_float(cls, weight: torch.Tensor, mode: str, group_size: int = 32,
                   dtype: torch.dtype = torch.bfloat16) -> QuantizedLinear:
        N, K = weight.shape
        q = cls(K, N, mode, group_size, dtype, device=weight.device)
        g = weight.detach().float().view(N, K // q.group_size, q.group_size)
        if mode == "int8":
            # Round the scales to float16 first, so the integers are chosen against the values the
            # kernel will actually use (an all-zero group keeps a zero scale and zero integers).
            scale = (g.abs().amax(-1) / 127).half()  # (N, K/32)
            divisor = torch.where(scale == 0, 1.0, scale.float())
            q.weight.copy_((g / divisor[..., None]).round().clamp(-127, 127).view(N, K).to(torch.int8))
            q.scales.copy_(scale)
        else:
            lo, hi = g.amin(-1), g.amax(-1)  # (N, K/g)
            scale = ((hi - lo) / 15).clamp(min=1e-12)
            # Round scale and zero to the stored dtype first, as for int8.
            scale = scale.to(dtype).float()
            zero = (lo + 8 * scale).to(dtype).float()
            ints = ((g - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(ints.view(N, K).to(torch.int32), 1)
            q.weight.copy_(packed.view(N, K // 2))
            q.scales.copy_(torch.stack([scale, zero], -1).transpose(0, 1))
        return q

    def dequantize(self, rows: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (N, K), or only the output channels `rows` (..., K), in `dtype` (default: the
        int4 activation dtype, float32 for int8)."""
        if self.mode == "int8":
            w, s = (self.weight, self.scales) if rows is None else (self.weight[rows], self.scales[rows])
            groups = w.view(*w.shape[:-1], -1, self.group_size).float() * s.float()[..., None]  # (..., K/32, 32)
            return groups.flatten(-2).to(dtype or torch.float32)
        ints = _int4_unpack(self.weight, self.in_features, rows)  # (..., K) in 0..15
        sz = self.scales if rows is None else self.scales[:, rows]  # (K/g, ..., 2)
        sz = sz.movedim(0, -2).repeat_interleave(self.group_size, dim=-2)  # (..., K, 2)
        return ((ints.to(self.scales.dtype) - 8) * sz[..., 0] + sz[..., 1]).to(dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.mode == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales)
        else:
            y = kernels.int8_group_matmul(x2, self.weight, self.scales)
            if y is None:
                y = self._dequantized_matmul(x2)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def _dequantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T in plain torch, where the kernel is unavailable: W dequantized a block of output
        channels at a time, so no float copy of a whole (large) weight is ever made."""
        y = x.new_empty(x.shape[0], self.out_features)
        for i in range(0, self.out_features, _CHUNK):
            rows = torch.arange(i, min(i + _CHUNK, self.out_features), device=x.device)
            torch.mm(x, self.dequantize(rows, x.dtype).t(), out=y[:, i:i + _CHUNK])
        return y

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, mode={self.mode}, group_size={self.group_size}"


class QuantizedEmbedding(nn.Module):
    """The tied embedding/output head with a quantized table: rows are dequantized when looked up."""

    def __init__(self, table: QuantizedLinear, dtype: torch.dtype):
        super().__init__()
        self.table = table  # (vocab, d_model) as a linear layer d_model -> vocab
        self.dtype = dtype  # of the rows it looks up: the activations'

    @property
    def num_embeddings(self) -> int:
        return self.table.out_features

    @property
    def embedding_dim(self) -> int:
        return self.table.in_features

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.dequantize(tokens, self.dtype)  # (..., d_model)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.table(x)  # (..., vocab)


def int4_fits(in_features: int, out_features: int, group_size: int) -> bool:
    return in_features % group_size == 0 and out_features % _INT4_BLOCK_N == 0 and group_size % 2 == 0


def quantize(module: Gemma, mode: str = "int8", group_size: int = 32, dtype: torch.dtype | None = None) -> Gemma:
    """Swaps the model's linear layers and tied embedding for quantized ones, in place; returns it.

    Norms (and so activations and the KV cache the engine makes) move to `dtype` (default float32
    for int8, bfloat16 for int4). A layer whose shape int4 cannot pack (see `int4_fits`) is
    quantized to int8 instead.
    """
    q = Quantization(mode, group_size, dtype)
    if q.mode == "int4":
        _check_int4_layout()
    _swap(module, lambda w: QuantizedLinear.from_float(w, _layer_mode(q.mode, w, q.group_size), q.group_size,
                                                       q.dtype), q.dtype)
    return module.eval()


def quantization_of(module: nn.Module) -> Quantization | None:
    """How a model is quantized (int4 where any layer is, with its group size), None for a float one."""
    layers = [m for m in module.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        return None
    int4 = next((m for m in layers if m.mode == "int4"), None)
    return Quantization("int4", int4.group_size, module.dtype) if int4 else Quantization("int8", dtype=module.dtype)


def quantized_parameters(module: nn.Module) -> int:
    """The weights the quantized layers hold, counted as the float model's parameters would be."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, QuantizedLinear))


def mode_of(module: nn.Module) -> str | None:
    """"int8" or "int4" for a quantized model (int4 where any layer is), None for a float one."""
    q = quantization_of(module)
    return q.mode if q else None


def default_dtype(mode: str) -> torch.dtype:
    """The activation dtype of a mode: int8's kernel takes float32, torch's int4 kernel bfloat16."""
    return torch.float32 if mode == "int8" else torch.bfloat16


def _layer_mode(mode: str, weight: torch.Tensor, group_size: int) -> str:
    N, K = weight.shape
    return mode if mode == "int8" or int4_fits(K, N, group_size) else "int8"


def _swap(module: Gemma, make, dtype: torch.dtype) -> None:
    """Replaces every nn.Linear and the TiedEmbedding with make(weight), freeing the float weights,
    and moves what stays float (the norms) to `dtype`. Not `module.to(dtype)`: that would also
    convert the int8 layers' float16 scales."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child.weight))
            elif isinstance(child, TiedEmbedding):
                setattr(parent, name, QuantizedEmbedding(make(child.weight), dtype))
    for p in module.parameters():
        p.data = p.data.to(dtype)


def quantized_skeleton(config, q: Quantization) -> Gemma:
    """A quantized model with uninitialised (meta) tensors, for `load_state_dict(..., assign=True)`."""
    with torch.device("meta"):
        module = Gemma(config)
    _swap(module, lambda w: QuantizedLinear(w.shape[1], w.shape[0], _layer_mode(q.mode, w, q.group_size),
                                            q.group_size, q.dtype, device="meta"), q.dtype)
    return module


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown quantization mode {mode!r}; use one of {', '.join(MODES)}")


# -- int4 packed layout -------------------------------------------------------------------------
def _int4_unpack(packed: torch.Tensor, in_features: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The 0..15 integers (N, K), or (..., K) for output channels `rows`, from the kernel's packing.

    `_convert_weight_to_int4pack_for_cpu` lays out each block of b output channels as (K, b/2)
    bytes: byte [k, j] holds channel j in its low nibble and channel b/2 + j in its high nibble,
    with b = 64 where torch runs its AVX-512 kernels and 32 where it runs the AVX2 ones (an AMD
    EPYC with AVX-512 can still be "AVX2" to torch); `_int4_block` finds out which.
    """
    K, b = in_features, _int4_block()
    blocks = packed.view(-1, K, b // 2)  # (N/b, K, b/2)
    if rows is None:
        ints = torch.cat([blocks & 15, blocks >> 4], dim=-1)  # (N/b, K, b)
        return ints.transpose(1, 2).reshape(-1, K)  # (N, K)
    block, j = rows // b, rows % b
    bytes_ = blocks[block, :, j % (b // 2)]  # (..., K)
    return torch.where((j >= b // 2)[..., None], bytes_ >> 4, bytes_ & 15)


@lru_cache(maxsize=None)
def _int4_block() -> int:
    """The output channels per packed block of this torch build on this CPU: 32 where channel 16
    shares byte 0 with channel 0 (its high nibble), else 64 (_check_int4_layout verifies it)."""
    probe = torch.zeros(_INT4_BLOCK_N, 2, dtype=torch.int32)
    probe[16, 0] = 1
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).flatten()
    except (RuntimeError, AttributeError):
        return _INT4_BLOCK_N  # no int4 kernels: _check_int4_layout says so
    return 32 if int(packed[0]) == 16 else _INT4_BLOCK_N


@lru_cache(maxsize=None)
def _check_int4_layout() -> None:
    """Fails early where this torch build packs int4 differently from what _int4_unpack reads."""
    ints = torch.randint(0, 16, (2 * _INT4_BLOCK_N, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(ints, 1)
    except (RuntimeError, AttributeError) as e:
        raise ConfigError(f"int4 needs torch's CPU int4 kernels, which this torch build lacks ({e}); use int8") from None
    if not torch.equal(_int4_unpack(packed, 64).to(torch.int32), ints):
        raise ConfigError(f"int4: torch {torch.__version__} packs int4 weights in an unknown layout; use int8")
