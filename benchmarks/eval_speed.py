"""MMLU scoring speed of the real Gemma 3 270M: gemmakit's harness, lm-eval's transformers backend
(`model="hf"`) and lm-eval through gemmakit's bridge (`model="gemmakit"`), on the same items, float32,
CPU, the same torch threads. Prints a table of items/s, wall and CPU seconds and accuracy, and how far
the three disagree item by item. On a shared machine the CPU seconds (this process's, all threads)
are the steadier measure: wall time also counts the time other processes held the cores.

    nice python benchmarks/eval_speed.py [--items 20] [--threads 1]

The GGUF (gemmakit.checkpoints.default) is written once as a Hugging Face folder under the gemmakit cache
(`gemmakit.checkpoints.hf.save`), which transformers loads. The items are the first `--items` of
MMLU's stratified slice (`--per-subject` questions of each subject, after its 5-shot examples), as
gemmakit builds them; lm-eval scores the same prompts as a local YAML task over a JSONL file (its
`target_delimiter` " " joins the prompt and the letter, as in lm-eval's own `mmlu`), zero further
shots. Times are for scoring only: the models are loaded before the clocks start.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import gemmakit
from gemmakit.checkpoints.default import default_model_path
from gemmakit.eval import evaluate
from gemmakit.eval.lm_eval_bridge import GemmakitLM, evaluate_local, local_mc_task
from gemmakit.eval.mc import mmlu
from gemmakit.paths import cache_dir


def hf_folder(lm) -> Path:
    """The GGUF as a Hugging Face folder, written once into the cache."""

    folder = cache_dir() / "eval_speed" / (Path(default_model_path()).stem + "-hf-float32")
    if not (folder / "config.json").is_file():
        lm.save(folder)
    return folder


def lm_eval_run(model, tasks_dir: Path, name: str) -> tuple[float, float, list[dict]]:
    """Wall and CPU seconds of simple_evaluate on the local task, and its samples in item order."""
    start, cpu = time.perf_counter(), time.process_time()
    out = evaluate_local(model, tasks_dir, name)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return seconds, cpu, [{"logprobs": [float(r[0][0]) for r in s["resps"]], "acc": float(s["acc"])} for s in samples]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--per-subject", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hf-batch-size", type=int, default=1, help="lm-eval hf batch size (requests per forward)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="gemmakit-eval-speed-"))
    # lm-eval reads the local JSONL through `datasets`: keep it off the hub and out of the user's cache.
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(work / "hf-cache"))

    lm = gemmakit.load(default_model_path(), dtype="float32", quantize=None, compile=None, progress=False)
    task = mmlu(lm, shots=5, per_subject=args.per_subject)
    task.items = task.items[:args.items]
    data = work / "items.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": x["prompt"], "answer": x["answer"]}) for x in task.items))
    local_mc_task(work / "tasks", "gemmakit_speed_mmlu", data, text="{{prompt}}", choices=["A", "B", "C", "D"],
                  metrics=("acc",))

    from lm_eval.models.huggingface import HFLM

    folder = hf_folder(lm)
    hf_lm = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=args.hf_batch_size,
                 add_bos_token=True)
    for x in task.items:  # a folder cached by an older gemmakit could hold another tokenizer
        if hf_lm.tok_encode(x["prompt"]) != lm.tokenizer.encode(x["prompt"]):
            raise SystemExit(f"transformers' tokenizer of {folder} encodes a prompt differently from gemmakit's; "
                             "delete the folder to convert the model again")

    rows = []
    load = os.getloadavg()
    start, cpu = time.perf_counter(), time.process_time()
    ours = evaluate(lm, task, progress=False)
    rows.append(("gemmakit harness", time.perf_counter() - start, time.process_time() - cpu,
                 [{"logprobs": r["logprobs"], "acc": r["acc"]} for r in ours["records"]]))
    rows.append((f"lm-eval hf (transformers, batch {args.hf_batch_size})",
                 *lm_eval_run(hf_lm, work / "tasks", "gemmakit_speed_mmlu")))
    rows.append(("lm-eval --model gemmakit", *lm_eval_run(GemmakitLM(lm=lm), work / "tasks", "gemmakit_speed_mmlu")))
    load_after = os.getloadavg()

    n = len(task.items)
    print(f"\n{n} MMLU items (5-shot, {args.per_subject} per subject after the examples, first {n}), float32, "
          f"{args.threads} torch thread(s), {platform.processor() or platform.machine()}, "
          f"load average {load[0]:.1f} before, {load_after[0]:.1f} after")
    print("| backend | items/s | seconds | CPU seconds | acc | max abs logprob diff vs gemmakit "
          "| items whose prediction differs |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    ref = rows[0][3]
    for name, seconds, cpu, recs in rows:
        acc = sum(r["acc"] for r in recs) / n
        err = math.sqrt(acc * (1 - acc) / (n - 1))
        diff = max(abs(a - b) for r, q in zip(recs, ref) for a, b in zip(r["logprobs"], q["logprobs"]))
        preds = sum(_argmax(r["logprobs"]) != _argmax(q["logprobs"]) for r, q in zip(recs, ref))
        print(f"| {name} | {n / seconds:.3f} | {seconds:.1f} | {cpu:.1f} | {acc:.3f} ± {err:.3f} | {diff:.1e} | {preds} |")


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


if __name__ == "__main__":
    main()
