import json

import pytest

from gemmakit.errors import DataError
from gemmakit.eval import evaluate, make_task
from gemmakit.eval.gsm8k import extract_answer, gold_answer, majority, normalize_number


@pytest.mark.parametrize("text, expected", [
    ("She has 16 - 3 - 4 = 9 eggs. 9 * 2 = 18. The answer is 18.", "18"),
    ("Total is $1,234.50. The answer is $1,234.50.", "1234.5"),
    ("The answer is 6. Next, 7 more trees grow.", "6"),  # the stated answer, not the last number
    ("First 3, then the answer is 4, then I re-check: the answer is 5.", "5"),
    ("The final answer is **72**", "72"),
    ("the answer is: -3", "-3"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("So she sold 48 + 24 = 72 clips in total", "72"),  # no marker: the last number
    ("It costs 0.50 dollars", "0.5"),
    ("The answer is 007.", "7"),
    ("I cannot tell.", None),
])
def test_extract_answer_tricky_formats(text, expected):
    assert extract_answer(text) == expected


def test_numbers_gold_and_majority():
    assert normalize_number("1,000.00") == "1000" and normalize_number("-0") == "0" and normalize_number("abc") is None
    assert gold_answer("Step one.\n#### 1,200") == "1200"
    with pytest.raises(DataError, match="####"):
        gold_answer("no final line")
    assert majority(["3", None, "4", "4", "3"]) == "3"  # ties go to the earliest
    assert majority(["5", None, "4", "4"]) == "4" and majority([None, None]) is None


def test_gsm8k_task_generates_and_scores(tiny_lm, tmp_path):
    rows = [{"question": "Tom has 2 apples and gets 3 more. How many?", "answer": "2 + 3 = 5\n#### 5"},
            {"question": "What is 10 minus 4?", "answer": "#### 6"}]
    data = tmp_path / "gsm.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    task = make_task(tiny_lm, "gsm8k", data=[data], shots=2, samples=3, max_new_tokens=8, temperature=1.0)
    results = evaluate(tiny_lm, task, progress=False)
    assert results["metric"] == "maj@3" and set(results["metrics"]) == {"maj@1", "maj@3"}
    for rec, row in zip(results["records"], rows):
        assert rec["prompt"].startswith("Q: There are 15 trees") and rec["prompt"].endswith(f"Q: {row['question']}\nA:")
        assert rec["prompt"].count("The answer is") == 2
        assert rec["extracted"] == extract_answer(rec["generation"])
        assert rec["maj@1"] == float(rec["extracted"] == gold_answer(row["answer"]))
        assert len(rec["samples"]) == 3 and rec["votes"] == [extract_answer(s) for s in rec["samples"]]
    greedy = tiny_lm.generate(results["records"][0]["prompt"], max_new_tokens=8, stop=["\n\nQ:", "Q:", "</s>", "<|im_end|>", "\n\n\n"])
    assert results["records"][0]["generation"] == greedy
    # sampling is repeatable: the same seed gives the same samples
    again = evaluate(tiny_lm, make_task(tiny_lm, "gsm8k", data=[data], shots=2, samples=3, max_new_tokens=8,
                                        temperature=1.0), progress=False)
    assert [r["samples"] for r in again["records"]] == [r["samples"] for r in results["records"]]


def test_gsm8k_packaged_test_split(tiny_lm):
    task = make_task(tiny_lm, "gsm8k")
    assert len(task.items) == 1319 and task.items[0]["answer"] == "18"
    assert task.items[0]["prompt"].count("Q: ") == 9
