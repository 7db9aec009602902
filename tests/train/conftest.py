"""Small fixtures for the training tests: a corpus of real-looking text, a tiny config, a tokenizer
trained on the corpus, chat data."""

import json
import random

import pytest

from gemmakit.config import GemmaConfig

TINY = dict(family="gemma", vocab_size=384, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32,
            ffn_dim=128, max_seq_len=128)


@pytest.fixture
def tiny_config() -> GemmaConfig:
    return GemmaConfig(**TINY)


@pytest.fixture
def tiny_config_file(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def corpus_text(seed: int, lines: int = 300) -> str:
    rng = random.Random(seed)
    words = "the cat sat on a mat and a dog ran far from home while birds sang old songs".split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))) for _ in range(lines))


@pytest.fixture
def corpus(tmp_path):
    """A folder of three text files and one of code."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(3):
        (folder / f"text{i}.txt").write_text(corpus_text(i))
    (tmp_path / "code.py").write_text("\n".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(200)))
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from gemmakit.train.vocab import train_tokenizer

    return train_tokenizer([corpus_text(0), corpus_text(1)], vocab_size=384)


@pytest.fixture
def chats(tmp_path):
    path = tmp_path / "chat.jsonl"
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(60):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            messages = [{"role": "user", "content": f"what is {a} and {b}"},
                        {"role": "model", "content": f"{a} and {b} is {a + b}"}]
            if i % 3 == 0:
                messages += [{"role": "user", "content": "and the cat"}, {"role": "assistant", "content": "the cat sat"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path
