import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval bridge needs lm-eval (the test extra installs it)")

from gemmakit.eval import evaluate, make_task  # noqa: E402
from gemmakit.eval.lm_eval_bridge import GemmakitLM, evaluate_local, local_mc_task  # noqa: E402

ROWS = [
    {"question": "the quick brown fox", "choices": ["jumps", "sleeps", "reads the model"], "answer": 0},
    {"question": "a lazy dog while", "choices": ["the model answers", "over"], "answer": 1},
    {"question": "hello world", "choices": ["gemma", "tokens", "code", "print"], "answer": 2},
    {"question": "def f(x): return", "choices": ["x + 1", "class"], "answer": 0},
    {"question": "the user in turn", "choices": ["pieces", "of", "import"], "answer": 1},
]


def test_lm_eval_on_a_local_task_agrees_with_gemmakit(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    tasks = tmp_path / "tasks"
    yaml = local_mc_task(tasks, "gemmakit_tiny_mc", data, text="Question: {{question}}\nAnswer:")
    assert 'doc_to_text: "Question: {{question}}\\nAnswer:"' in yaml.read_text()
    out = evaluate_local(GemmakitLM(lm=tiny_lm), tasks, "gemmakit_tiny_mc")
    theirs = out["results"]["gemmakit_tiny_mc"]
    ours = evaluate(tiny_lm, make_task(tiny_lm, "mc", data=[data]), progress=False)
    assert theirs["acc,none"] == pytest.approx(ours["metrics"]["acc"]["value"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["metrics"]["acc_norm"]["value"])
    # item by item: the same log-likelihoods for every choice
    samples = sorted(out["samples"]["gemmakit_tiny_mc"], key=lambda s: s["doc_id"])
    for s, rec in zip(samples, ours["records"]):
        assert [float(r[0][0]) for r in s["resps"]] == pytest.approx(rec["logprobs"], abs=1e-4)


def test_rolling_and_generate_until(tiny_lm):
    from lm_eval.api.instance import Instance

    bridge = GemmakitLM(lm=tiny_lm)
    text = "the quick brown fox jumps over a lazy dog"
    req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    ids = tiny_lm.tokenizer.encode(text)
    import torch

    logp = torch.log_softmax(tiny_lm.logits(ids)[0], dim=-1)
    expected = sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
    assert bridge.loglikelihood_rolling([req])[0] == pytest.approx(expected, abs=1e-3)
    gen = Instance(request_type="generate_until", doc={}, idx=0,
                   arguments=("hello world", {"until": ["\n"], "max_gen_toks": 5}))
    assert bridge.generate_until([gen]) == [tiny_lm.generate("hello world", max_new_tokens=5, stop=["\n"])]


def test_model_args_reach_the_model_and_unknown_ones_are_errors():
    """What lm-eval's `--model gemmakit --model_args ...` passes: known arguments reach gemmakit.load,
    lm-eval's own (batch_size, max_batch_size, device) are taken, a misspelt one fails by name."""
    extra = {"batch_size": 4, "max_batch_size": 64, "device": "cpu"}
    bridge = GemmakitLM.create_from_arg_string("pretrained=gemma-tiny,dtype=bfloat16,quantize=int8", extra)
    assert bridge.batch_size == 4 and bridge.lm.quantization == "int8" and bridge.lm.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtpye"):
        GemmakitLM.create_from_arg_string("pretrained=gemma-tiny,dtpye=bfloat16", extra)
