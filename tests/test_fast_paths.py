"""The fast paths users get (quantized weights) through the generation engine: every token the
engine picks is the model's own greedy choice, whichever kernel ran (int8 activations on VNNI,
or AMX from AMX_ROWS rows; without VNNI the FMA loop for a few rows and dense blocks for many;
torch's int4 kernel)."""

import pytest
import torch
from test_quantize import TINY3, tiny_model  # noqa: E402  (tests/ is on sys.path: rootdir conftest)

from gemmakit import kernels
from gemmakit.model import Gemma
from gemmakit.model import quantized as Q
from gemmakit.runtime.engine import Engine


def greedy_margin(model: Gemma, prompt: list[int], output: list[int]) -> float:
    """The worst gap between the best logit and the chosen token's, over the generated positions,
    from one full forward (no cache) over prompt + output."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + output[:-1]]))[0, len(prompt) - 1:].float()  # (len(output), V)
    chosen = logits.gather(-1, torch.tensor(output)[:, None])[:, 0]
    return (logits.max(-1).values - chosen).max().item()


@pytest.mark.parametrize("mode", Q.MODES)
@pytest.mark.parametrize("streams", [1, 6, kernels.AMX_ROWS + 2, kernels.FMA_ROWS_NO_VNNI + 2, 66])
def test_engine_decodes_the_quantized_models_greedy_tokens(mode, streams):
    model = Q.quantize(tiny_model(TINY3, seed=5), mode)
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 512, (int(n),), generator=gen).tolist() for n in torch.randint(2, 14, (streams,), generator=gen)]
    engine = Engine(model, None, max_batch=streams, max_len=40)  # prompts + 20 tokens pass the window of 8
    # the cache follows the activations (int4's bfloat16), int8's is bfloat16: the fast mode's
    assert engine.cache.k[0].dtype == torch.bfloat16
    requests = [engine.add(p, max_new_tokens=20) for p in prompts]
    while engine.requests:
        engine.step()
    for r in requests:
        assert len(r.output_ids) == 20
        # bfloat16 (int4, int8's dense path, the cache), int8 activations and a different op order
        # may flip a near-tie, never a clear winner
        assert greedy_margin(model, r.prompt_ids, r.output_ids) < 0.05


def test_quantized_prefill_in_chunks_equals_one_chunk():
    """A long prompt prefilled through the dense path in ring-sized chunks decodes like a short one would."""
    model = Q.quantize(tiny_model(TINY3, seed=7), "int8")
    prompt = torch.randint(3, 512, (30,), generator=torch.Generator().manual_seed(8)).tolist()
    engine = Engine(model, None, max_batch=1, max_len=48)
    assert engine.cache.max_chunk < len(prompt)  # the prefill really is chunked
    request = engine.add(prompt, max_new_tokens=8)
    while engine.requests:
        engine.step()
    assert greedy_margin(model, prompt, request.output_ids) < 0.05


def test_importing_gemmakit_leaves_the_compiler_alone():
    """torch._dynamo costs about 2 s and 70 MB to import: only --compile and training may pay that,
    not every start (the issue's start-to-first-token and peak-RSS targets)."""
    import subprocess
    import sys

    code = "import sys, gemmakit, gemmakit.cli.main, gemmakit.runtime.engine, gemmakit.model.quantized; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
