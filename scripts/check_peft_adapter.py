"""A `gemmakit finetune --lora-rank` run's adapter, loaded by transformers + peft onto the base model's
Hugging Face folder, against gemmakit's merged output and gemmakit's base + lora.load_adapter.

    python scripts/check_peft_adapter.py BASE_HF_FOLDER RUN_FOLDER ["a user message"]
"""

import sys

import peft
import torch
import transformers

import gemmakit
from gemmakit.train import lora


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main(base: str, run: str, message: str = "What does `shutil.disk_usage` do?") -> None:
    tuned = gemmakit.load(run, progress=False)
    ids = torch.tensor([tuned.tokenizer.chat_ids([{"role": "user", "content": message}])])
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(hf, f"{run}/adapter").eval()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        with theirs.disable_adapter():
            without = theirs(input_ids=ids).logits
        ours = lora.load_adapter(gemmakit.load(base, progress=False).module, f"{run}/adapter")(ids)
        merged = tuned.logits(ids)
    print(f"{ids.shape[1]} tokens; max error / max logit against transformers + peft:")
    print(f"  gemmakit base + adapter {rel(ours, expected):.2e}, gemmakit merged {rel(merged, expected):.2e}; "
          f"the adapter itself moves the logits by {rel(without, expected):.2e}")


if __name__ == "__main__":
    main(*sys.argv[1:])
