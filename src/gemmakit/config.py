"""GemmaConfig: one frozen dataclass for every Gemma family, and the published presets.

Families differ only by fields here (norm placement, soft-caps, sliding-window pattern, QK-norm,
per-layer RoPE theta, query scale); `model.py` reads the fields and never the family name.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from dataclasses import dataclass

from .errors import ConfigError, GemmaError


class LayerKind(enum.Enum):
    """How far a layer's attention reaches: every earlier token, or the last `sliding_window`.
    Masks, RoPE tables and the KV cache's layout are made once per kind and picked by each layer's."""

    GLOBAL = "global"
    SLIDING = "sliding"


@dataclass(frozen=True)
class GemmaConfig:
    family: str  # "gemma" (1, 1.1, CodeGemma), "gemma2" or "gemma3"; for file formats and chat
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int  # width of gate (and of up); the report counts the two together
    max_seq_len: int
    norm_eps: float = 1e-6
    rope_theta: float = 10_000.0  # sliding layers, and every layer when there are no sliding layers
    rope_theta_global: float | None = None  # Gemma 3 global layers (None: same as rope_theta)
    rope_scale_global: float = 1.0  # linear position scaling on global layers (Gemma 3 4B and up)
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5; None: head_dim
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None  # a token sees itself and the window - 1 tokens before it
    global_every: int = 1  # layer i is global when (i + 1) % global_every == 0
    post_norms: bool = False  # Gemma 2/3: norms after attention and after the MLP too
    qk_norm: bool = False  # Gemma 3: RMSNorm over head_dim on queries and keys

    def __post_init__(self) -> None:
        if not isinstance(self.family, str) or self.family not in FAMILIES:
            raise _invalid("family", self.family, f"is not one of {', '.join(FAMILIES)}")
        for name, most in INT_LIMITS.items():
            value = getattr(self, name)
            if not is_int(value) or not 0 < value <= most:
                raise _invalid(name, value, f"must be a positive integer (at most {most:,})")
        for name, (optional, most) in REAL_LIMITS.items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not is_number(value) or not 0 < value <= most:
                bound = f"{most:,.0f}" if most >= 1 else f"{most:g}"
                rule = f"must be a number above 0 and at most {bound}" + (" (or null)" if optional else "")
                raise _invalid(name, value, rule)
        if self.sliding_window is not None and (not is_int(self.sliding_window)
                                                or not 0 < self.sliding_window <= INT_LIMITS["max_seq_len"]):
            raise _invalid("sliding_window", self.sliding_window,
                           f"must be null or a positive integer (at most {INT_LIMITS['max_seq_len']:,})")
        for name in ("post_norms", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise _invalid(name, getattr(self, name), "must be true or false")
        if self.n_heads % self.n_kv_heads:
            raise _invalid("n_kv_heads", self.n_kv_heads, f"does not divide n_heads {self.n_heads}",
                           f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise _invalid("head_dim", self.head_dim, "must be even for RoPE")

    def layer_kind(self, layer: int) -> LayerKind:
        sliding = self.sliding_window is not None and (layer + 1) % self.global_every != 0
        return LayerKind.SLIDING if sliding else LayerKind.GLOBAL

    @property
    def layer_kinds(self) -> list[LayerKind]:
        return [self.layer_kind(i) for i in range(self.n_layers)]

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def global_theta(self) -> float:
        return self.rope_theta_global or self.rope_theta

    def replace(self, **changes) -> GemmaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GemmaConfig:
        check_fields(cls, data, ConfigError, "config field")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"incomplete config: {e}") from None


def check_fields(cls, values, error: type[GemmaError], what: str) -> None:
    """Refuses names in `values` that are not fields of the dataclass `cls`, naming the first and
    the known ones: every dataclass built from user input (configs, sampling, training settings)."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise error(f"unknown {what} {unknown[0]!r}; known: {', '.join(names)}")


def check_positive_ints(obj, names, error: type[GemmaError]) -> None:
    """Refuses the first of the settings `names` of `obj` that is not a positive integer (a bool is not)."""
    for name in names:
        value = getattr(obj, name)
        if not is_int(value) or value <= 0:
            raise error(f"{name} must be a positive integer, got {value!r}")


FAMILIES = ("gemma", "gemma2", "gemma3")

# Upper bounds on the sizes, orders of magnitude above every published Gemma (vocabulary 262,144,
# d_model 5,376, 62 layers, 32 heads, head_dim 256, ffn 36,864, context 131,072): a file that claims
# more is corrupt, and is refused here before a model of that size is built, even on the meta device.
INT_LIMITS = {"vocab_size": 2**20, "d_model": 2**16, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
               "head_dim": 1024, "ffn_dim": 2**20, "max_seq_len": 2**21, "global_every": 1025}
# Numbers that must be finite and above 0: field -> (None allowed, upper bound). Gemma's epsilon is
# 1e-6 (other models use up to 1e-5): 1e-2 would already swamp the mean square of small activations.
# Soft-caps are 30 and 50, the query scalar 144 or 256, RoPE bases 1e4 and 1e6, the RoPE factor 8.
REAL_LIMITS = {"norm_eps": (False, 1e-2), "rope_theta": (False, 1e12), "rope_theta_global": (True, 1e12),
                "rope_scale_global": (False, 1e3), "query_pre_attn_scalar": (True, 2.0**20),
                "attn_logit_softcap": (True, 1e6), "final_logit_softcap": (True, 1e6)}


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float (not bool, str or a list); an int too large for a float is not."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def short_repr(value, most: int = 60) -> str:
    shown = repr(value)
    return shown if len(shown) <= most else shown[: most - 3] + "..."


def _invalid(field: str, value, rule: str, message: str | None = None) -> ConfigError:
    """A ConfigError naming the field and its value (shortened: a fuzzed file may hold a long list);
    `field` is kept on the error so that a reader can add the name its file format uses."""
    error = ConfigError(message or f"{field} {rule}, got {short_repr(value)}")
    error.field = field
    return error

_GEMMA1_2B = GemmaConfig(family="gemma", vocab_size=256_000, d_model=2048, n_layers=18, n_heads=8,
                         n_kv_heads=1, head_dim=256, ffn_dim=16_384, max_seq_len=8192)
_GEMMA1_7B = GemmaConfig(family="gemma", vocab_size=256_000, d_model=3072, n_layers=28, n_heads=16,
                         n_kv_heads=16, head_dim=256, ffn_dim=24_576, max_seq_len=8192)
_GEMMA2 = dict(family="gemma2", vocab_size=256_000, head_dim=256, max_seq_len=8192,
               attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096,
               global_every=2, post_norms=True)
_GEMMA3 = dict(family="gemma3", vocab_size=262_144, n_heads=4, n_kv_heads=1, head_dim=256,
               max_seq_len=32_768, rope_theta_global=1_000_000.0, query_pre_attn_scalar=256,
               sliding_window=512, global_every=6, post_norms=True, qk_norm=True)

PRESETS: dict[str, GemmaConfig] = {
    "gemma-2b": _GEMMA1_2B,
    "gemma-7b": _GEMMA1_7B,
    "gemma-1.1-2b": _GEMMA1_2B,
    "gemma-1.1-7b": _GEMMA1_7B,
    "codegemma-2b": _GEMMA1_2B,
    "codegemma-7b": _GEMMA1_7B,
    "gemma2-2b": GemmaConfig(**_GEMMA2, d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4,
                             ffn_dim=9216, query_pre_attn_scalar=256),
    "gemma2-9b": GemmaConfig(**_GEMMA2, d_model=3584, n_layers=42, n_heads=16, n_kv_heads=8,
                             ffn_dim=14_336, query_pre_attn_scalar=256),
    # 27B is the one model whose query scale is not head_dim: (d_model / n_heads) ** -0.5.
    "gemma2-27b": GemmaConfig(**{**_GEMMA2, "head_dim": 128}, d_model=4608, n_layers=46, n_heads=32,
                              n_kv_heads=16, ffn_dim=36_864, query_pre_attn_scalar=144),
    "gemma3-270m": GemmaConfig(**_GEMMA3, d_model=640, n_layers=18, ffn_dim=2048),
    "gemma3-1b": GemmaConfig(**_GEMMA3, d_model=1152, n_layers=26, ffn_dim=6912),
    # Small models for experiments and tests: Gemma 1 architecture, own small vocabulary.
    "gemma-tiny": GemmaConfig(family="gemma", vocab_size=8192, d_model=256, n_layers=6, n_heads=4,
                              n_kv_heads=1, head_dim=64, ffn_dim=1024, max_seq_len=1024),
    "gemma-small": GemmaConfig(family="gemma", vocab_size=8192, d_model=512, n_layers=8, n_heads=8,
                               n_kv_heads=1, head_dim=64, ffn_dim=2048, max_seq_len=1024),
}


def preset(name: str) -> GemmaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
