"""Builds a chat dataset from the Python standard library, offline: for each public function or
class of a fixed list of modules, the user asks what it does and the model answers with the
first sentence of its docstring. Writes JSONL of {"messages": [...]}, one conversation per line,
in a seeded random order (the training run holds out the last rows).

    python docs/make_docstring_chats.py /tmp/runs/docstring_chats.jsonl
"""

import importlib
import inspect
import json
import random
import sys

MODULES = ["json", "os", "os.path", "string", "textwrap", "collections", "itertools", "functools", "math",
           "random", "re", "shutil", "statistics", "heapq", "bisect", "base64", "hashlib", "glob", "fnmatch",
           "tempfile", "csv", "datetime", "calendar", "difflib", "html", "urllib.parse", "pathlib", "fractions",
           "decimal", "operator", "copy", "pprint", "zlib", "gzip", "tarfile", "zipfile", "uuid", "secrets",
           "struct", "time", "argparse", "logging", "inspect", "typing", "dataclasses", "contextlib", "io",
           "subprocess", "threading", "queue", "socket", "email.utils", "unicodedata", "locale", "platform"]
QUESTIONS = ["What does {name} do?", "In Python, what is {name} for?", "Explain {name} in one sentence.",
             "What is the purpose of {name}?"]


def first_sentence(doc: str) -> str | None:
    para = " ".join(doc.strip().split("\n\n")[0].split())
    end = para.find(". ")
    sentence = para if end < 0 else para[: end + 1]
    if not 15 <= len(sentence) <= 200 or sentence.startswith(("(", ">>>")) or "(" in sentence[:20] and ")" in sentence[:40]:
        return None
    return sentence if sentence.endswith(".") else sentence + "."


def main(out: str) -> None:
    rng = random.Random(0)
    pairs = []
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            if getattr(obj, "__module__", None) not in (mod_name, mod.__name__):
                continue
            answer = first_sentence(inspect.getdoc(obj) or "")
            if answer:
                pairs.append((f"{mod_name}.{attr}", answer))
    rng.shuffle(pairs)
    with open(out, "w") as f:
        for name, answer in pairs:
            question = rng.choice(QUESTIONS).format(name=f"`{name}`")
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "model", "content": answer}]}) + "\n")
    print(f"{out}: {len(pairs)} conversations from {len(MODULES)} modules")


if __name__ == "__main__":
    main(sys.argv[1])
