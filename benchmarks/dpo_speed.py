"""A DPO step on the real Gemma 3 270M, gemmakit against trl's DPOTrainer: the same pairs as one
batch, LoRA (rank 16 on q/k/v/o/gate/up/down), bfloat16 autocast over float32 weights on both
sides, the reference log-probs computed before training on both sides (trl's
precompute_ref_log_probs), no activation checkpointing on either. The two are timed in
alternation, step by step (a trl step, then a gemmakit step, from a trl callback), so that load
from other processes falls on both alike. Prints a table of seconds per step.

    python benchmarks/dpo_speed.py [--model /work/peers/gemma3-270m-hf] [--steps 6] [--pairs 4] [--threads N]

A step is what each trainer does per optimizer step: forward, DPO loss, backward, gradient clip,
AdamW. trl's completions end in <end_of_turn>\\n (the template's whole turn), gemmakit's in
<end_of_turn> (as its SFT trains them): the token counts are printed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_pairs(n: int) -> list[dict]:
    """Arithmetic prompts with a right and a wrong answer of some length (~40-60 tokens each)."""
    out = []
    for i in range(n):
        a, b = 1234 + 97 * i, 5678 + 31 * i
        steps = "First add the units, then the tens, then the hundreds and the thousands, carrying as needed. "
        out.append({"messages": [{"role": "user", "content": f"Work out {a} + {b}, step by step, and give the sum."}],
                    "chosen": steps + f"So {a} + {b} = {a + b}.", "rejected": steps + f"So {a} + {b} = {a + b + 10}."})
    return out


def cpu_name() -> str:
    text = Path("/proc/cpuinfo").read_text()
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found.group(1) if found else "unknown CPU"


def gemmakit_step(folder: str, records: list[dict], lr: float):
    """gemmakit's `dpo` step on the pairs: () -> seconds, and the completion tokens of the batch."""
    import gemmakit
    from gemmakit.train import dpo, lora, pairs
    from gemmakit.train.loop import _optimizer

    lm = gemmakit.load(folder, quantize=None, compile=None, progress=False)
    model, tok = lm.module.float().train(), lm.tokenizer
    batch = [pairs.parse(r, tok, f"pair {i}") for i, r in enumerate(records)]
    cfg = dpo.DPOConfig(model=folder, data="-", out="-", lora_rank=16, bf16=True, lr=lr, batch_size=len(batch))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logps, _ = dpo.sequence_logps(model, pairs.collate(batch, tok.pad_id))
    reference = {p.where: (c, r) for p, c, r in zip(batch, *logps.chunk(2))}
    model = lora.add_lora(model, 16, 32.0, 0.0, tuple(TARGETS))
    objective = dpo.objective(cfg, model, reference, tok.pad_id)
    optimizer = _optimizer(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, _ = objective(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    tokens = sum(len(p.chosen) + len(p.rejected) for p in batch)
    return step, tokens, sum(len(p.prompt) for p in batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/work/peers/gemma3-270m-hf")
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each (one more is warm-up)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    records = make_pairs(args.pairs)
    lr = 1e-4
    ours, our_tokens, our_prompt = gemmakit_step(args.model, records, lr)

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    if tok.chat_template is None:  # an export without one: Gemma's, as gemmakit writes it
        from gemmakit.tokenizer import CHAT_TEMPLATE

        tok.chat_template = CHAT_TEMPLATE
    dataset = Dataset.from_list([{"prompt": r["messages"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records])
    times = {"trl": [], "gemmakit": []}

    class Alternate(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times["trl"].append(time.perf_counter() - self.start)
            times["gemmakit"].append(ours())

    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, beta=0.1, loss_type=["sigmoid"], learning_rate=lr, max_grad_norm=1.0,
                           per_device_train_batch_size=args.pairs, max_steps=args.steps + 1, bf16=True, use_cpu=True,
                           precompute_ref_log_probs=True, gradient_checkpointing=False, report_to=[],
                           save_strategy="no", logging_steps=10_000, max_length=None, dataloader_num_workers=0)
        peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, bias="none")
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok, peft_config=peft,
                             callbacks=[Alternate()])
        theirs = trainer.train_dataset
        their_tokens = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in theirs)
        their_prompt = sum(len(e["prompt_ids"]) for e in theirs)
        trainer.train()

    rows = []
    for name, tokens, prompt in (("trl DPOTrainer", their_tokens, their_prompt), ("gemmakit dpo", our_tokens, our_prompt)):
        key = "trl" if name.startswith("trl") else "gemmakit"
        timed = times[key][1:]  # the first step of each is warm-up
        rows.append((name, statistics.median(timed), min(timed), tokens, prompt))
    print(f"\nDPO step, Gemma 3 270M, LoRA r16, bf16 autocast, {args.pairs} pairs a step, "
          f"{len(times['trl']) - 1} timed steps each, {torch.get_num_threads()} threads, {cpu_name()}")
    print(f"{'':16} {'median s/step':>14} {'best s/step':>12} {'completion tokens':>18} {'prompt tokens':>14}")
    for name, median, best, tokens, prompt in rows:
        print(f"{name:16} {median:14.3f} {best:12.3f} {tokens:18d} {prompt:14d}")
    ratio = rows[0][1] / rows[1][1]
    print(f"gemmakit is {ratio:.2f}x trl's speed (median step time ratio)")
    print(json.dumps({"trl_s": times["trl"], "gemmakit_s": times["gemmakit"]}))


if __name__ == "__main__":
    main()
