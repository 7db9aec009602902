"""gemmakit's own CPU kernels, compiled on first use for the machine they run on.

`int8_group_matmul(x, w, s)`: y = x W^T with W int8 (N, K) and a float16 scale per group of 32
input features (N, K/32) (see int8_matmul.cpp). Torch has no kernel for this layout, and its
per-channel one (`_weight_int8pack_mm`) reads the weights at under half of memory speed.
`softmax_cross_entropy_(z, targets, softcap)`: the training loss's per-block cross-entropy and
its gradient in one pass over the logits, `draw(...)`: sampling's token from each row's
softmax, and `attend(...)`: a decode step's attention over the KV cache (see softmax_rows.cpp);
`geglu(gate, up)`: the MLP's gelu_tanh(gate) * up (geglu.cpp).

The C++ sources are built once with `-march=native` by torch's extension loader (about 10 s,
cached under ~/.cache/torch_extensions). Where they cannot be built (no compiler) or
GEMMAKIT_NO_KERNELS=1, the functions here return None and callers use plain torch instead.
GEMMAKIT_NO_AMX=1 keeps the int8 kernel off the AMX tile unit (VNNI takes its rows, with the same
results).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
import warnings
from functools import lru_cache
from pathlib import Path

import torch

_UNIT = Path(__file__).with_name("kernels.cpp")  # includes the sources, one translation unit
_SOURCES = [Path(__file__).with_name(f) for f in ("int8_matmul.cpp", "softmax_rows.cpp", "geglu.cpp", "vec.h")]
# With VNNI every row count takes int8 activations (per row and group of 32, as llama.cpp's Q8_0)
# and one formula for each output (int8_matmul.cpp), so that a row's result does not depend on the
# rows beside it: a request decodes the same text alone and among others. The VNNI loop and the
# AMX tile unit give the same bits; which one runs is a matter of speed. Output head (262144 x
# 640), 2 threads, ms (a shared 2-core Sapphire Rapids-class VM; FMA and dense: the loops that took
# these rows before, float32 and bfloat16 activations):
#   rows          1     4     8    16    32    64   128   512
#   VNNI        7.8  10.1  12.8  21.4  38.4  87.9   171   722
#   AMX        11.7  12.0  11.9  12.1  29.5  52.4    94   333
#   FMA loop    9.3  10.7  12.5  24.4  59.2   120   229  1322
#   dense        28    31    30    31    41    60    94   290
# The layers' smaller matrices (640 -> 2048 and 2048 -> 640) cross over from VNNI to AMX at 5-6
# rows. Past ~256 rows (prefill) oneDNN's bfloat16 blocks run 1.0-1.3x faster than AMX on the
# layers' matrices (M = 512: 640 -> 2048 1.19 against 1.38 ms, 2048 -> 640 1.19 against 1.57),
# but they round differently, and the rows a prefill call holds depend on the other requests.
FMA_ROWS = 0  # the float32 FMA loop: not with VNNI (tests raise it to compare with float32)
AMX_ROWS = 6  # from how many rows the AMX loop takes the VNNI loop's work, where the CPU has one
# Without AMX the VNNI loop runs a prompt's many rows 2.5-3.5x slower than the dense blocks (head,
# 512 rows: 722 against 290 ms), so above this many rows prompts go to those there (speed first:
# a prompt's keys then depend on how its chunks were cut; decoding rows keep the one formula).
VNNI_MOST_ROWS = 64
# Without VNNI (AVX2 CPUs) nothing takes int8 activations and the FMA loop beats the dense float32
# blocks up to ~16 rows (head, AVX2 EPYC, 2 threads, ms: 8 rows 35.6 against 60.5; 16: 70.7, 70.0).
FMA_ROWS_NO_VNNI = 16


_BUILD = threading.Lock()
_BUILT = False  # whether extension() has returned (the kernels, or None where they cannot build)


@lru_cache(maxsize=None)
def _build(name: str, march: str) -> object | None:
    """torch.ops.<name>, its ops built from the sources for `march` (once, cached under
    ~/.cache/torch_extensions), or None where they cannot be built."""
    from torch.utils.cpp_extension import _get_build_directory, load

    folder = Path(_get_build_directory(name, verbose=False))
    built, lock = folder / f"{name}.so", folder / "lock"
    try:  # torch waits for its build lock without end: one left by a build that died is removed
        if time.time() - lock.stat().st_mtime > _STALE:
            lock.unlink(missing_ok=True)
            warnings.warn(f"gemmakit: removed a stale build lock ({lock})", stacklevel=4)
    except FileNotFoundError:
        pass
    if not built.exists() and name == "gemmakit":
        print("gemmakit: waiting for the build of its CPU kernels started at load" if building() else
              "gemmakit: compiling its CPU kernels for this machine (once, about 10 s)", file=sys.stderr, flush=True)
    try:
        # -fopenmp: at::parallel_for is inlined here and splits work only under OpenMP (the
        # libgomp torch already loaded is the one used, so both share torch's thread pool).
        # torch rebuilds when the files it is given or the flags change: the included sources'
        # digest goes in as a flag.
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES)).hexdigest()[:16]
        load(name, [str(_UNIT)], extra_cflags=["-O3", f"-march={march}", "-fopenmp", f"-DGEMMAKIT_NS={name}",
                                              f"-DGEMMAKIT_SOURCES={digest}"],
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        warnings.warn(f"gemmakit: CPU kernels unavailable ({first}); using slower torch ops", stacklevel=4)
        return None
    ops = getattr(torch.ops, name)

    @torch.library.register_fake(f"{name}::int8_group_matmul")
    def _(x, w, s, fma_rows, amx_rows, vnni_most_rows):  # shapes for torch.compile's tracing
        return x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32)

    @torch.library.register_fake(f"{name}::attend")
    def _(q, k, v, mask, scale):
        return q.new_empty(q.shape, dtype=torch.float32)

    @torch.library.register_fake(f"{name}::geglu")
    def _(gate, up):
        return torch.empty_like(gate)

    return ops


def extension():
    """The kernels built for this machine (torch.ops.gemmakit), or None. Their op
    `int8_group_matmul` is what models call; the loops one at a time (`fma_matmul`, `vnni_matmul`,
    `amx_matmul`, `dense_matmul`), `has_vnni()`, `has_amx()` and `argmax_rows` (`argmax` below) are there for
    tests and this module."""
    if os.environ.get("GEMMAKIT_NO_KERNELS") == "1":
        return None
    global _BUILT
    with _BUILD:  # one build, whichever thread asks first (see build_in_background)
        ops = _build("gemmakit", "native")
        _BUILT = True
        return ops


_STALE = 600  # seconds after which a build lock is taken to be a dead build's (a build takes ~10 s)
_STARTED = False
_BUILDER: subprocess.Popen | None = None


def build_in_background() -> bool:
    """Where the kernels are not built yet, starts building them in a process of its own (once),
    so that a first run compiles them while it reads and converts its checkpoint; whether that
    build is running. A process, not a thread: it finishes the build (and releases torch's build
    lock) even when this one exits first."""
    global _STARTED, _BUILDER
    if _STARTED or _BUILT or os.environ.get("GEMMAKIT_NO_KERNELS") == "1":
        return building()
    _STARTED = True
    from torch.utils.cpp_extension import _get_build_directory

    if not (Path(_get_build_directory("gemmakit", verbose=False)) / "gemmakit.so").exists():
        _BUILDER = subprocess.Popen([sys.executable, "-c", "from gemmakit import kernels; kernels.extension()"],
                                    stdin=subprocess.DEVNULL, start_new_session=True)
    return building()


def building() -> bool:
    """Whether the background build started here is still running."""
    return _BUILDER is not None and _BUILDER.poll() is None


def _ready():
    """The kernels if they are loaded by now, else None without waiting (they start building)."""
    if not _BUILT:
        build_in_background()
        if building():
            return None
    return extension()


# Instruction sets the tests build the same sources for, to run each path on any x86-64 machine
# that has them: AVX-512 without VNNI (its float32 FMA loop), the 256-bit loops of AVX2 CPUs, and
# the portable loops of a compiler on its own.
VARIANTS = {"avx512": "skylake-avx512", "avx2": "x86-64-v3", "portable": "x86-64"}


def variant(kind: str):
    """torch.ops.gemmakit_<kind>: the kernels built for VARIANTS[kind] (None where they cannot be)."""
    return _build(f"gemmakit_{kind}", VARIANTS[kind])


_OP = None  # the op once built; read (not built) inside compiled code
_VNNI = True  # whether the CPU has VNNI; the row counts themselves are read at each call (tests set them)


def int8_group_matmul(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor | None:
    """x (M, K) times int8 w (N, K) with float16 group scales s (N, K/32): (M, N) float32, or None
    where the kernel is unavailable (or the tensors are not on the CPU)."""
    global _OP, _VNNI
    if _OP is None and not torch.compiler.is_compiling():
        ext = extension()
        _OP = ext is not None and ext.int8_group_matmul
        _VNNI = bool(_OP) and ext.has_vnni()
    if not _OP or x.device.type != "cpu":
        return None
    return _OP(x, w, s, fma_rows(_VNNI), AMX_ROWS, VNNI_MOST_ROWS)


def attends(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a decode step over a KV cache of this dtype and device runs `attend` (bfloat16 on
    the CPU, where the kernels build), instead of torch's attention that prefill runs."""
    global _ATTENDS
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    if _ATTENDS is None and not torch.compiler.is_compiling():
        _ATTENDS = extension() is not None
    return bool(_ATTENDS)


_ATTENDS = None  # whether the kernels built, once asked (read, not built, inside compiled code)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor | None:
    """softmax(q k^T * scale + mask) v, float32 (B, KV, Q, D), for a decode step's queries q
    (B, KV, Q, D) against a bfloat16 cache's k, v (B, KV, S, D) under an additive mask (B, 1, Q, S):
    each row's keys and values read once for all its queries, masked slots skipped (see
    softmax_rows.cpp). None where torch's attention runs instead (`attends`)."""
    if not attends(k.dtype, k.device) or q.dtype != k.dtype or mask.dtype != k.dtype:
        return None
    return torch.ops.gemmakit.attend(q, k, v, mask, scale)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """gelu_tanh(gate) * up in one pass (geglu.cpp), for eager forwards without gradients on
    float32 CPU tensors of one shape (an int8 model's MLP asks: model/gemma.py). None where torch's
    ops run: under compilation (inductor fuses them itself), with gradients, or no kernels."""
    if (torch.compiler.is_compiling() or torch.is_grad_enabled() or gate.device.type != "cpu"
            or gate.dtype != torch.float32 or up.dtype != torch.float32 or gate.shape != up.shape):
        return None
    ops = extension()
    return None if ops is None else ops.geglu(gate.contiguous(), up.contiguous())


def fma_rows(vnni: bool) -> int:
    """Up to how many activation rows the float32 FMA loop runs, on a CPU with VNNI or without."""
    return FMA_ROWS if vnni else FMA_ROWS_NO_VNNI


def describe() -> str:
    """Which loop takes how many activation rows on this machine (for `gemmakit bench`)."""
    ext = extension()
    if ext is None:
        return "none: plain torch (no compiler, or GEMMAKIT_NO_KERNELS=1)"
    if not ext.has_vnni():
        return f"float32 FMA up to {fma_rows(False)} rows, dense blocks above"
    amx = f" below {AMX_ROWS}, AMX from {AMX_ROWS} (the same bits)" if ext.has_amx() else ""
    return f"int8 activations at every row count: VNNI{amx}"


def argmax(x: torch.Tensor) -> torch.Tensor | None:
    """The first index of each row's maximum (torch's `x.max(-1).indices`) for float32 CPU rows
    (M, N), 6-8x faster than torch here; None where torch should do it: other dtypes, or the kernel
    not loaded yet (greedy sampling of a float model does not build it just for this)."""
    if not _OP or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or x.stride(-1) != 1:
        return None
    return torch.ops.gemmakit.argmax_rows(x)


def draw(logits: torch.Tensor, rows: torch.Tensor, u: torch.Tensor, inv_t: torch.Tensor,
         min_p: torch.Tensor) -> torch.Tensor | None:
    """A token for each of `rows` (n,) of logits (B, V) float32 or bfloat16, drawn from
    softmax(logits / temperature) by inverse CDF at the uniform u (n,) float64 in [0, 1), with
    inv_t = 1 / temperature and min_p (n,) float32 (0: none); (n,) long. None where torch should do
    it: not on the CPU, another dtype or layout, or the kernels not built yet (they start then)."""
    if logits.device.type != "cpu" or logits.dtype not in (torch.float32, torch.bfloat16) or logits.dim() != 2 \
            or logits.stride(-1) != 1:
        return None
    ops = _ready()
    return None if ops is None else ops.draw_rows(logits, rows, u, inv_t, min_p)


def softmax_cross_entropy_(z: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor | None:
    """Each row's cross-entropy of logits z (n, V) (soft-capped first unless softcap is None)
    against targets (n,), float32 (n,); z is overwritten with d loss / d z. None, z untouched,
    where torch should do it: not on the CPU, neither float32 nor bfloat16, or no kernels."""
    if z.device.type != "cpu" or z.dtype not in (torch.float32, torch.bfloat16) or extension() is None:
        return None
    return torch.ops.gemmakit.softmax_cross_entropy_(z, targets.long(), 0.0 if softcap is None else softcap)
