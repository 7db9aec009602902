"""BIG-bench source tasks of BBH's 23: the BIG-bench task files that BIG-Bench Hard (Suzgun et
al., 2022) took its items from, asked in BBH's format, 3-shot chain of thought, exact match.

BBH itself is a subset (at most 250 items a task) that cannot be rebuilt from the source files, so
this task is named for what it is. Data: the task JSON files of PyPI's `bigbench==1.0.0` sdist,
read from the archive (or an unpacked copy) without installing it (its requirements pull
TensorFlow). Three of BBH's tasks, boolean_expressions, multistep_arithmetic_two and web_of_lies,
are programs there (task.py), not data, and are left out: 20 tasks, 24 subtasks.

Prompts: lm-eval's `bbh_cot_fewshot` (its description, its three CoT exemplars per subtask, read
from lm-eval's task YAML, "Q: ...\\nA: Let's think step by step.\\n"); the answer is what follows
"the answer is " up to the last character (lm-eval's regex), compared exactly with the target.
"""

from __future__ import annotations

import json
import os
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..runtime.sampling import Sampling
from .harness import mean_stderr
from .mc import LETTERS, package_file
from .task import Task, limit_items

DOWNLOAD = "pip download --no-deps --no-binary :all: bigbench==1.0.0"
STOP = ["</s>", "Q", "\n\n"]  # lm-eval's bbh cot_fewshot `until`
_ANSWER = re.compile(r"(?<=the answer is )(.*)(?=.)")  # lm-eval's get-answer filter, first match
LETTERS_BBH = LETTERS + "KLMNOPQR"  # reasoning_about_colored_objects has 18 colours


@dataclass(frozen=True)
class Subtask:
    """How one BBH subtask's items are made from a BIG-bench task file.

    style: "letters" (options "(A) ..", gold "(B)"), "dash" (options "- Yes", gold its text),
    "free" (gold the target text), "plain" (no options, gold from `answers`).
    """

    source: str  # folder under bigbench/benchmark_tasks
    style: str
    prefix: str = ""  # text before the item's input ("{task_prefix}": the file's own task_prefix)
    suffix: str = ""  # text after the input (sports_understanding's closing quote)
    answers: tuple[tuple[str, str], ...] = ()  # a source choice -> BBH's word for it
    strip_period: bool = False  # BBH drops the final "." of the choices
    shuffle: bool = False  # the source lists the right choice first; BBH shuffled them


_DEDUCTION = ("The following paragraphs each describe a set of {} objects arranged in a fixed order. "
              "The statements are logically consistent within each paragraph. ")
SUBTASKS: dict[str, Subtask] = {
    "causal_judgement": Subtask("causal_judgment", "dash", "{task_prefix}"),
    "date_understanding": Subtask("date_understanding", "letters", shuffle=True),  # 364 of 369 first
    "disambiguation_qa": Subtask("disambiguation_qa", "letters", "{task_prefix}Sentence: "),
    "dyck_languages": Subtask("dyck_languages", "free", "Complete the rest of the sequence, making sure that the "
                                                        "parentheses are closed properly. Input: "),
    "formal_fallacies": Subtask("formal_fallacies_syllogisms_negation", "dash"),
    "geometric_shapes": Subtask("geometric_shapes", "letters"),
    "hyperbaton": Subtask("hyperbaton", "letters"),  # its two sentences are inside the input: see _split
    **{f"logical_deduction_{n}_objects": Subtask(f"logical_deduction/{n}_objects", "letters", _DEDUCTION.format(n),
                                                 strip_period=True) for n in ("three", "five", "seven")},
    "movie_recommendation": Subtask("movie_recommendation", "letters", "Find a movie similar to "),
    "navigate": Subtask("navigate", "dash", "{task_prefix} ", answers=(("True", "Yes"), ("False", "No"))),
    "object_counting": Subtask("object_counting", "free"),
    "penguins_in_a_table": Subtask("penguins_in_a_table", "letters", "{task_prefix}"),
    "reasoning_about_colored_objects": Subtask("reasoning_about_colored_objects", "letters"),
    "ruin_names": Subtask("ruin_names", "letters"),
    "salient_translation_error_detection": Subtask("salient_translation_error_detection", "letters", "{task_prefix}"),
    "snarks": Subtask("snarks", "letters"),  # (a)/(b) inside the input, as hyperbaton
    "sports_understanding": Subtask("sports_understanding", "plain", 'Is the following sentence plausible? "',
                                    '"', answers=(("plausible", "yes"), ("implausible", "no"))),
    "temporal_sequences": Subtask("temporal_sequences", "letters", shuffle=True),  # all 1,000 first
    **{f"tracking_shuffled_objects_{n}_objects": Subtask(f"tracking_shuffled_objects/{n}_objects", "letters",
                                                         strip_period=True) for n in ("three", "five", "seven")},
    "word_sorting": Subtask("word_sorting", "free", "Sort the following words alphabetically: List: "),
}
MISSING = ("boolean_expressions", "multistep_arithmetic_two", "web_of_lies")  # programs in BIG-bench, not JSON


def extract_answer(generation: str) -> str | None:
    found = _ANSWER.search(generation)
    return found.group(1) if found else None


def read_task_files(path: str | os.PathLike | None) -> dict[str, dict]:
    """{source folder: its task.json} for every subtask, from the bigbench sdist (.tar.gz) or a
    folder holding its files (the unpacked sdist, or any folder above `benchmark_tasks`)."""
    if path is None:
        raise DataError(f"bbh reads BIG-bench's task files: {DOWNLOAD}, then --data bigbench-1.0.0.tar.gz")
    path = Path(path)
    wanted = {f"{s.source}/task.json": s.source for s in SUBTASKS.values()}
    found: dict[str, tuple[str, bytes]] = {}  # source -> (where it was read, its bytes)
    if path.is_file():
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:  # one pass: the sdist is 358 MB, gzipped
                    rest = member.name.partition("benchmark_tasks/")[2]
                    if member.isfile() and rest in wanted:
                        found[wanted[rest]] = (f"{path}:{member.name}", tar.extractfile(member).read())
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable bigbench sdist archive ({e})") from None
    elif path.is_dir():
        roots = [p for p in (path, path / "benchmark_tasks", path / "bigbench" / "benchmark_tasks",
                             *path.glob("bigbench-*/bigbench/benchmark_tasks")) if (p / "navigate").is_dir()]
        if not roots:
            raise DataError(f"{path}: no BIG-bench benchmark_tasks folder in it; {DOWNLOAD} gives the archive")
        for rest, source in wanted.items():
            if (roots[0] / rest).is_file():
                found[source] = (str(roots[0] / rest), (roots[0] / rest).read_bytes())
    else:
        raise DataError(f"{path}: no such file or folder; {DOWNLOAD} gives BIG-bench's task files")
    missing = [s for s in wanted.values() if s not in found]
    if missing:
        raise DataError(f"{path}: missing the BIG-bench task file of {missing[0]} "
                        f"({len(missing)} of {len(wanted)} missing); {DOWNLOAD} gives them all")
    out = {}
    for source, (where, raw) in found.items():
        try:
            task = json.loads(raw)
        except ValueError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(task, dict) or not isinstance(task.get("examples"), list):
            raise DataError(f"{where}: no 'examples' list")
        out[source] = task
    return out


def exemplars(name: str) -> tuple[str, list[dict]]:
    """lm-eval's description and three CoT exemplars ({input, target}) of BBH subtask `name`."""
    import yaml

    path = package_file("lm_eval", f"tasks/bbh/cot_fewshot/{name}.yaml",
                        "bbh takes its chain-of-thought exemplars from lm-eval: pip install 'lm-eval>=0.4.13,<0.5'")
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    return spec["description"], spec["fewshot_config"]["samples"][:3]


def render(sub: Subtask, task: dict, example: dict, where: str) -> tuple[str, str] | None:
    """One BIG-bench example as BBH asks it: (input text, gold answer); None for one that BBH's
    format cannot ask (more choices than its 18 letters: 400 colour-counting questions of
    reasoning_about_colored_objects with 34). `where` names the example and seeds a shuffle."""
    text = example.get("input")
    if not isinstance(text, str):
        raise DataError(f"{where}: an example without a string 'input'")
    text = sub.prefix.replace("{task_prefix}", task.get("task_prefix", "")) + text
    scores = example.get("target_scores")
    if sub.style == "free" and not scores:
        targets = example.get("target")
        targets = [targets] if isinstance(targets, str) else targets
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise DataError(f"{where}: an example without a string 'target'")
        # object_counting lists ["three", "3"]: BBH's target is the number.
        return _tidy(text), next((t for t in targets if t.isdigit()), targets[0])
    if not isinstance(scores, dict) or not scores:
        raise DataError(f"{where}: an example without 'target_scores'")
    best = max(scores, key=scores.get)
    answers = dict(sub.answers)
    if sub.style == "free":  # dyck_languages: the one right closing sequence among all of them
        return _tidy(text), best
    if sub.style == "plain":
        return _tidy(text.strip().rstrip(".") + "." + sub.suffix), answers.get(best, best)
    options = list(scores)
    if sub.source in ("hyperbaton", "snarks"):
        text, options, best = _split(text, scores, best, where)
    if sub.strip_period:
        options, best = [o.rstrip(".") for o in options], best.rstrip(".")
    if sub.shuffle:
        random.Random(where).shuffle(options)
    if sub.style == "dash":
        return _tidy(text) + "\nOptions:\n" + "\n".join(f"- {answers.get(o, o)}" for o in options), answers.get(best, best)
    if len(options) > len(LETTERS_BBH):
        return None
    body = "\nOptions:\n" + "\n".join(f"({LETTERS_BBH[i]}) {o}" for i, o in enumerate(options))
    return _tidy(text) + body, f"({LETTERS_BBH[options.index(best)]})"


def _split(text: str, scores: dict, best: str, where: str) -> tuple[str, list[str], str]:
    """hyperbaton ('... order: a " X " b " Y " ?') and snarks ('... sarcastic? (a) X (b) Y') hold
    their two sentences in the input and score the letters: BBH asks them as options."""
    m = (re.fullmatch(r'(.*?:)\s*a "\s*(.*?)\s*" b "\s*(.*?)\s*" \?', text.strip(), re.S)
         or re.fullmatch(r"(.*?\?)\s*\(a\)\s*(.*?)\s*\(b\)\s*(.*)", text.strip(), re.S))
    if not m or sorted(k.strip("()") for k in scores) != ["a", "b"]:
        raise DataError(f"{where}: cannot split the input into its two options: {text[:80]!r}")
    options = [m.group(2), m.group(3)]
    return m.group(1), options, options["ab".index(best.strip("()"))]


def _tidy(text: str) -> str:
    """BIG-bench's inputs keep stray spaces and blank lines that BBH's do not."""
    return "\n".join(line.strip() for line in text.strip().splitlines() if line.strip())


class BBH(Task):
    name = "bbh-sources"
    primary = "exact_match"
    metric_keys = ("exact_match",)

    def __init__(self, lm, items: list[dict], settings: dict, max_new_tokens: int, batch_size: int):
        super().__init__(items, settings)
        self.lm, self.max_new_tokens, self.batch_size = lm, max_new_tokens, batch_size
        self.subtasks = list(dict.fromkeys(x["subtask"] for x in items))

    def score(self, items: list[dict]) -> list[dict]:
        outs = self.lm.generate([x["prompt"] for x in items], max_new_tokens=self.max_new_tokens,
                                sampling=Sampling(), stop=STOP, max_batch=self.batch_size)
        records = []
        for x, g in zip(items, outs):
            pred = extract_answer(g)
            records.append({"subtask": x["subtask"], "source_index": x["source_index"], "prompt": x["prompt"],
                            "answer": x["answer"], "generation": g, "extracted": pred,
                            "exact_match": float(pred == x["answer"]), "score": float(pred == x["answer"])})
        return records

    def summarize(self, records: list[dict]) -> dict:
        out = super().summarize(records)  # over items, as lm-eval's bbh group (weight_by_size)
        for sub in self.subtasks:
            value, stderr = mean_stderr([r["exact_match"] for r in records if r["subtask"] == sub])
            out[f"exact_match/{sub}"] = {"value": value, "stderr": stderr}
        return out


def bbh(lm, path=None, shots: int = 3, limit: int | None = None, per_subject: int | None = None,
        max_new_tokens: int = 1024, batch_size: int = 8) -> BBH:
    """The BIG-bench source tasks of BBH's 23 from `path` (the bigbench 1.0.0 sdist or its files),
    `per_subject` items of each subtask (its first, in file order) or all of them."""
    if not 0 <= shots <= 3:
        raise DataError(f"bbh has lm-eval's 3 chain-of-thought exemplars per subtask; --shots {shots} is out of range")
    if per_subject is not None and per_subject < 1:
        raise DataError(f"per_subject must be at least 1, got {per_subject}")
    files = read_task_files(path)
    items = []
    for name, sub in SUBTASKS.items():
        description, shown = exemplars(name)
        header = description + "".join(f"Q: {x['input']}\nA: Let's think step by step.\n{x['target']}\n\n"
                                       for x in shown[:shots])
        seen = {_tidy(x["input"]) for x in shown}
        kept = 0
        for n, example in enumerate(files[sub.source]["examples"]):
            asked = render(sub, files[sub.source], example, f"{sub.source}/task.json example {n}")
            if asked is None or _tidy(asked[0]) in seen:  # an exemplar is never scored
                continue
            text, gold = asked
            if per_subject is not None and kept == per_subject:
                break
            items.append({"subtask": name, "source_index": n, "answer": gold,
                          "prompt": f"{header}Q: {text}\nA: Let's think step by step.\n"})
            kept += 1
    settings = {"shots": shots, "limit": limit, "data": "bigbench==1.0.0 task files", "max_new_tokens": max_new_tokens,
                "what": "BIG-bench source tasks of BBH's 23 (not BBH's subsets; without " + ", ".join(MISSING) + ")"}
    if per_subject is not None:
        settings["per_subject"] = per_subject
    return BBH(lm, limit_items(items, limit), settings, max_new_tokens, batch_size)
