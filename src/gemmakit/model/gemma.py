"""The Gemma transformer, every family, architecture only.

Gemma 1, 2 and 3 differ only by config fields: norms after attention/MLP (`post_norms`),
soft-caps, the sliding-window layer pattern, QK-norm and per-layer RoPE theta.
No I/O, sampling or tokenizer here: see `checkpoints/`, `runtime/`, `tokenizer.py`. The KV cache's
layout is the cache's own (cache.py); the masks per layer kind are masks.py's; the training head's
cross-entropy is loss.py's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import GemmaConfig, LayerKind
from .cache import KVCache
from .loss import linear_cross_entropy
from .masks import attention_mask


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # stored as w, applied as (1 + w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics and the (1 + w) product in float32, one cast back at the end: casting before
        # the product loses precision in bf16 (the references do the same).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, scale: float = 1.0):
    """cos and sin, each (B, T, head_dim/2) float32, for split-half rotary embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * (inv_freq / scale)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, D); the first half of D rotates with the second half.
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.scale = c.attn_scale
        self.softcap = c.attn_logit_softcap
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.norm_eps) if c.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(c.head_dim, c.norm_eps) if c.qk_norm else nn.Identity()

    def forward(self, x, rope, mask, cache: KVCache | None = None, layer: int = 0, slots=None, decode=False):
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_norm(self.q_proj(x).view(B, T, H, D))
        k = self.k_norm(self.k_proj(x).view(B, T, KV, D))
        v = self.v_proj(x).view(B, T, KV, D)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.write(layer, k, v, slots)  # (B, KV, S, D): the whole cache of this layer
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, KV, T, D)
        # Grouped queries share their K/V head: fold the G query heads of a group into the
        # query-length axis instead of copying K/V per head. mask is (B, 1, G*T, S) to match.
        if mask is None:
            # A plain causal sequence (training, full forward): SDPA's fused causal kernel, which
            # is much faster than a masked one, forward and backward.
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, scale=self.scale,
                                               enable_gqa=KV != H)  # (B, H, T, D)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))
        G = H // KV
        q = q.transpose(1, 2).reshape(B, KV, G * T, D).to(k.dtype)  # (B, KV, G*T, D), in the cache's dtype
        if self.softcap is None:
            # A decode step's few queries read the cache once in gemmakit's kernel; prompts (many
            # queries: torch's blocked kernel is faster) always take torch's, so that a prompt's
            # keys do not depend on how its chunks were cut.
            y = kernels.attend(q, k, v, mask, self.scale) if decode else None
            if y is None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            # Gemma 2 caps the scores after scaling and before the mask; SDPA cannot, so by hand.
            scores = (q @ k.transpose(-1, -2)) * self.scale
            scores = self.softcap * torch.tanh(scores / self.softcap)
            scores = scores.masked_fill(~mask, float("-inf"))
            y = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        y = y.view(B, KV, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D)
        return self.o_proj(y.to(x.dtype))


_GELU_C = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x):
    """GELU, tanh approximation. Under torch.compile it is written as the same function's sigmoid
    form (0.5 (1 + tanh y) = sigmoid(2y)): inductor's CPU tanh is ~2.5x slower than its exp, and
    the GeGLU was the largest fused kernel of a compiled training step."""
    if not torch.compiler.is_compiling():
        return F.gelu(x, approximate="tanh")  # one eager kernel; the sigmoid form would be five
    xf = x.float()
    return (xf * torch.sigmoid(_GELU_C * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        # An int8 model's eager forwards (prefill): one pass; float models keep torch's gelu,
        # whatever else ran in the process.
        y = kernels.geglu(gate, up) if self.gate_proj.weight.dtype == torch.int8 else None
        return self.down_proj(y if y is not None else gelu_tanh(gate) * up)


class Block(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.kind = config.layer_kind(layer)
        d, eps = config.d_model, config.norm_eps
        post = config.post_norms
        self.attn_norm = RMSNorm(d, eps)
        self.attn = Attention(config)
        self.post_attn_norm = RMSNorm(d, eps) if post else nn.Identity()
        self.mlp_norm = RMSNorm(d, eps)
        self.mlp = MLP(config)
        self.post_mlp_norm = RMSNorm(d, eps) if post else nn.Identity()

    def forward(self, x, rope, mask, cache=None, slots=None, decode=False):
        x = x + self.post_attn_norm(self.attn(self.attn_norm(x), rope, mask, cache, self.layer, slots, decode))
        return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))


class TiedEmbedding(nn.Embedding):
    """The token embedding, which is also the output layer (logits = h @ E^T).

    `attend` is the output layer, so that `quantized.py` can swap the table for a quantized one.
    """

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def reset_parameters(self) -> None:
        # Gemma.reset_parameters initialises the table. Skipping nn.Embedding's own normal_ matters
        # on the meta device, where that call imports torch._dynamo (2-3 s of every model load).
        pass


class Gemma(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.embed = TiedEmbedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.kinds = tuple(dict.fromkeys(config.layer_kinds))  # each kind's masks and RoPE are made once a forward
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        if not self.embed.weight.is_meta:
            self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, norm_std: float = 0.0) -> None:
        """Random matrices; norm weights 0 (a scale of 1), or random with norm_std, as tests want
        so that a norm read into the wrong place changes the output."""
        for name, p in self.named_parameters():
            nn.init.normal_(p, std=norm_std if name.endswith("norm.weight") else std)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype: the norms', which stay float when the matrices are quantized."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def decodes_apart(self, cache: KVCache) -> bool:
        """Whether decode steps over `cache` attend in gemmakit's kernel (forward's decode=True)
        while prompts attend in torch's: keys a decode step wrote then differ in their last bits
        from a prompt's keys for the same tokens."""
        return self.config.attn_logit_softcap is None and kernels.attends(cache.k[0].dtype, cache.k[0].device)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False,
                targets: torch.Tensor | None = None, logits: bool = True, hidden: bool = False,
                segments: torch.Tensor | None = None, decode: bool = False) -> torch.Tensor | None:
        """tokens (B, T) -> logits (B, T, V), or (B, 1, V) with last_only; with targets (B, T),
        the summed cross-entropy instead (float32 scalar; targets of -100 carry no loss);
        logits=False: None, for a prefill that only fills the cache (the output layer is the
        largest matrix: 671 MB of float32 for Gemma 3 270M, read for nothing); hidden=True: the
        final norm's output (B, T, d), what the output layer reads (per-sequence log-probs, heads).

        positions (B, T) are absolute; each row may have its own. With a cache, the new keys and
        values are written into it and attention reads the whole cache, masked by position.

        segments (B, T), training rows that pack several documents: each token's document; a token
        attends only within its own (positions should then restart in each: data.collate's).

        decode=True: a decode step (T = 1), whose attention over a bfloat16 CPU cache runs in
        gemmakit's kernel (`kernels.attends`); prompts run torch's.
        """
        c = self.config
        B, T = tokens.shape
        x = self.embed(tokens)
        # The references cast sqrt(d_model) to the activation dtype first (55.5, not 55.43, in bf16).
        x = x * torch.tensor(math.sqrt(c.d_model), dtype=x.dtype)

        # Without a cache, from position 0 and within the window, attention is plainly causal.
        plain_causal = positions is None and cache is None and segments is None and c.attn_logit_softcap is None
        if segments is not None and cache is not None:
            raise ValueError("segments are for a forward without a KV cache (packed training rows)")
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        slots = cache.record(positions) if cache is not None else None
        G = c.n_heads // c.n_kv_heads
        ropes, masks = {}, {}
        for kind in self.kinds:
            sliding = kind is LayerKind.SLIDING
            theta, scale = (c.rope_theta, 1.0) if sliding else (c.global_theta, c.rope_scale_global)
            ropes[kind] = rope_tables(positions, c.head_dim, theta, scale)
            if plain_causal and (not sliding or T <= c.sliding_window):
                masks[kind] = None  # SDPA's own causal kernel, see Attention
            else:
                kv_pos = cache.positions(kind) if cache is not None else positions  # (B, S)
                masks[kind] = attention_mask(kind, positions, kv_pos, c.sliding_window, G, segments)  # (B, 1, G*T, S)
                if c.attn_logit_softcap is None:  # additive, once: SDPA turns a bool mask into it in every layer
                    dtype = cache.k[0].dtype if cache is not None else x.dtype  # what attention runs in
                    masks[kind] = torch.zeros(masks[kind].shape, dtype=dtype, device=x.device).masked_fill_(
                        ~masks[kind], float("-inf"))

        for blk in self.layers:
            x = blk(x, ropes[blk.kind], masks[blk.kind], cache, slots, decode and T == 1)
        if not logits:
            return None
        if last_only:
            x = x[:, -1:]
        if hidden:
            return self.norm(x)
        if targets is not None:  # without ever holding all (B, T, V) logits: see loss.py
            return linear_cross_entropy(self.norm(x), self.embed.weight, targets, c.final_logit_softcap)
        logits = self.embed.attend(self.norm(x))  # (B, T, V): output layer tied to the embedding
        if c.final_logit_softcap is not None:
            logits = c.final_logit_softcap * torch.tanh(logits / c.final_logit_softcap)
        return logits
