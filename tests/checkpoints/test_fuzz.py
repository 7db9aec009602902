"""The readers under fuzzing (fuzzing.py): every mutated file loads a sound model or is refused with a
one-line error naming it; and the harness itself tells each kind of finding apart."""

import math
import os
import signal
import time

import fuzzing
import gguf
import pytest
import torch

import gemmakit
from gemmakit.errors import CheckpointError, ConfigError

CASES = 240  # ~20-40 s on 2 cores; scripts/fuzz_readers.py runs 10,000


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, sentencepiece_model):
    return fuzzing.make_seeds(tmp_path_factory.mktemp("seeds"), sentencepiece_model)


def test_every_seed_loads_unmutated(seeds):
    for name, path in seeds.items():
        assert fuzzing.run_case(path, 60, fuzzing._vm_bytes() + (1 << 30), fuzzing.LOAD_ARGS.get(name)) == ("loaded", "")


def test_mutated_files_are_loaded_or_refused_by_name(seeds, tmp_path):
    outcomes = fuzzing.fuzz(seeds, tmp_path, range(CASES))
    findings = [o for o in outcomes if o.result in fuzzing.FINDINGS]
    assert not findings, "\n" + "\n".join(f"case {o.case} ({o.seed}) {o.mutation}: {o.result} {o.detail}"
                                          for o in findings)
    # Both ends are reached from every kind of seed: the mutations are neither all harmless nor all fatal.
    for seed in seeds:
        results = {o.result for o in outcomes if o.seed == seed}
        assert "refused" in results, seed
    assert sum(o.result == "loaded" for o in outcomes) >= CASES // 20


@pytest.mark.parametrize("behaviour, expected", [
    ("raise", "foreign"), ("unnamed", "unnamed"), ("nan", "nan"), ("allocate", "memory"), ("segfault", "crash"),
    ("sleep", "hang")])
def test_the_harness_tells_findings_apart(seeds, monkeypatch, behaviour, expected):
    """The child is forked, so a load patched here is the one it runs."""
    real = gemmakit.load

    def load(path, **kwargs):
        if behaviour == "raise":
            raise ValueError("boom")
        if behaviour == "unnamed":
            raise CheckpointError("something is wrong")
        if behaviour == "allocate":
            return torch.empty(1 << 40, dtype=torch.uint8)
        if behaviour == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        if behaviour == "sleep":
            time.sleep(60)
        lm = real(path, **kwargs)
        lm.module.norm.weight.data.fill_(math.nan)
        return lm

    monkeypatch.setattr(gemmakit, "load", load)
    result, _ = fuzzing.run_case(seeds["hf-gemma"], 3, fuzzing._vm_bytes() + (1 << 30))
    assert result == expected


# -- what the fuzzer found, pinned ---------------------------------------------------------------------
def _set_u64(path, offset, value):
    raw = bytearray(path.read_bytes())
    raw[offset: offset + 8] = value.to_bytes(8, "little")
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("offset, words", [
    (lambda t, others: t + 1, "not a multiple of the alignment"),
    (lambda t, others: others, "overlap"),
    (lambda t, others: 2**64 - 1, "not a multiple"),  # the stock reader wraps it round onto the data
    (lambda t, others: 2**40, "truncated or corrupt GGUF file")])
def test_gguf_tensor_offsets_follow_the_format(seeds, tmp_path, offset, words):
    path = tmp_path / "x.gguf"
    path.write_bytes(seeds["gemma2"].read_bytes())
    reader = gguf.GGUFReader(path)
    first, second = reader.tensors[0], reader.tensors[1]
    where = first.field.parts[-1].ctypes.data - reader.data.ctypes.data
    relative = int(first.field.parts[-1][0])
    _set_u64(path, where, offset(relative, int(second.field.parts[-1][0])) % 2**64)
    del reader
    with pytest.raises(CheckpointError, match=f"x.gguf: .*{words}"):
        gemmakit.load(path, quantize=None, compile=None, progress=False)


@pytest.mark.parametrize("kind, words", [
    ("sparse", "not a dense tensor"), ("meta", "without data"), ("quantized", "a quantized tensor"),
    ("int32", "dtype int32"), ("complex", "dtype complex64"), ("int8", "has no weight_scaler"),
    ("scaler", "should hold 512 float scales"), ("nan", "holds NaN or infinite values")])
def test_official_tensors_of_unusual_kinds_are_named(seeds, tmp_path, kind, words):
    folder = tmp_path / "official"
    folder.mkdir()
    source = seeds["official"] / "model.ckpt"
    state = torch.load(source, weights_only=True)["model_state_dict"]
    name = "model.layers.0.mlp.up_proj.weight"
    t = state[name]
    state[name] = {"sparse": lambda: t.to_sparse(), "meta": lambda: torch.empty(t.shape, device="meta"),
                   "quantized": lambda: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8),
                   "int32": lambda: t.to(torch.int32), "complex": lambda: t.to(torch.complex64),
                   "int8": lambda: t.to(torch.int8), "scaler": lambda: t.to(torch.int8),
                   "nan": lambda: t.index_fill(0, torch.tensor([3]), math.inf)}[kind]()
    if kind == "scaler":
        state[name + "_scaler"] = torch.ones(3)
    torch.save({"model_state_dict": state}, folder / "model.ckpt")
    with pytest.raises(CheckpointError, match=f"model.ckpt.*{words}|official.*{words}"):
        gemmakit.load(folder, variant=fuzzing.LOAD_ARGS["official"]["variant"], quantize=None, compile=None,
                      progress=False)


def test_untied_embeddings_and_value_length_are_refused(seeds, tmp_path):
    import json
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(seeds["hf-gemma"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(ConfigError, match="config.json: tie_word_embeddings False"):
        gemmakit.load(folder, quantize=None, compile=None, progress=False)
    path = tmp_path / "v.gguf"
    path.write_bytes(seeds["gemma2"].read_bytes())
    reader = gguf.GGUFReader(path)
    field = reader.fields["gemma2.attention.value_length"]
    where = field.parts[field.data[0]].ctypes.data - reader.data.ctypes.data
    del reader
    raw = bytearray(path.read_bytes())
    raw[where: where + 4] = (32).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match="v.gguf: metadata gemma2.attention.value_length 32 differs from key_length 64"):
        gemmakit.load(path, quantize=None, compile=None, progress=False)
