"""GGUF out, checked against llama.cpp: gemmakit writes a file, llama.cpp (llama-cpp-python) runs it, and
its greedy tokens and logits are compared with gemmakit's own on the same file.

    python benchmarks/gguf_roundtrip.py [--only tiny,real,trained] [--new-tokens 32] [--json out.json]

- tiny: random Gemma, Gemma 2 and Gemma 3 models (norms randomised, soft-caps, sliding windows
  shorter than the prompt) written as f32, f16, bf16, q8_0 and q4_k_m;
- real: the default model (Gemma 3 270M Q4_K_M) through gemmakit to q8_0, f16 and q4_k_m, and each
  written file read and written again: which tensors come back bit for bit;
- trained: a model pretrained by `gemmakit train` (its output folder) converted and run.

Not in the test suite because llama-cpp-python has no wheel on PyPI (CI would build llama.cpp).

Tolerance. Both sides read the same weights; gemmakit computes in float32, llama.cpp's CPU kernels
round each matmul's activations to the format its dot products pair with the weights' (F16 with
F16, BF16 with BF16, int8 blocks with Q8_0/Q5_0 and the K-quants), and its GELU reads a float16
table (ggml-cpu/vec.h, GGML_GELU_FP16), so even F32 files see float16 rounding; the KV cache is
float32 here. A rounding of relative size u per matmul input, over the 7 matmuls of each of L layers
(and the output one), adds up like a random walk: |logit difference| <= 4 * u * sqrt(7 L + 1) *
std(logits), u = 2^-11 for F32 and F16 (the GELU table), 2^-8 BF16, 1/127 for int8 blocks (one step
of the block's largest value). Greedy tokens must agree at every step where gemmakit's top
two logits are further apart than twice that; the top-10 logits must agree within it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests" / "checkpoints"))

import gemmakit  # noqa: E402
from gemmakit.checkpoints import gguf_writer  # noqa: E402

Q = gguf.GGMLQuantizationType
PROMPTS = ["The three primary colors are", "def fibonacci(n):\n", "Once upon a time, in a small village",
           "The capital of France is"]


def unit_roundoff(path: Path) -> float:
    """The worst activation rounding llama.cpp's CPU kernels apply for the file's matrix types."""
    types = {t.tensor_type for t in gguf.GGUFReader(path).tensors if len(t.shape) > 1}
    u = {Q.F32: 2.0**-11, Q.F16: 2.0**-11, Q.BF16: 2.0**-8}  # F32: the GELU's float16 table
    return max(u.get(t, 1 / 127) for t in types)


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp logs its load on stderr."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def llamacpp_greedy(path: Path, ids: list[int], new_tokens: int, threads: int):
    """llama.cpp's greedy continuation and the logits of every position (float32 KV cache)."""
    import llama_cpp

    with quiet_stderr():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + new_tokens + 8, logits_all=True, verbose=False,
                              type_k=int(Q.F32), type_v=int(Q.F32), n_threads=threads, n_threads_batch=threads)
    llm.eval(ids)
    out = []
    for _ in range(new_tokens):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    logits = np.array(llm.scores[: llm.n_tokens - 1], dtype=np.float32)  # predicts tokens 1..n-1
    tokenized = llm.tokenize(PROMPTS[0].encode(), add_bos=True, special=True)
    with contextlib.suppress(Exception):
        llm.close()
    return out, logits, tokenized


def compare(path: Path, lm, ids: list[int], new_tokens: int, threads: int) -> dict:
    """llama.cpp against gemmakit on the same file: llama.cpp's greedy run, gemmakit's logits on it."""
    theirs_tokens, theirs, llama_tokens = llamacpp_greedy(path, ids, new_tokens, threads)
    seq = ids + theirs_tokens
    ours = lm.logits([seq])[0, :-1].numpy()
    config = lm.config
    tol = 4 * unit_roundoff(path) * math.sqrt(7 * config.n_layers + 1) * float(ours.std())
    gen = slice(len(ids) - 1, len(seq) - 1)  # the positions that chose the new tokens
    top2 = np.sort(ours[gen], axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol
    ours_greedy = ours[gen].argmax(-1)
    agree = ours_greedy == np.array(theirs_tokens)
    top = np.argsort(-ours, axis=-1)[:, :10]
    top_diff = float(np.abs(np.take_along_axis(ours, top, -1) - np.take_along_axis(theirs, top, -1)).max())
    # gemmakit's own greedy run from the prompt follows llama.cpp's up to their first disagreement
    same_prefix = int(agree.argmin()) if not agree.all() else len(agree)
    return {"tolerance": round(tol, 5), "max_top10_logit_diff": round(top_diff, 5),
            "max_logit_diff": round(float(np.abs(ours - theirs).max()), 5),
            "greedy_agree": int(agree.sum()), "greedy_steps": len(agree), "clear_steps": int(clear.sum()),
            "disagree_where_clear": int((~agree & clear).sum()), "same_greedy_prefix": same_prefix,
            "same_tokenization": llama_tokens == lm.tokenizer.encode(PROMPTS[0]),
            "ok": bool(top_diff <= tol and not (~agree & clear).any()),
            "llamacpp_text": lm.tokenizer.decode(theirs_tokens)}


def bit_equal(a: Path, b: Path) -> dict:
    """Per tensor kind and type: how many tensors of b are byte for byte a's."""
    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    out: dict[str, list[int]] = {}
    for t in gguf.GGUFReader(b).tensors:
        s = ta[t.name]
        kind = (t.name.split(".")[-2] if t.name.startswith("blk.") else t.name.split(".")[0]) + f" {s.tensor_type.name}"
        same = s.tensor_type == t.tensor_type and np.array_equal(np.asarray(s.data).view(np.uint8),
                                                                 np.asarray(t.data).view(np.uint8))
        counts = out.setdefault(kind, [0, 0])
        counts[0] += same
        counts[1] += 1
    return {kind: f"{n}/{total}" for kind, (n, total) in sorted(out.items())}


def tiny(work: Path, args) -> dict:
    from test_gguf import CONFIGS, random_model

    from gemmakit.lm import LM
    from gemmakit.tokenizer import Tokenizer

    tok = Tokenizer.from_file(sentencepiece_model(work))
    prompt = tok.encode("the quick brown fox jumps over a lazy dog while the model answers")  # > the windows
    results = {}
    for family, config in CONFIGS.items():
        lm = LM(random_model(config), tok)
        for type in gguf_writer.TYPES:
            path = lm.save_gguf(work / f"tiny-{family}-{type}.gguf", type=type, progress=False)
            on_file = gemmakit.load(path, quantize=None, compile=None, progress=False)
            results[f"{family} {type}"] = compare(path, on_file, prompt, args.new_tokens, args.threads)
            print(family, type, {k: v for k, v in results[f"{family} {type}"].items() if "text" not in k}, flush=True)
    return results


def sentencepiece_model(work: Path) -> Path:
    """A 500-piece tokenizer with Gemma's settings, as tests/conftest.py trains one."""
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog while the model answers the user in turn; "
             "hello world, gemma reads tokens and pieces of code: def return class import print").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=500, model_type="bpe", pad_id=0, eos_id=1,
        bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], byte_fallback=True, split_digits=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1, minloglevel=2)
    path = work / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def real(work: Path, args) -> dict:
    from gemmakit.checkpoints.default import default_model_path

    source = default_model_path()
    lm = gemmakit.load(source, quantize=None, compile=None, progress=False)
    results = {}
    for type in ("q8_0", "f16", "q4_k_m"):
        path = lm.save_gguf(work / f"real-{type}.gguf", type=type, progress=False)
        on_file = gemmakit.load(path, quantize=None, compile=None, progress=False)
        again = on_file.save_gguf(work / f"real-{type}-again.gguf", type=type, progress=False)
        entry = {"bytes": path.stat().st_size, "written_again_bit_equal": bit_equal(path, again)}
        if type == "q4_k_m":
            entry["source_blocks_bit_equal"] = bit_equal(source, path)
        entry["prompts"] = {p: compare(path, on_file, on_file.tokenizer.encode(p), args.new_tokens, args.threads)
                            for p in PROMPTS}
        results[type] = entry
        print(type, json.dumps({k: v for k, v in entry.items() if k != "prompts"}), flush=True)
        for p, r in entry["prompts"].items():
            print("  ", repr(p), {k: v for k, v in r.items() if "text" not in k}, flush=True)
        del on_file
    return results


def trained(work: Path, args) -> dict:
    corpus = work / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and a dog ran far from home while birds sang old songs".split()
    for i in range(3):
        (corpus / f"text{i}.txt").write_text("\n".join(" ".join(rng.choice(words, rng.integers(5, 14)))
                                                       for _ in range(300)))
    config = work / "tiny.json"
    config.write_text(json.dumps(dict(family="gemma3", vocab_size=384, d_model=128, n_layers=6, n_heads=2,
                                      n_kv_heads=1, head_dim=64, ffn_dim=256, max_seq_len=256, sliding_window=16,
                                      global_every=6, post_norms=True, qk_norm=True, rope_theta_global=1e6)))
    out = work / "run"
    subprocess.run([sys.executable, "-m", "gemmakit.cli", "train", "--model", str(config), "--data", str(corpus),
                    "--out", str(out), "--max-steps", "60", "--seq-len", "64", "--batch-size", "8",
                    "--lr", "3e-3", "--no-progress", "--log-every", "20"], check=True)
    lm = gemmakit.load(out, quantize=None, compile=None, progress=False)
    prompt = lm.tokenizer.encode("the cat sat on a mat and a dog ran far from home while")
    results = {}
    for type in ("f16", "q8_0"):
        path = work / f"trained-{type}.gguf"
        subprocess.run([sys.executable, "-m", "gemmakit.cli", "convert", str(out), str(path), "--type", type],
                       check=True, capture_output=True)
        on_file = gemmakit.load(path, quantize=None, compile=None, progress=False)
        results[type] = compare(path, on_file, prompt, args.new_tokens, args.threads)
        print("trained", type, results[type], flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="tiny,real,trained")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("GEMMAKIT_COMPILE", "eager")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.only.split(","):
            work = Path(tmp) / part
            work.mkdir()
            results[part] = {"tiny": tiny, "real": real, "trained": trained}[part](work, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    failed = [key for part in results.values() for key, r in _flat(part) if not r["ok"]]
    print("all agree" if not failed else f"outside tolerance: {failed}")
    return 1 if failed else 0


def _flat(part: dict, prefix: str = ""):
    for key, value in part.items():
        if isinstance(value, dict) and "ok" in value:
            yield prefix + key, value
        elif isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key} ")


if __name__ == "__main__":
    sys.exit(main())
