"""Transformers' own logits on the real Gemma 3 270M GGUF, saved as a small slice for the tests.

transformers loads the GGUF itself (`from_pretrained(folder, gguf_file=name)`: it dequantizes with
the gguf package and maps the tensors into Gemma3ForCausalLM), which takes too long for CI; this
script runs it once on the prompts of tests/data/llamacpp_gemma3_270m.json (their llama.cpp token
ids, so that tokenization plays no part) and writes tests/data/transformers_gguf_logits.json:
per prompt, the last position's top-100 logits, and for every position the top-10 logits and the
row's max, mean, std and logsumexp. tests/checkpoints/test_gguf.py compares gemmakit against it.

    python scripts/make_transformers_gguf_logits.py
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def main() -> int:
    import gguf
    import transformers
    from transformers import AutoModelForCausalLM

    from gemmakit.checkpoints.default import default_model_path

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    path = default_model_path()
    reference = json.loads((DATA / "llamacpp_gemma3_270m.json").read_text())
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    if sha256 != reference["model_sha256"]:
        print(f"{path}: sha256 {sha256} is not the reference's {reference['model_sha256']}", file=sys.stderr)
        return 1

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    prompts = []
    for item in reference["results"]:
        ids = torch.tensor([item["prompt_token_ids"]])
        with torch.inference_mode():
            logits = model(ids).logits[0].float()  # (T, V)
        last = logits[-1].topk(100)
        top = logits.topk(10, dim=-1)
        prompts.append({
            "prompt": item["prompt"],
            "token_ids": item["prompt_token_ids"],
            "last_top100_ids": last.indices.tolist(),
            "last_top100_logits": last.values.tolist(),
            "top10_ids": top.indices.tolist(),
            "top10_logits": top.values.tolist(),
            "row_max": logits.max(-1).values.tolist(),
            "row_mean": logits.mean(-1).tolist(),
            "row_std": logits.std(-1).tolist(),
            "row_logsumexp": logits.logsumexp(-1).tolist(),
        })
    out = {
        "description": "float32 logits of transformers' own GGUF loading (AutoModelForCausalLM.from_pretrained("
                       "folder, gguf_file=name)) on the prompts of llamacpp_gemma3_270m.json, fed as its "
                       "llama.cpp token ids (with BOS). Written by scripts/make_transformers_gguf_logits.py.",
        "model_file": path.name,
        "model_sha256": sha256,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gguf": gguf.__version__ if hasattr(gguf, "__version__") else "unknown",
        "model_class": type(model).__name__,
        "prompts": prompts,
    }
    target = DATA / "transformers_gguf_logits.json"
    tmp = target.with_suffix(".partial")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, target)  # never a half-written reference
    print(f"wrote {target} ({target.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
