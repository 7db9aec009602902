"""The decode step compiled ahead of time (Engine(..., compile="aot"), runtime/aot.py): the tokens are the
model's own greedy choices, its writes land in the engine's cache, and the package is compiled
once per shape and read from disk after that."""

import dataclasses

import pytest
import torch
from test_fast_paths import greedy_margin  # noqa: E402  (tests/ is on sys.path: rootdir conftest)
from test_quantize import TINY3, tiny_model  # noqa: E402

import gemmakit
from gemmakit import Compile, kernels
from gemmakit.errors import ConfigError, GenerationError
from gemmakit.model import quantized as Q
from gemmakit.runtime import aot
from gemmakit.runtime.engine import Engine


def test_aot_engine_decodes_the_models_greedy_tokens_and_reuses_its_package(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMAKIT_CACHE", str(tmp_path))
    # Every int8 product on the float32-activation loop, prefill and the full-forward reference
    # included: the AOT logits then differ from the reference by float32 summation order alone
    # (~1e-5 here), whichever loops this CPU has, so the 1e-3 margin below holds on every machine.
    # Without this the reference's 30-row forward takes the int8 activations' rounding (with
    # VNNI) or the dense blocks (without).
    monkeypatch.setattr(kernels, "FMA_ROWS", 1 << 30)
    monkeypatch.setattr(kernels, "FMA_ROWS_NO_VNNI", 1 << 30)
    model = Q.quantize(tiny_model(dataclasses.replace(TINY3, sliding_window=16), seed=5), "int8")
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 512, (int(n),), generator=gen).tolist() for n in (5, 9, 3)]
    # A ring of 32 (twice the window of 16): spans 2-31 go through one program, 32-63 (the ring
    # full, the global layers still growing) through the other; the second request (9 + 24 tokens)
    # crosses from one to the other (spans are whole multiples of 16 slots: cache.SPAN_STEP).
    engine = Engine(model, None, max_batch=3, max_len=64, compile="aot")
    programs = engine.decode_step.aot.programs
    assert [(lo, hi) for _, lo, hi in programs] == [(2, 31), (32, 63)]
    assert len(list((tmp_path / "aot").glob("decode-*.pt2"))) == 2
    calls = {}
    for i, (runner, lo, hi) in enumerate(programs):
        programs[i] = (lambda *a, r=runner, lo=lo: calls.setdefault(lo, []).append(a[0].shape[0]) or r(*a),
                                   lo, hi)
    requests = [engine.add(p, max_new_tokens=n) for p, n in zip(prompts, (10, 24, 4))]
    steps = 0
    while engine.busy:
        engine.step()
        steps += 1
    assert calls[2][:4] == [3] * 4 and 2 in calls[2]  # the batch shrinks as requests end: a dynamic dim
    assert calls[32] and len(calls[2]) + len(calls[32]) == steps  # every step ran compiled, both sides of the ring
    eager = Engine(model, None, max_batch=3, max_len=64)
    for r in requests:
        assert greedy_margin(model, r.prompt_ids, r.output_ids) < 1e-3
        again = eager.add(r.prompt_ids, max_new_tokens=len(r.output_ids))
        while eager.requests:
            eager.step()
        assert again.output_ids == r.output_ids

    def no_export(*a, **k):
        raise AssertionError("compiled again")

    monkeypatch.setattr(torch.export, "export", no_export)
    Engine(model, None, max_batch=3, max_len=64, compile="aot")  # same shapes: the packages on disk


def test_a_package_is_keyed_by_the_code_it_compiles(tmp_path, monkeypatch):
    from gemmakit.model import KVCache

    model = tiny_model(TINY3, seed=5)
    step = aot._Step(model, KVCache(model.config, 1, 16))
    source = tmp_path / "model.py"
    source.write_text("v1")
    monkeypatch.setattr(aot, "_TRACED", [source])
    first = aot._key(step)
    assert aot._key(step) == first
    source.write_text("v2")  # gemmakit edited or upgraded: its packages compile again
    assert aot._key(step) != first


def test_aot_step_takes_the_spans_its_programs_cover():
    step = aot.AOTDecode([("short", 2, 15), ("long", 16, 39)])
    assert step.usable(2) and step.usable(15) and step.usable(16) and step.usable(39)
    assert not step.usable(1) and not step.usable(40)
    assert step._runner(16) == "long"


def test_aot_rejects_what_it_cannot_build():
    model = tiny_model(TINY3, seed=5)
    with pytest.raises(GenerationError, match="at least 4 positions"):
        Engine(model, None, max_batch=1, max_len=3, compile="aot")
    with pytest.raises(ConfigError, match="compile must be one of eager, torch, aot"):
        Engine(model, None, max_batch=1, max_len=8, compile="yes")
    with pytest.raises(ConfigError, match="compile must be"):
        gemmakit.load("gemma-tiny", compile=True)  # one meaning per word: say which compiler


def test_lm_rounds_an_aot_engines_cache_up_so_that_jobs_share_a_package(monkeypatch):
    lm = gemmakit.load("gemma-tiny", compile="aot")
    assert lm.compile is Compile.AOT
    with pytest.raises(AttributeError):
        lm.compile = "torch"  # fixed at load
    monkeypatch.setattr(aot, "build", lambda module, cache: aot.AOTDecode([]))  # shapes only
    assert lm.engine(1, 20).cache.max_len == 256
    assert lm.engine(1, 300).cache.max_len == min(512, lm.config.max_seq_len)
    assert gemmakit.load("gemma-tiny").engine(1, 20).cache.max_len == 20
