"""The default mode: quantize="auto" (int8 for a file whose own weights are quantized, the weights
as they are otherwise) and compile="auto" (the AOT step for int8 models, compiled by another
process while this one decodes eagerly; at once where the disk cache has it)."""

import time

import torch
from checkpoints.test_gguf import CONFIGS, random_model, write_gguf  # noqa: E402  (tests/ is on sys.path)
from test_quantize import TINY3, tiny_model  # noqa: E402

import gemmakit
from gemmakit.checkpoints import gguf
from gemmakit.model import quantized as Q
from gemmakit.runtime.engine import Engine


def test_auto_quantizes_a_quantized_gguf_and_leaves_float_files_exact(tmp_path, monkeypatch, sentencepiece_model):
    monkeypatch.setenv("GEMMAKIT_CACHE", str(tmp_path / "cache"))
    model = random_model(CONFIGS["gemma3"])
    write_gguf(tmp_path / "q.gguf", model, sentencepiece_model, quantized=True)
    write_gguf(tmp_path / "f.gguf", model, sentencepiece_model, quantized=False)
    gemmakit.checkpoints.hf.save(model, tmp_path / "hf", progress=False)

    assert gemmakit.load(tmp_path / "q.gguf", progress=False).quantization == "int8"
    assert gemmakit.load(tmp_path / "f.gguf", progress=False).quantization is None  # F32: nothing to gain back
    assert gemmakit.load(tmp_path / "hf", progress=False).quantization is None
    assert gemmakit.load(tmp_path / "q.gguf", quantize=None, progress=False).quantization is None  # the exact mode
    assert gemmakit.load("gemma-tiny").quantization is None  # presets are for experiments: as they are

    def no_header(path):
        raise AssertionError("the decision is remembered: a warm start does not read the header again")

    monkeypatch.setattr(gguf, "stores_quantized", no_header)
    assert gemmakit.load(tmp_path / "q.gguf", progress=False).quantization == "int8"


def test_auto_compile_decodes_eagerly_then_runs_the_compiled_step(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMAKIT_CACHE", str(tmp_path))
    monkeypatch.delenv("GEMMAKIT_COMPILE", raising=False)  # conftest turns the default off for other tests
    model = Q.quantize(tiny_model(TINY3, seed=5), "int8")
    prompt = torch.randint(3, 512, (6,), generator=torch.Generator().manual_seed(6)).tolist()
    eager = Engine(model, None, max_batch=2, max_len=40, compile="eager")
    expected = eager.add(prompt, max_new_tokens=20)
    while eager.busy:
        eager.step()

    threads = torch.get_num_threads()
    engine = Engine(model, None, max_batch=2, max_len=40, compile="auto")
    step = engine.decode_step
    assert step.aot is None and step.background is not None and step.background.process is not None
    assert torch.get_num_threads() == max(1, threads - 1)  # a core for the compiler meanwhile
    deadline = time.monotonic() + 300
    while step.aot is None:  # requests are served, eagerly, while the other process compiles
        assert time.monotonic() < deadline, "the background compile did not finish"
        assert step.background is not None and not step.background.failed
        r = engine.submit(prompt, max_new_tokens=20)
        while engine.busy:
            engine.step()
        assert r.output_ids == expected.output_ids
    assert step.background is None and torch.get_num_threads() == threads

    calls = []
    for i, (runner, lo, hi) in enumerate(step.aot.programs):
        step.aot.programs[i] = (lambda *a, r=runner: calls.append(a[0].shape[0]) or r(*a), lo, hi)
    r = engine.submit(prompt, max_new_tokens=20)
    while engine.busy:
        engine.step()
    assert len(calls) == 20  # every step of this request ran compiled
    assert r.output_ids == expected.output_ids

    # The packages are on disk: the next engine of these shapes runs compiled from its first step.
    again = Engine(model, None, max_batch=2, max_len=40, compile="auto").decode_step
    assert again.aot is not None and again.background is None
    assert not list((tmp_path / "aot").glob("*.building"))  # the build cleaned up after itself


def test_a_failed_background_compile_leaves_the_engine_eager(tmp_path, monkeypatch):
    import sys

    import pytest

    monkeypatch.setenv("GEMMAKIT_CACHE", str(tmp_path))
    monkeypatch.delenv("GEMMAKIT_COMPILE", raising=False)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the compiling process exits 1 at once
    model = Q.quantize(tiny_model(TINY3, seed=5), "int8")
    threads = torch.get_num_threads()
    engine = Engine(model, None, max_batch=1, max_len=40, compile="auto")
    with pytest.warns(UserWarning, match="background compile failed"):
        while engine.decode_step.background is not None:
            engine.submit([2, 5, 7], max_new_tokens=8)
            while engine.busy:
                engine.step()
    assert engine.decode_step.aot is None and torch.get_num_threads() == threads
    assert not list((tmp_path / "aot").glob("*.building"))  # a later run tries again


def test_a_first_run_converts_on_one_thread_while_the_kernels_build(tmp_path, monkeypatch, sentencepiece_model):
    """While the kernels' build runs (a first run), the conversion keeps to one core: torch's
    threads on both would spin against the compiler. Its thread count comes back after."""
    from gemmakit import kernels
    from gemmakit.checkpoints import converted

    monkeypatch.setenv("GEMMAKIT_CACHE", str(tmp_path / "cache"))
    write_gguf(tmp_path / "q.gguf", random_model(CONFIGS["gemma3"]), sentencepiece_model, quantized=True)
    seen = []
    read = converted.read

    def spying(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return read(*args, **kwargs)

    monkeypatch.setattr(converted, "read", spying)
    before = torch.get_num_threads()
    for building in (True, False):
        monkeypatch.setattr(kernels, "build_in_background", lambda b=building: b)
        assert gemmakit.load(tmp_path / "q.gguf", progress=False).quantization == "int8"
        assert torch.get_num_threads() == before
    assert seen == [1, before]
