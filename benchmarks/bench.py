"""gemmakit next to llama.cpp and transformers on the same machine, in one run, on the real Gemma 3 270M.

    pip install -r benchmarks/requirements.txt
    python benchmarks/bench.py [--threads 2] [--only gemmakit-int8,llama.cpp] [--plot benchmarks/batch.png] [--repeat 5]

Every engine runs in its own process (so that load time and peak RSS are its own), on the same
prompt token ids (`gemmakit.bench.measure` makes them: a 512-token prefill; 16 prompts of 32
tokens for decoding), with the same threads, and reports one JSON line. The table gives each
figure and its ratio to llama.cpp's; with --repeat, the engines take turns for several rounds and
the table gives medians (ratios of the medians).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

GEMMAKIT = {  # name -> `gemmakit bench` arguments
    "gemmakit": [],  # the default mode, as a user without flags gets it (its compiled step awaited)
    "gemmakit-exact": ["--exact"],
    "gemmakit-bfloat16": ["--quantize", "none", "--compile", "eager", "--dtype", "bfloat16"],
    "gemmakit-int8": ["--quantize", "int8", "--compile", "eager"],
    "gemmakit-int8-compiled": ["--quantize", "int8", "--compile", "torch"],
    "gemmakit-int8-aot": ["--quantize", "int8", "--compile", "aot"],
    "gemmakit-int4": ["--quantize", "int4", "--compile", "eager"],
}
PEERS = ["llama.cpp", "transformers-float32", "transformers-bfloat16"]


def figures(batch_sizes) -> list[tuple[str, str, str]]:
    """(result key, column label, format) for every column of the table."""
    return ([("prefill_tok_s", "prefill tok/s", "{:.0f}")]
            + [(f"decode_b{n}_tok_s", f"decode b{n} tok/s", "{:.1f}") for n in batch_sizes]
            + [("generate_b1_tok_s", "lm.generate b1", "{:.1f}"), ("generate_b16_tok_s", "lm.generate 16 streams", "{:.0f}"),
               ("generate_prefill_tok_s", "lm.generate prefill", "{:.0f}"),
               ("load_s", "load s", "{:.2f}"), ("peak_rss_mb", "peak RSS MiB", "{:.0f}"),
               ("rss_ratio", "RSS / (weights + KV)", "{:.2f}")])


def prompt_ids(vocab: int, n: int) -> list[int]:
    from gemmakit.bench import (
        bench_prompt,  # the very ids gemmakit's own measurement uses
    )

    return bench_prompt(vocab, n)


# -- peers ----------------------------------------------------------------------------------------
def run_llamacpp(path: str, threads: int, prefill: int, decode: int, batch_sizes) -> dict:
    """llama.cpp as its users run it: llama-cpp-python's defaults (repacked CPU weights on)."""
    import llama_cpp as L

    start = time.perf_counter()
    llm = L.Llama(model_path=path, n_ctx=prefill + 64, n_batch=prefill, n_threads=threads,
                  n_threads_batch=threads, verbose=False)
    out = {"load_s": time.perf_counter() - start, "prefill_tokens": prefill, "decode_tokens": decode}
    vocab = llm.n_vocab()
    prompt = prompt_ids(vocab, prefill)
    llm.eval(prompt[:9])  # warm-up
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt[:prefill])
    out["prefill_tok_s"] = prefill / (time.perf_counter() - start)
    out["generate_prefill_tok_s"] = out["prefill_tok_s"]  # Llama.eval is its users' call

    # Batched decoding through llama.cpp's own API: one llama_decode per step for every sequence.
    for n in batch_sizes:
        ctx = LlamaBatch(L, llm, n, n * (32 + decode + 8), max(512, n * 32), threads)
        ctx.decode([(t, p, s, p == 31) for s in range(n) for p, t in enumerate(prompt[s:s + 32])])
        nxt = [ctx.argmax(s * 32 + 31) for s in range(n)]
        pos = 32
        for step in range(decode + 3):
            if step == 3:
                start = time.perf_counter()
            ctx.decode([(nxt[s], pos, s, True) for s in range(n)])
            nxt = [ctx.argmax(s) for s in range(n)]
            pos += 1
        out[f"decode_b{n}_tok_s"] = n * decode / (time.perf_counter() - start)
        ctx.close()
    out |= llamacpp_generate(L, llm, prompt, threads)
    return out


class LlamaBatch:
    """A llama.cpp context for n sequences and a batch of n_batch tokens, driven through its own
    API: `decode(items)` is one llama_decode of (token, position, sequence, wants logits) items."""

    def __init__(self, L, llm, n: int, n_ctx: int, n_batch: int, threads: int):
        params = L.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n_ctx, n_batch, n_batch, n
        params.n_threads = params.n_threads_batch = threads
        new_context = getattr(L, "llama_init_from_model", None) or L.llama_new_context_with_model
        self.L, self.vocab = L, llm.n_vocab()
        self.ctx = new_context(llm.model, params)
        self.batch = L.llama_batch_init(n_batch, 0, n)

    def decode(self, items) -> None:
        batch = self.batch
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, logits
            batch.seq_id[i][0] = seq
        if self.L.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(self, i: int) -> int:
        import numpy as np

        return int(np.argmax(np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,))))

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)


def llamacpp_generate(L, llm, prompt: list[int], threads: int) -> dict:
    """The lm.generate columns' work done as llama.cpp's users do it, timed the same way (the
    prompts' prefill included, a warm-up call first, the timed call on prompts of its own):
    128 greedy tokens after a 32-token prompt through `Llama.generate`; 16 prompts of 32 tokens
    in one llama_decode, then 64 steps of one llama_decode for all 16."""
    from gemmakit.bench import GENERATE_TOKENS

    other = [prompt[0]] + [t + 1 for t in prompt[1:]]
    out = {}
    times = []
    for ids in (prompt[:32], other[:32]):
        llm.reset()
        start = time.perf_counter()
        for i, _ in enumerate(llm.generate(ids, temp=0.0, reset=True)):
            if i + 1 == GENERATE_TOKENS:
                break
        times.append(time.perf_counter() - start)
    out["generate_b1_tok_s"] = GENERATE_TOKENS / times[-1]

    n, new = 16, 64
    for ids in (prompt, other):
        ctx = LlamaBatch(L, llm, n, n * (32 + new + 8), n * 32, threads)
        start = time.perf_counter()
        ctx.decode([(t, p, s, p == 31) for s in range(n) for p, t in enumerate(ids[s:s + 32])])
        nxt = [ctx.argmax(s * 32 + 31) for s in range(n)]
        for step in range(new - 1):
            ctx.decode([(nxt[s], 32 + step, s, True) for s in range(n)])
            nxt = [ctx.argmax(s) for s in range(n)]
        seconds = time.perf_counter() - start
        ctx.close()
    out["generate_b16_tok_s"] = n * new / seconds
    return out


def run_transformers(path: str, threads: int, prefill: int, decode: int, dtype: str, batch_sizes) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=getattr(torch, dtype)).eval()
    out = {"load_s": time.perf_counter() - start, "prefill_tokens": prefill, "decode_tokens": decode}
    prompt = prompt_ids(model.config.vocab_size, prefill)
    with torch.inference_mode():
        model(torch.tensor([prompt[:9]]))
        start = time.perf_counter()
        model(torch.tensor([prompt[:prefill]]), logits_to_keep=1)
        out["prefill_tok_s"] = prefill / (time.perf_counter() - start)
        for n in batch_sizes:
            ids = torch.tensor([prompt[s:s + 32] for s in range(n)])
            res = model(ids, use_cache=True, logits_to_keep=1)
            for step in range(decode + 3):
                if step == 3:
                    start = time.perf_counter()
                nxt = res.logits[:, -1].argmax(-1, keepdim=True)
                res = model(nxt, past_key_values=res.past_key_values, use_cache=True)
            out[f"decode_b{n}_tok_s"] = n * decode / (time.perf_counter() - start)
    return out


def run_one(name: str, args) -> dict:
    if name in GEMMAKIT:
        cmd = [sys.executable, "-m", "gemmakit.cli", "bench", "--json", "--threads", str(args.threads),
               "--prefill-tokens", str(args.prefill_tokens), "--decode-tokens", str(args.decode_tokens),
               "--batch-sizes", ",".join(map(str, args.batch_sizes)), *GEMMAKIT[name]]
        if args.model:
            cmd += ["--model", args.model]
        return _json_of(subprocess.run(cmd, capture_output=True, text=True))
    cmd = [sys.executable, __file__, "--peer", name, "--threads", str(args.threads),
           "--prefill-tokens", str(args.prefill_tokens), "--decode-tokens", str(args.decode_tokens),
           "--batch-sizes", ",".join(map(str, args.batch_sizes))] + (["--model", args.model] if args.model else [])
    return _json_of(subprocess.run(cmd, capture_output=True, text=True))


def _json_of(done: subprocess.CompletedProcess) -> dict:
    if done.returncode:
        errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
        last = (errors or done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"exit {done.returncode}: {last}")  # -4: SIGILL (see RESULTS.md)
    return json.loads(done.stdout.strip().splitlines()[-1])


def peer_main(args) -> None:
    from gemmakit.checkpoints.default import default_model_path

    path = args.model or str(default_model_path())
    if args.peer == "llama.cpp":
        out = run_llamacpp(path, args.threads, args.prefill_tokens, args.decode_tokens, args.batch_sizes)
    else:
        out = run_transformers(path, args.threads, args.prefill_tokens, args.decode_tokens, args.peer.split("-")[1],
                               args.batch_sizes)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def median_of(runs: list[dict]) -> dict:
    """Each numeric figure's median over the runs that succeeded (the first error if none did)."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    out = dict(good[0])
    for key, value in good[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in good)
    return out


def table(results: dict[str, dict], batch_sizes) -> str:
    base = results.get("llama.cpp")
    columns = figures(batch_sizes)
    lines = ["| engine | " + " | ".join(label for _, label, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, r in results.items():
        cells = []
        for key, _, fmt in columns:
            if "error" in r or key not in r:
                cells.append(r.get("error", "-")[:60] if key == columns[0][0] else "-")
                continue
            cell = fmt.format(r[key])
            if base and key in base and name != "llama.cpp":
                cell += f" ({r[key] / base[key]:.2f}x)"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict], args, path: str) -> None:
    """Decode tok/s against batch size for every engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = args.batch_sizes
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in results:
        r = results[name]
        points = [(n, r[f"decode_b{n}_tok_s"]) for n in sizes if f"decode_b{n}_tok_s" in r]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("decode tok/s (all streams)")
    ax.set_xscale("log", base=2)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def cpu_name() -> str:
    """The CPU's model name and the vector units that pick kernels (theirs and ours)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    units = [u for u in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if u in flags]
    return f"{name} ({', '.join(units)})"


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: gemmakit's default model)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", type=lambda t: [int(x) for x in t.split(",")], default=[1, 16],
                   help="decode batch sizes (default 1,16; the plot wants 1,2,4,8,16)")
    p.add_argument("--only", default=None, help="comma-separated engines (default: all): "
                   + ", ".join([*GEMMAKIT, *PEERS]))
    p.add_argument("--plot", default=None, help="write a PNG of tok/s against batch size here")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds, each running every engine once in turn; the table gives each figure's "
                        "median over the rounds (on a shared VM, one round's ratios can be off by 30%%)")
    p.add_argument("--peer", default=None, help=argparse.SUPPRESS)  # internal: run one peer in this process
    args = p.parse_args()
    if args.peer:
        peer_main(args)
        return
    names = args.only.split(",") if args.only else ["llama.cpp", *GEMMAKIT, *PEERS[1:]]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.2f}; llama-cpp-python {_version('llama_cpp_python')}, "
          f"torch {_version('torch')}", flush=True)
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.repeat):
        for name in names:
            try:
                rounds[name].append(run_one(name, args))
            except Exception as e:  # a missing peer must not hide the others' figures
                rounds[name].append({"error": f"{type(e).__name__}: {e}"})
            print(f"{name}: {json.dumps(rounds[name][-1])}", file=sys.stderr, flush=True)
    results = {name: median_of(runs) for name, runs in rounds.items()}
    if args.repeat > 1:
        print(f"medians of {args.repeat} rounds")
    print(table(results, args.batch_sizes))
    if args.plot:
        plot(results, args, args.plot)


if __name__ == "__main__":
    main()
