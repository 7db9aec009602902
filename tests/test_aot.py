"""The decode step compiled ahead of time (Engine(..., compile="aot"), aot.py): the tokens are the
model's own greedy choices, its writes land in the engine's cache, and the package is compiled
once per shape and read from disk after that."""

import pytest
import torch

from gemmakit import aot
from gemmakit import quantize as Q
from gemmakit.engine import Engine
from gemmakit.errors import GenerationError

from test_fast_paths import greedy_margin  # noqa: E402  (tests/ is on sys.path: rootdir conftest)
from test_quantize import TINY3, tiny_model  # noqa: E402


def test_aot_engine_decodes_the_models_greedy_tokens_and_reuses_its_package(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMAKIT_CACHE", str(tmp_path))
    model = Q.quantize(tiny_model(TINY3, seed=5), "int8")
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 512, (int(n),), generator=gen).tolist() for n in (5, 9, 3)]
    # A ring of 16 (twice the window of 8): spans up to 15 go through the compiled step, the last
    # steps of the second request (9 + 10 tokens) eagerly.
    engine = Engine(model, None, max_batch=3, max_len=40, compile="aot")
    assert engine._aot.max_span == 15
    assert len(list((tmp_path / "aot").glob("decode-*.pt2"))) == 1
    calls = []
    step = engine._aot.runner
    engine._aot.runner = lambda *a: calls.append(a[0].shape[0]) or step(*a)
    requests = [engine.add(p, max_new_tokens=n) for p, n in zip(prompts, (10, 10, 4))]
    while engine.requests:
        engine.step()
    assert calls[:4] == [3] * 4 and 2 in calls  # the batch shrinks as requests end: a dynamic dim
    assert len(calls) < 10  # and the longest steps ran eagerly
    eager = Engine(model, None, max_batch=3, max_len=40)
    for r in requests:
        assert greedy_margin(model, r.prompt_ids, r.output_ids) < 1e-3
        again = eager.add(r.prompt_ids, max_new_tokens=len(r.output_ids))
        while eager.requests:
            eager.step()
        assert again.output_ids == r.output_ids

    def no_export(*a, **k):
        raise AssertionError("compiled again")

    monkeypatch.setattr(torch.export, "export", no_export)
    Engine(model, None, max_batch=3, max_len=40, compile="aot")  # same shapes: the package on disk


def test_a_package_is_keyed_by_the_code_it_compiles(tmp_path, monkeypatch):
    from gemmakit.cache import KVCache

    model = tiny_model(TINY3, seed=5)
    step = aot._Step(model, KVCache(model.config, 1, 16))
    source = tmp_path / "model.py"
    source.write_text("v1")
    monkeypatch.setattr(aot, "_TRACED", (str(source),))  # an absolute path: read as it is
    first = aot._key(step)
    assert aot._key(step) == first
    source.write_text("v2")  # gemmakit edited or upgraded: its packages compile again
    assert aot._key(step) != first


def test_aot_step_takes_spans_from_2_to_its_max():
    step = aot.AOTDecode(runner=None, max_span=39)
    assert step.usable(2) and step.usable(39) and not step.usable(1) and not step.usable(40)


def test_aot_rejects_what_it_cannot_build():
    model = tiny_model(TINY3, seed=5)
    with pytest.raises(GenerationError, match="at least 4 positions"):
        Engine(model, None, max_batch=1, max_len=3, compile="aot")
    with pytest.raises(GenerationError, match="compile must be"):
        Engine(model, None, max_batch=1, max_len=8, compile="yes")


def test_lm_rounds_an_aot_engines_cache_up_so_that_jobs_share_a_package(monkeypatch):
    import gemmakit

    lm = gemmakit.load("gemma-tiny")
    lm.compile = "aot"
    monkeypatch.setattr(aot, "build", lambda module, cache: aot.AOTDecode(None, 0))  # shapes only
    assert lm._engine(1, 20).cache.max_len == 256
    assert lm._engine(1, 300).cache.max_len == min(512, lm.config.max_seq_len)
    lm.compile = False
    assert lm._engine(1, 20).cache.max_len == 20
