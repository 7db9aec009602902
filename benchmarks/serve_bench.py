"""gemmakit's server against llama.cpp's OpenAI-compatible server (llama-cpp-python[server]).

Both serve the same GGUF with the same CPU threads; the same greedy completion requests go to each
at 1, 4 and 16 concurrent clients. Reported per server and concurrency: requests/s, completion
tokens/s over the whole run, and p50/p99 request latency. The results replace this script's
section of benchmarks/RESULTS.md.

    pip install -r benchmarks/requirements.txt
    python benchmarks/serve_bench.py [--model GGUF] [--threads 2] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from tqdm import tqdm

HERE = Path(__file__).parent
RESULTS = HERE / "RESULTS.md"
START, END = "<!-- serve_bench:start -->", "<!-- serve_bench:end -->"
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three laws of thermodynamics are", "A good breakfast includes", "Water boils at",
           "The history of the printing press", "My favourite programming language is"]


# llama_cpp.server exposes no switch for llama_model_params.use_extra_bufts; set it the one way there is.
LLAMA_NO_EXTRA_BUFFERS = """
import llama_cpp.llama_cpp as C
default = C.llama_model_default_params
def params():
    p = default()
    p.use_extra_bufts = False
    return p
C.llama_model_default_params = params
from llama_cpp.server.__main__ import main
main()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, env: dict, log) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited with {proc.returncode}; see {log.name}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"{' '.join(cmd)} did not come up in 10 minutes; see {log.name}")
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def model_id(url: str) -> str:
    return httpx.get(url + "/v1/models").json()["data"][0]["id"]


def run_load(url: str, model: str, clients: int, requests: int, max_tokens: int, desc: str) -> dict:
    """`requests` greedy completions from `clients` concurrent clients; latency of each, tokens of all."""
    bodies = [{"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
              for i in range(requests)]

    def one(body) -> tuple[float, int]:
        t = time.perf_counter()
        r = http.post(url + "/v1/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

    def counted(body) -> tuple[float, int]:
        out = one(body)
        bar.update()
        return out

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    with httpx.Client(timeout=600, limits=limits) as http:
        one(bodies[0])  # warm-up: first-call allocations do not count
        with tqdm(total=requests, desc=desc, leave=False) as bar:
            start_time = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                done = list(pool.map(counted, bodies))
            wall = time.perf_counter() - start_time
    latencies = sorted(d[0] for d in done)
    tokens = sum(d[1] for d in done)
    return {"clients": clients, "requests": requests, "tokens": tokens, "seconds": wall,
            "req_s": requests / wall, "tok_s": tokens / wall,
            "p50": statistics.median(latencies), "p99": percentile(latencies, 0.99)}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (with few samples, p99 is the slowest request)."""
    rank = max(1, min(len(sorted_values), round(q * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def table(rows: list[tuple[str, dict]]) -> str:
    out = ["| server | clients | requests | req/s | tokens/s | p50 latency (s) | p99 latency (s) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        out.append(f"| {name} | {r['clients']} | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | "
                   f"{r['p50']:.2f} | {r['p99']:.2f} |")
    return "\n".join(out)


def write_results(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    block = f"{START}\n{section}\n{END}"
    if START in text and END in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, RESULTS)  # another benchmark may write its own section of the same file


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the real Gemma 3 270M Q4_K_M)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for each server")
    p.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--dtype", default="float32", help="gemmakit's weights (llama.cpp computes on the GGUF's own)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="gemmakit's weight-only quantization")
    p.add_argument("--compile", action="store_true", help="gemmakit serve --compile (torch.compile'd decode step)")
    p.add_argument("--servers", nargs="+", default=["gemmakit", "llama.cpp"], choices=["gemmakit", "llama.cpp"])
    p.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    p.add_argument("--no-extra-buffers", action="store_true",
                   help="llama.cpp without its extra CPU buffer types (AMX, repacked weights): for machines that "
                        "advertise AMX but fault on it (Illegal instruction)")
    args = p.parse_args()
    if args.model is None:
        from gemmakit.checkpoints.default import default_model_path

        args.model = str(default_model_path())
    context = 512
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    commands = {
        "gemmakit": lambda port: [sys.executable, "-m", "gemmakit.cli", "serve", "--model", args.model,
                                  "--port", str(port), "--threads", str(args.threads), "--dtype", args.dtype,
                                  "--max-batch", str(max(args.clients)), "--context", str(context)]
                                 + (["--quantize", args.quantize] if args.quantize else [])
                                 + (["--compile"] if args.compile else []),
        "llama.cpp": lambda port: [sys.executable, "-c", LLAMA_NO_EXTRA_BUFFERS if args.no_extra_buffers else
                                   "from llama_cpp.server.__main__ import main; main()", "--model", args.model,
                                   "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(args.threads),
                                   "--n_threads_batch", str(args.threads), "--n_ctx", str(context)],
    }
    load_before = os.getloadavg()[0]
    rows = []
    for name in args.servers:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with tempfile.NamedTemporaryFile("w", prefix=f"serve_bench_{name}_", suffix=".log", delete=False) as log:
            print(f"starting {name} (log: {log.name})", file=sys.stderr)
            proc = start(commands[name](port), url, env, log)
            try:
                model = model_id(url)
                for clients in args.clients:
                    r = run_load(url, model, clients, clients * args.requests_per_client, args.max_tokens,
                                 f"{name} x{clients}")
                    print(f"{name:9} {clients:3} clients: {r['req_s']:.2f} req/s, {r['tok_s']:.1f} tok/s, "
                          f"p50 {r['p50']:.2f}s, p99 {r['p99']:.2f}s", file=sys.stderr)
                    rows.append((name, r))
            finally:
                stop(proc)

    ours = {r["clients"]: r for n, r in rows if n == "gemmakit"}
    weights = (f"{args.quantize} weights (`--quantize {args.quantize}`), {args.dtype} activations" if args.quantize
               else f"dequantized to {args.dtype}") + (", `--compile`" if args.compile else "")
    lines = ["## Serving: gemmakit vs llama.cpp's OpenAI server", "",
             f"`python benchmarks/serve_bench.py {' '.join(sys.argv[1:])}` on "
             f"{platform.machine()} with {os.cpu_count()} CPUs ({platform.processor() or platform.platform()}), "
             f"{time.strftime('%Y-%m-%d')}. Model: `{Path(args.model).name}` (gemmakit: {weights}; llama.cpp "
             f"runs the GGUF's own quantized weights). Each client sends greedy "
             f"`/v1/completions` requests of {args.max_tokens} tokens back to back, "
             f"{args.requests_per_client} per client; tokens/s counts completion tokens over the wall time. "
             f"Load average before the run: {load_before:.1f} (other work on the box skews absolute numbers).",
             "", table(rows), ""]
    if args.no_extra_buffers and "llama.cpp" in args.servers:
        lines += ["llama.cpp ran without its extra CPU buffer types (`--no-extra-buffers`: this VM advertises AMX "
                  "but raises Illegal instruction on it), so without its repacked Q4_K kernels too.", ""]
    if "llama.cpp" not in args.servers:
        lines += ["llama.cpp's server was not part of this run.", ""]
    if 1 in ours and max(args.clients) in ours and max(args.clients) > 1:
        n = max(args.clients)
        lines.append(f"Continuous batching: gemmakit gives {n} concurrent clients "
                     f"{ours[n]['tok_s'] / ours[1]['tok_s']:.2f}x the total tokens/s it gives one client.")
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_results(section)
        print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
