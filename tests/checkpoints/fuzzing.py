"""Fuzzing gemmakit's readers: mutated copies of small files of every format, each loaded in a forked
child under a memory limit and a timeout, so that a crash or a hang is a finding and not a stuck run.

`tests/checkpoints/test_fuzz.py` runs a few hundred cases; `scripts/fuzz_readers.py` runs thousands.
A case is (seed file, mutation); hypothesis is not used for the mutations because a case must be
reproducible from its number alone, in a child process, and shrinking would re-run crashes.

What a case may end in: "loaded" (a model whose logits on a three-token prompt are finite) or
"refused" (a GemmaError whose one-line message names the file). Anything else is a finding:
"foreign" (another exception type), "unnamed" (a GemmaError naming no file), "nan" (loaded, but
the logits are not finite), "memory" (the allocation limit was hit), "crash" (the child died),
"hang" (it ran past the timeout).
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import resource
import select
import shutil
import signal
import struct
import sys
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf import CONFIGS as GGUF_CONFIGS  # noqa: E402
from test_gguf import random_model, write_gguf  # noqa: E402
from test_official import official_state_dict, save_official  # noqa: E402

import gemmakit  # noqa: E402
from gemmakit.config import GemmaConfig  # noqa: E402
from gemmakit.errors import GemmaError  # noqa: E402

FINDINGS = ("foreign", "unnamed", "nan", "memory", "crash", "hang")
EXTREME_INTS = (0, 1, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1, 10**6)
EXTREME_FLOATS = (0.0, -1.0, 1e-45, 1e30, 1e300, float("nan"), float("inf"), float("-inf"))
WEIRD_VALUES = ("256", [1], {"a": 1}, None, True, "", "gemma", [], 2**64, -(2**63), 1.5)


# -- seed files -------------------------------------------------------------------------------------
HF_CONFIG = dict(vocab_size=500, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64,
                 max_seq_len=64)


def make_seeds(root: Path, sentencepiece_model: Path) -> dict[str, Path]:
    """One small file or folder of each kind the readers take."""
    root.mkdir(parents=True, exist_ok=True)
    seeds = {}
    for family in ("gemma", "gemma3"):
        extra = {} if family == "gemma" else dict(sliding_window=8, global_every=2, post_norms=True, qk_norm=True)
        config = GemmaConfig(family=family, **HF_CONFIG, **extra)
        tok = gemmakit.Tokenizer.from_file(sentencepiece_model, family=family)
        lm = gemmakit.LM(random_model(config), tok)
        seeds[f"hf-{family}"] = lm.save(root / f"hf-{family}", progress=False)
    from gemmakit.checkpoints import hf

    sharded = root / "hf-sharded"
    module = random_model(GemmaConfig(family="gemma2", **HF_CONFIG, sliding_window=8, global_every=2,
                                      post_norms=True, attn_logit_softcap=50.0, final_logit_softcap=30.0))
    hf.save(module, sharded, None, progress=False, max_shard_bytes=16 * 1024)
    shutil.copy(sentencepiece_model, sharded / "tokenizer.model")
    seeds["hf-sharded"] = sharded
    for family, quantized in (("gemma3", True), ("gemma2", False)):
        path = root / f"{family}{'-q' if quantized else ''}.gguf"
        write_gguf(path, random_model(GGUF_CONFIGS[family]), sentencepiece_model, quantized=quantized)
        seeds[path.stem] = path
    official = root / "official"  # gemma_pytorch's layout: the .ckpt and tokenizer.model in a folder
    official.mkdir()
    save_official(official_state_dict(random_model(GGUF_CONFIGS["gemma"])), official / "model.ckpt")
    shutil.copy(sentencepiece_model, official / "tokenizer.model")
    seeds["official"] = official
    return seeds


# The .ckpt holds no config: its shapes name a preset, or the user passes the variant, as here.
LOAD_ARGS = {"official": dict(variant=GGUF_CONFIGS["gemma"])}


# -- mutations ----------------------------------------------------------------------------------------
def _flip(raw: bytearray, rng: random.Random, head: int) -> str:
    n = rng.choice((1, 2, 8, 64))
    for _ in range(n):  # mostly in the header, where the structure is
        i = rng.randrange(min(len(raw), head)) if rng.random() < 0.8 else rng.randrange(len(raw))
        raw[i] ^= 1 << rng.randrange(8)
    return f"flip {n} bits"


def _gguf_mutation(path: Path, rng: random.Random) -> str:
    """A structured change of one metadata value or one tensor entry, at its offset in the file."""
    reader = gguf.GGUFReader(path)
    raw = bytearray(path.read_bytes())
    T = gguf.GGUFValueType
    if rng.random() < 0.5:
        name = rng.choice(list(reader.fields))
        field = reader.fields[name]
        if not field.data or field.types[0] == T.ARRAY and len(field.types) > 1 and field.types[1] == T.STRING:
            start = field.offset + 8  # the key's length: a key that runs past the file, or nowhere
            raw[start: start + 8] = struct.pack("<Q", rng.choice(EXTREME_INTS) % 2**64)
            path.write_bytes(bytes(raw))
            return f"key length of {name}"
        part = field.parts[field.data[0]]
        offset = part.ctypes.data - reader.data.ctypes.data
        if field.types[0] == T.ARRAY:  # the count, 8 bytes before the values
            raw[offset - 8: offset] = struct.pack("<Q", rng.choice(EXTREME_INTS) % 2**64)
            what = "count"
        elif part.dtype.kind == "f":
            value = np.array([rng.choice(EXTREME_FLOATS)], dtype=part.dtype)
            raw[offset: offset + part.nbytes] = value.tobytes()
            what = f"value {value[0]}"
        elif part.dtype.kind in "iu":
            value = rng.choice(EXTREME_INTS) % (1 << (8 * part.nbytes))
            raw[offset: offset + part.nbytes] = value.to_bytes(part.nbytes, "little")
            what = f"value {value}"
        else:  # a string's length
            raw[offset - 8: offset] = struct.pack("<Q", rng.choice(EXTREME_INTS) % 2**64)
            what = "string length"
        path.write_bytes(bytes(raw))
        return f"metadata {name}: {what}"
    tensors = reader.tensors
    t = rng.choice(tensors)
    parts = t.field.parts  # name length, name, n_dims, dims, type, offset
    base = reader.data.ctypes.data
    where = {k: parts[i].ctypes.data - base for k, i in (("dims", 3), ("type", 4), ("offset", 5))}
    kind = rng.choice(("offset", "offset", "dims", "type"))
    if kind == "offset":
        other = rng.choice(tensors)
        value = rng.choice((t.data_offset - reader.data_offset + rng.choice((1, 2, 16, 31)),
                            other.data_offset - reader.data_offset, 2**64 - 1, 2**63, len(raw), 0))
        value %= 2**64
        raw[where["offset"]: where["offset"] + 8] = struct.pack("<Q", value)
    elif kind == "dims":
        i = rng.randrange(len(t.shape))
        value = rng.choice(EXTREME_INTS) % 2**64
        raw[where["dims"] + 8 * i: where["dims"] + 8 * i + 8] = struct.pack("<Q", value)
    else:
        value = rng.choice([int(q) for q in gguf.GGMLQuantizationType] + [99, 2**31])
        raw[where["type"]: where["type"] + 4] = struct.pack("<I", value % 2**32)
    path.write_bytes(bytes(raw))
    return f"tensor {t.name}: {kind} {value}"


def _json_mutation(path: Path, rng: random.Random) -> str:
    """One value of a JSON file replaced, a key dropped, or the file nested deeply."""
    data = json.loads(path.read_text())
    if rng.random() < 0.05:
        depth = rng.choice((100, 10_000, 200_000))
        path.write_text("[" * depth + "]" * depth)
        return f"nested {depth} deep"
    node, key = data, None
    while isinstance(node, (dict, list)) and node:  # walk down to a random leaf's parent
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        if not isinstance(node[key], (dict, list)) or rng.random() < 0.4:
            break
        node = node[key]
    if key is None:
        return "nothing to change"
    choice = rng.random()
    if choice < 0.1 and isinstance(node, dict):
        del node[key]
        value = "dropped"
    else:
        value = rng.choice(EXTREME_INTS + EXTREME_FLOATS + WEIRD_VALUES)
        if isinstance(node[key], int) and not isinstance(node[key], bool) and rng.random() < 0.3:
            value = node[key] * rng.choice((10**3, 10**6, -1))
        node[key] = value
    path.write_text(json.dumps(data))  # NaN and Infinity as Python writes them, as some tools do
    return f"{path.name}: {key} = {value!r}"[:120]


def _safetensors_mutation(path: Path, rng: random.Random) -> str:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + n])
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    kind = rng.choice(("dtype", "shape", "offsets", "length"))
    if kind == "dtype":
        entry["dtype"] = rng.choice(("BOOL", "U8", "I8", "I16", "I32", "I64", "F64", "F8_E4M3", "C64", "Q4", 7))
        value = entry["dtype"]
    elif kind == "shape":
        i = rng.randrange(len(entry["shape"])) if entry["shape"] else 0
        value = rng.choice(EXTREME_INTS + (-5,))
        entry["shape"] = entry["shape"][:i] + [value] + entry["shape"][i + 1:]
    elif kind == "offsets":
        start, stop = entry["data_offsets"]
        value = rng.choice(([stop, start], [start, stop + 4], [0, stop - start], [start + 2, stop + 2],
                            [start, 2**64 - 1], [-1, stop]))
        entry["data_offsets"] = value
    else:
        value = rng.choice(EXTREME_INTS) % 2**64
        path.write_bytes(struct.pack("<Q", value) + raw[8:])
        return f"{path.name}: header length {value}"
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    return f"{path.name}: {name} {kind} {value}"[:120]


def _official_mutation(path: Path, rng: random.Random) -> str:
    """A tensor of an unusual kind in an otherwise good checkpoint."""
    state = torch.load(path, weights_only=True)["model_state_dict"]
    name = rng.choice(sorted(state))
    t = state[name]
    kind = rng.choice(("int32", "int64", "bool", "complex", "float64", "meta", "sparse", "quantized", "nan",
                       "scaler", "int8-no-scaler", "shape"))
    if kind in ("int32", "int64", "bool", "float64"):
        state[name] = t.to(getattr(torch, kind))
    elif kind == "complex":
        state[name] = t.to(torch.complex64)
    elif kind == "meta":
        state[name] = torch.empty(t.shape, device="meta")
    elif kind == "sparse":
        state[name] = t.to_sparse()
    elif kind == "quantized":
        state[name] = torch.quantize_per_tensor(t, 0.01, 0, torch.qint8)
    elif kind == "nan":
        t = t.clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice((float("nan"), float("inf")))
        state[name] = t
    elif kind == "scaler":
        state[name.replace(".weight", ".weight_scaler")] = torch.ones(rng.choice((1, 3, 1000)))
    elif kind == "int8-no-scaler":
        state[name] = t.to(torch.int8)
    else:
        state[name] = t.reshape(-1)[: max(1, t.numel() // 2)]
    torch.save({"model_state_dict": state}, path)
    return f"{name}: {kind}"


def mutate(seed: Path, out: Path, rng: random.Random) -> str:
    """A mutated copy of `seed` at `out`; returns what was done."""
    if seed.is_dir():
        shutil.copytree(seed, out)
        file = rng.choice(sorted(p for p in out.iterdir() if p.is_file()))
    else:
        shutil.copy(seed, out)
        file = out
    choice = rng.random()
    if choice < 0.15:
        raw = bytearray(file.read_bytes())
        what = _flip(raw, rng, head=4096)
        file.write_bytes(bytes(raw))
        return f"{file.name}: {what}"
    if choice < 0.25:
        size = file.stat().st_size
        cut = rng.choice((0, 1, 7, 24, rng.randrange(size), size - 1))
        with open(file, "r+b") as f:
            f.truncate(cut)
        return f"{file.name}: truncated to {cut}"
    if file.suffix == ".gguf":
        return _gguf_mutation(file, rng)
    if file.suffix == ".json":
        return _json_mutation(file, rng)
    if file.suffix == ".safetensors":
        return _safetensors_mutation(file, rng)
    if file.suffix == ".ckpt":
        return _official_mutation(file, rng)
    raw = bytearray(file.read_bytes())  # tokenizer.model: bytes only
    what = _flip(raw, rng, head=len(raw))
    file.write_bytes(bytes(raw))
    return f"{file.name}: {what}"


# -- running a case ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    case: int
    seed: str
    mutation: str
    result: str  # "loaded", "refused", or one of FINDINGS
    detail: str = ""


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _child(target: Path, write_fd: int, memory: int, load_args: dict) -> None:
    faulthandler.disable()  # a crash is reported by the parent, not dumped into the run's output
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    torch.set_num_threads(1)
    try:
        lm = gemmakit.load(target, quantize=None, compile=None, progress=False, **load_args)
        ids = [i % lm.config.vocab_size for i in (2, 17, 5)]
        logits = lm.logits(torch.tensor([ids]))
        result = ("loaded", "") if bool(torch.isfinite(logits).all()) else ("nan", "logits not finite")
    except GemmaError as e:
        message = str(e)
        named = target.name in message or any(p.name in message for p in target.parent.glob(target.name + "/*"))
        one_line = "\n" not in message.strip()
        result = ("refused", message) if named and one_line else ("unnamed", message)
    except MemoryError as e:
        result = ("memory", f"MemoryError {e}")
    except BaseException as e:  # noqa: BLE001 - anything else is what the fuzzer looks for
        text = f"{type(e).__name__}: {e}"
        kind = "memory" if "can't allocate memory" in text or "not enough memory" in text else "foreign"
        tail = traceback.extract_tb(e.__traceback__)[-1]
        result = (kind, f"{text[:300]} at {Path(tail.filename).name}:{tail.lineno}")
    os.write(write_fd, json.dumps(result).encode())
    os._exit(0)


def run_case(target: Path, timeout: float, memory: int, load_args: dict | None = None) -> tuple[str, str]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns
        os.close(read_fd)
        try:
            _child(target, write_fd, memory, load_args or {})
        finally:
            os._exit(70)
    os.close(write_fd)
    ready, _, _ = select.select([read_fd], [], [], timeout)
    data = b""
    if ready:
        while chunk := os.read(read_fd, 1 << 16):
            data += chunk
    os.close(read_fd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return "hang", f"no answer within {timeout} s"
    _, status = os.waitpid(pid, 0)
    if data:
        result, detail = json.loads(data)
        return result, detail
    if os.WIFSIGNALED(status):
        return "crash", f"killed by signal {os.WTERMSIG(status)}"
    return "crash", f"exit status {os.WEXITSTATUS(status)} with no answer"


def fuzz(seeds: dict[str, Path], work: Path, cases: range, timeout: float = 20.0,
         memory_slack: int = 1 << 30, progress=None) -> list[Outcome]:
    """Runs `cases` (case k is reproducible from k alone) and returns their outcomes."""
    os.environ.setdefault("GEMMAKIT_COMPILE", "eager")
    os.environ["GEMMAKIT_CACHE"] = str(work / "cache")  # nothing fuzzed reaches the user's cache
    names = sorted(seeds)
    outcomes = []
    for case in cases:
        rng = random.Random(case)
        seed = names[case % len(names)]
        target = work / f"case-{case}{seeds[seed].suffix}"
        mutation = mutate(seeds[seed], target, rng)
        size = sum(p.stat().st_size for p in ([target] if target.is_file() else target.rglob("*")) if p.is_file())
        result, detail = run_case(target, timeout, _vm_bytes() + memory_slack + 8 * size, LOAD_ARGS.get(seed))
        outcomes.append(Outcome(case, seed, mutation, result, detail))
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        if progress is not None:
            progress.update(1)
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    """Outcomes per seed kind, as a Markdown table."""
    counts = {s: Counter(o.result for o in outcomes if o.seed == s) for s in sorted({o.seed for o in outcomes})}
    columns = ("loaded", "refused") + FINDINGS
    lines = ["| seed | cases | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for seed, c in counts.items():
        lines.append(f"| {seed} | {sum(c.values())} | " + " | ".join(str(c[k]) for k in columns) + " |")
    total = Counter(o.result for o in outcomes)
    lines.append(f"| all | {len(outcomes)} | " + " | ".join(str(total[k]) for k in columns) + " |")
    return "\n".join(lines)


def sentencepiece_model(folder: Path) -> Path:
    """The test suite's tiny tokenizer, for the script."""
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from conftest import train_sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    return train_sentencepiece(folder)
