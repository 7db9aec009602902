"""The BIG-bench source tasks of BBH's 23: read from the bigbench sdist (or its files) in BBH's
format with lm-eval's CoT exemplars, and scored by exact match of the extracted answer.
Fixture: tests/data/bigbench, trimmed task files of the bigbench==1.0.0 sdist (see its README)."""

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from gemmakit.cli.main import main
from gemmakit.errors import DataError
from gemmakit.eval import evaluate, make_task
from gemmakit.eval.bbh import STOP, SUBTASKS, bbh, exemplars, extract_answer

FIXTURE = Path(__file__).parents[1] / "data" / "bigbench"


class Echo:
    """A model that answers each prompt with a fixed text per subtask (no tokenizer work)."""

    tokenizer = object()

    def __init__(self, replies):
        self.replies, self.calls = replies, 0

    def generate(self, prompts, **kwargs):
        assert kwargs["stop"] == STOP
        self.calls += 1
        return [self.replies(p) for p in prompts]


def _by_subtask(task):
    out = {}
    for item in task.items:
        out.setdefault(item["subtask"], []).append(item)
    return out


def _question(item):
    return item["prompt"].rsplit("\n\nQ: ", 1)[1].removesuffix("\nA: Let's think step by step.\n")


def test_items_in_bbh_format_from_the_folder_and_the_archive(tmp_path):
    task = bbh(Echo(None), FIXTURE)
    items = _by_subtask(task)
    assert list(items) == list(SUBTASKS) and len(items) == 24
    # Each subtask: 2 examples; causal_judgment's third is an exemplar and colored_objects' has 34 choices.
    assert all(len(v) == 2 for v in items.values())
    assert _question(items["hyperbaton"][0]) == (
        "Which sentence has the correct adjective order:\nOptions:\n"
        "(A) obnoxious normal-size brand-new purple glass motorcycle\n"
        "(B) glass normal-size brand-new obnoxious purple motorcycle")
    assert items["hyperbaton"][0]["answer"] == "(A)"
    snark = _question(items["snarks"][0])
    assert snark.startswith("Which statement is sarcastic?\nOptions:\n(A) Protein") and items["snarks"][0]["answer"] == "(B)"
    assert _question(items["navigate"][0]) == ("If you follow these instructions, do you return to the starting point? "
                                              "Take 1 step. Take 2 steps. Take 3 steps. Turn around. Take 6 steps. "
                                              "Turn left.\nOptions:\n- Yes\n- No")
    assert items["navigate"][0]["answer"] == "Yes"
    assert _question(items["sports_understanding"][0]) == 'Is the following sentence plausible? "Jamal Murray was perfect from the line."'
    assert items["sports_understanding"][0]["answer"] == "yes"
    assert items["object_counting"][0]["answer"] == "3"  # target ["three", "3"]
    assert items["word_sorting"][0]["answer"] == "gelatine stick"
    assert _question(items["word_sorting"][0]) == "Sort the following words alphabetically: List: stick gelatine"
    assert items["dyck_languages"][0]["answer"] == "] }"
    tracking = _question(items["tracking_shuffled_objects_three_objects"][0])
    assert tracking.endswith("Alice has the\nOptions:\n(A) orange ball\n(B) white ball\n(C) blue ball")
    assert "\n\n" not in tracking and items["tracking_shuffled_objects_three_objects"][0]["answer"] == "(C)"
    deduction = _question(items["logical_deduction_three_objects"][0])
    assert deduction.startswith("The following paragraphs each describe a set of three objects arranged in a fixed "
                                "order. The statements are logically consistent within each paragraph. On a shelf")
    assert deduction.endswith("(A) The black book is the leftmost\n(B) The orange book is the leftmost\n"
                              "(C) The blue book is the leftmost")
    # date_understanding lists the right date first in BIG-bench: shuffled, the letter follows it.
    date = items["date_understanding"][0]
    assert date["answer"] == next(line[:3] for line in _question(date).splitlines() if line.endswith(" 05/01/2021"))
    assert {x["answer"] for x in items["date_understanding"] + items["temporal_sequences"]} != {"(A)"}
    # The prompt: lm-eval's description and 3 exemplars, then the question.
    description, shown = exemplars("causal_judgement")
    prompt = items["causal_judgement"][0]["prompt"]
    assert prompt.startswith(description + f"Q: {shown[0]['input']}\nA: Let's think step by step.\n{shown[0]['target']}\n\nQ: ")
    assert prompt.count("\nA: Let's think step by step.\n") == 4 and prompt.endswith("A: Let's think step by step.\n")
    assert "questions about causation?\nThe CEO" in prompt  # the file's task_prefix, tidied

    # The same items straight from a .tar.gz laid out as the sdist.
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(FIXTURE / "benchmark_tasks", arcname="bigbench-1.0.0/bigbench/benchmark_tasks")
    assert bbh(Echo(None), archive).items == task.items
    sliced = bbh(Echo(None), archive, per_subject=1, shots=1)
    assert len(sliced.items) == 24 and sliced.items[0]["prompt"].count("Let's think step by step") == 2


@pytest.mark.parametrize("text, expected", [
    ("Let's see. So the answer is (B).", "(B)"),
    ("So the answer is yes.", "yes"),
    ("So the answer is ] } ].\nQ", "] } ]"),
    ("the answer is 3. Then the answer is 4.", "3. Then the answer is 4"),  # lm-eval's regex: first, greedy
    ("The answer is (A).", None),  # case matters, as in lm-eval
    ("I do not know", None),
])
def test_extract_answer_is_lm_evals_regex(text, expected):
    assert extract_answer(text) == expected


def test_exact_match_per_item_and_per_subtask():
    items = {}

    def reply(prompt):  # right on the word_sorting and navigate items, wrong elsewhere
        gold, subtask = items[prompt]
        return f" Sorted. So the answer is {gold if subtask in ('word_sorting', 'navigate') else gold + 'x'}."

    lm = Echo(reply)
    task = bbh(lm, FIXTURE)
    items.update({x["prompt"]: (x["answer"], x["subtask"]) for x in task.items})
    results = evaluate(lm, task, progress=False)
    assert results["metric"] == "exact_match" and results["score"] == pytest.approx(4 / 48)
    assert results["metrics"]["exact_match/navigate"]["value"] == 1.0
    assert results["metrics"]["exact_match/word_sorting"]["value"] == 1.0
    assert results["metrics"]["exact_match/snarks"]["value"] == 0.0
    rec = results["records"][0]
    assert rec["extracted"] == rec["answer"] + "x" and rec["exact_match"] == 0.0


def test_real_generation_on_a_tiny_model(tiny_lm):
    # No exemplars: the tiny model holds 512 tokens.
    task = make_task(tiny_lm, "bbh", data=[FIXTURE], shots=0, per_subject=1, limit=2, max_new_tokens=4, batch_size=2)
    results = evaluate(tiny_lm, task, progress=False)
    assert len(results["records"]) == 2
    for rec in results["records"]:
        assert rec["generation"] == tiny_lm.generate(rec["prompt"], max_new_tokens=4, stop=STOP)
        assert rec["extracted"] == extract_answer(rec["generation"])
        assert rec["exact_match"] == float(rec["extracted"] == rec["answer"])


def test_bad_data_one_line_errors(tmp_path, tiny_lm):
    with pytest.raises(DataError, match=r"pip download --no-deps --no-binary :all: bigbench==1.0.0"):
        make_task(tiny_lm, "bbh")
    with pytest.raises(DataError, match="no BIG-bench benchmark_tasks folder"):
        bbh(Echo(None), tmp_path)
    with pytest.raises(DataError, match="no such file or folder"):
        bbh(Echo(None), tmp_path / "nope.tar.gz")
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(DataError, match="not a readable bigbench sdist archive"):
        bbh(Echo(None), tmp_path / "junk.tar.gz")
    partial = tmp_path / "partial"
    shutil.copytree(FIXTURE, partial)
    shutil.rmtree(partial / "benchmark_tasks" / "snarks")
    with pytest.raises(DataError, match="missing the BIG-bench task file of snarks"):
        bbh(Echo(None), partial)
    (partial / "benchmark_tasks" / "snarks").mkdir()
    (partial / "benchmark_tasks" / "snarks" / "task.json").write_text('{"examples": [')
    with pytest.raises(DataError, match=r"snarks/task.json: not valid JSON"):
        bbh(Echo(None), partial)
    (partial / "benchmark_tasks" / "snarks" / "task.json").write_text(json.dumps({"examples": [{"input": "no options"}]}))
    with pytest.raises(DataError, match=r"snarks/task.json example 0: an example without 'target_scores'"):
        bbh(Echo(None), partial)
    with pytest.raises(DataError, match="--shots 4 is out of range"):
        bbh(Echo(None), FIXTURE, shots=4)


def test_cli_without_data_is_one_line(tmp_path, tiny_lm, capsys):
    tiny_lm.save(tmp_path / "model", progress=False)
    assert main(["eval", "--model", str(tmp_path / "model"), "--task", "bbh"]) == 1
    err = capsys.readouterr().err.strip().splitlines()  # after the loading bar
    assert err[-1].startswith("gemmakit: error: bbh reads BIG-bench's task files: pip download")
    assert not any("Traceback" in line for line in err)


def test_prompts_and_answers_equal_lm_evals_own(tmp_path):
    """lm-eval's bbh_cot_fewshot YAML, pointed at our items as a local JSONL, builds the same
    prompts, and its get-answer filter extracts the same answers."""
    import yaml
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.tasks import TaskManager

    from gemmakit.eval.mc import package_file

    task = bbh(Echo(None), FIXTURE)
    template = yaml.safe_load(package_file("lm_eval", "tasks/bbh/cot_fewshot/_cot_fewshot_template_yaml", "").read_text())
    names = ["hyperbaton", "navigate", "date_understanding", "tracking_shuffled_objects_three_objects", "word_sorting"]
    for name in names:
        spec = yaml.safe_load(package_file("lm_eval", f"tasks/bbh/cot_fewshot/{name}.yaml", "").read_text())
        del spec["include"], spec["dataset_name"]
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"input": _question(x), "target": x["answer"]}) + "\n"
                                for x in task.items if x["subtask"] == name))
        spec.update(task=f"local_{name}", dataset_path="json", dataset_kwargs={"data_files": {"test": str(data)}})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**template, **spec}))
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False).load([f"local_{n}" for n in names])["tasks"]
    for name in names:
        ours = [x["prompt"] for x in task.items if x["subtask"] == name]
        theirs = [tasks[f"local_{name}"].fewshot_context(doc, num_fewshot=3) for doc in tasks[f"local_{name}"].test_docs()]
        assert theirs == ours and len(ours) == 2

    texts = ["So the answer is (B).", "no answer", "the answer is 3. Then the answer is 4.", "So the answer is yes.\nQ"]
    extracted = list(RegexFilter(regex_pattern=template["filter_list"][0]["filter"][0]["regex_pattern"]).apply([texts], [{}]))[0]
    assert [extract_answer(t) or "[invalid]" for t in texts] == extracted
    assert template["generation_kwargs"]["until"] == STOP
