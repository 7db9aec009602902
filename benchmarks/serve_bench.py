"""gemmakit's server against llama.cpp's llama-server and vLLM's CPU build, streamed, one server at a time.

Every server serves the same model (gemmakit and llama-server the GGUF itself, vLLM the Hugging Face
folder `gemmakit convert` writes from it, in bfloat16) on the same CPU threads, with room for 16
requests of `--context` tokens each, and gets the same greedy (temperature 0) `/v1/completions`
requests, streamed as server-sent events (httpx): the time to the first text chunk and the gaps
between text chunks are taken as each chunk arrives. `ignore_eos` goes to every server that does
not refuse it, `stream_options.include_usage` counts completion tokens where a server answers it
(else text chunks count). Servers run one at a time in the order given: start, warm up (for
gemmakit, after its background compile of the decode step has finished: short completions until two
in a row decode at the same speed, then one round of --slots at once), the scenarios, stop.

  clients-N      N concurrent clients (--clients), each sending --requests-per-client completions of
                 --max-tokens tokens back to back, short distinct prompts.
  shared-prefix  --prefix-requests requests sharing one --prefix-tokens system prompt (GPL-3's
                 preamble repeated), each its own short question, --prefix-max-tokens tokens: the first
                 alone (nothing cached), then the others at once. TTFT of the first, p50/p99 of the
                 others, their ratio.
  long-prompt    --streams streams decoding --stream-tokens tokens; once all stream (and each has
                 --idle-chunks more chunks), one --long-tokens prompt arrives. The streams' inter-token
                 latency while it prefills (arrival to its first token) against before it (idle).

Per server and scenario: completion tokens/s over the scenario's wall time, TTFT and ITL p50/p99
(nearest rank), requests that stopped before their token budget. How the peers were built and
installed: benchmarks/peers.md. The results replace this script's section of benchmarks/RESULTS.md
with --write only.

    pip install -e ".[serve,default-model]" && pip install -r benchmarks/requirements.txt
    python benchmarks/serve_bench.py                             # all three servers, prints the tables
    python benchmarks/serve_bench.py --write                     # ... and writes them to RESULTS.md
    python benchmarks/serve_bench.py --max-tokens 8 --requests-per-client 1 --clients 1 4 \\
        --prefix-tokens 200 --prefix-requests 4 --streams 3 --stream-tokens 48 --long-tokens 600   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

HERE = Path(__file__).parent
REPO = HERE.parent
RESULTS = HERE / "RESULTS.md"
START, END = "<!-- serve_bench:start -->", "<!-- serve_bench:end -->"
PEERS = Path("/work/peers")
LLAMA_SERVER = PEERS / "llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server"
VLLM_PYTHON = PEERS / "vllm-venv/bin/python"
HF_FOLDER = PEERS / "gemma3-270m-hf"
FILLER = REPO / "tests/data/gpl3_preamble.txt"
SERVERS = ["gemmakit", "llama-server", "vllm"]

SHORT = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
         "The three laws of thermodynamics are", "A good breakfast includes", "Water boils at",
         "The history of the printing press", "My favourite programming language is"]
QUESTIONS = ["What does the licence protect?", "Who may copy the software?", "What must a distributor pass on?",
             "Why are patents a danger?", "What is copyleft?", "What does 'free' refer to?",
             "Which rights does the licence give?", "What must modified versions say?"]
SHARED_HEAD = "Below is the preamble of a software licence. Read it, then answer the question after it.\n\n"
LONG_HEAD = "Summarise the following text in one paragraph.\n\n"


def short_prompt(k: int) -> str:
    """The k-th short prompt: distinct for every k, so no request finds another's prompt cached."""
    return f"{k + 1}. {SHORT[k % len(SHORT)]}"


# -- one streamed request ---------------------------------------------------------------------------

@dataclass
class Trace:
    """One streamed completion: when it was sent, when each text chunk arrived, what it cost."""

    sent: float = 0.0
    chunks: list[float] = field(default_factory=list)  # perf_counter() of each chunk carrying text
    text: str = ""
    tokens: int = 0  # completion tokens: the server's usage where it gives it, else text chunks
    finish: str | None = None
    done: bool = False

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent

    def gaps(self) -> list[tuple[float, float]]:
        return list(zip(self.chunks, self.chunks[1:]))


@dataclass
class Server:
    """A running server: where it listens, the model id it answers to, the fields it takes."""

    name: str
    url: str
    model: str
    proc: subprocess.Popen
    extra: dict = field(default_factory=dict)  # ignore_eos / stream_options, the ones it does not refuse


async def complete(http: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int,
                   trace: Trace | None = None) -> Trace:
    """Stream one greedy completion into `trace`, timing every chunk as it arrives."""
    trace = trace or Trace()
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            **server.extra}
    usage = None
    trace.sent = time.perf_counter()
    try:
        async with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RequestRefused(r.status_code, (await r.aread()).decode(errors="replace"))
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        trace.chunks.append(now)
                        trace.text += choice["text"]
                    trace.finish = choice.get("finish_reason") or trace.finish
    finally:
        trace.done = True
    trace.tokens = usage if usage is not None else len(trace.chunks)
    return trace


class RequestRefused(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status, self.body = status, body


def client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    return httpx.AsyncClient(timeout=httpx.Timeout(1800, connect=30), limits=limits)


def one(server: Server, prompt: str, max_tokens: int) -> Trace:
    async def go():
        async with client() as http:
            return await complete(http, server, prompt, max_tokens)
    return asyncio.run(go())


# -- starting, warming up and stopping a server ------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(args, port: int) -> dict[str, tuple[list[str], dict]]:
    """Each server's command line and environment, serving 16 (--slots) requests of --context tokens."""
    base = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    return {
        "gemmakit": ([sys.executable, "-m", "gemmakit.cli", "serve", "--model", args.model, "--port", str(port),
                      "--threads", str(args.threads), "--max-batch", str(args.slots), "--context", str(args.context)]
                     + shlex.split(args.gemmakit_args), base),
        # -c is split evenly across the -np slots (its unified KV pool is off when -np is given): every
        # slot holds --context tokens, as a row of gemmakit's cache and a request of vLLM's do.
        "llama-server": ([args.llama_server, "-m", args.model, "--host", "127.0.0.1", "--port", str(port),
                          "-t", str(args.threads), "-np", str(args.slots), "-cb", "-c", str(args.slots * args.context)]
                         + shlex.split(args.llama_args), base),
        # Threads: one OpenMP thread per core it is given (VLLM_CPU_OMP_THREADS_BIND); its automatic
        # binding would keep one of 2 cores for its scheduler.
        "vllm": ([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", args.hf_folder,
                  "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(port),
                  "--max-model-len", str(args.context)] + shlex.split(args.vllm_args),
                 base | {"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib),
                         "VLLM_CPU_OMP_THREADS_BIND": args.vllm_cpus or f"0-{args.threads - 1}"}),
    }


def shown(args, name: str) -> str:
    """The command line as a shell would take it: the environment it sets, the port left open."""
    cmd, env = commands(args, 0)[name]
    sets = [f"{k}={shlex.quote(v)}" for k, v in env.items() if os.environ.get(k) != v]
    return " ".join(sets + [shlex.join(cmd).replace("--port 0", "--port PORT")])


def start(name: str, args, log) -> Server:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd, env = commands(args, port)[name]
    print(f"starting {name}: {shlex.join(cmd)} (log: {log.name})", file=sys.stderr)
    # Its own process group, so that stop() reaches the workers it forks (vLLM's engine core).
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + args.start_timeout
    while True:
        if proc.poll() is not None:
            raise ServerFailed(f"{name} exited with {proc.returncode} while starting; see {log.name}")
        if time.monotonic() > deadline:
            stop(proc)
            raise ServerFailed(f"{name} did not come up in {args.start_timeout} s; see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                models = httpx.get(url + "/v1/models", timeout=5)
                if models.status_code == 200:
                    return Server(name, url, models.json()["data"][0]["id"], proc)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


class ServerFailed(Exception):
    pass


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (all three shut down on it; SIGINT may be ignored in a background job) to its group."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)  # the server or a worker of its group still there
        except ProcessLookupError:
            break
        proc.poll()  # reap it, so that a finished server is not a zombie of the group
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def probe_fields(server: Server) -> None:
    """Keep the fields the server does not refuse: ignore_eos (llama.cpp's and vLLM's name), then
    stream_options.include_usage (OpenAI's). A server that ignores a field silently keeps it."""
    wanted = {"ignore_eos": True, "stream_options": {"include_usage": True}}
    for drop in [None, "ignore_eos", "stream_options"]:
        wanted.pop(drop, None)
        server.extra = dict(wanted)
        try:
            one(server, short_prompt(0), 2)
            return
        except RequestRefused as e:
            if e.status != 400:
                raise
            print(f"{server.name} refuses {list(wanted)}: {e}", file=sys.stderr)
    raise ServerFailed(f"{server.name} refuses a plain streamed completion")


def compiling(pid: int) -> bool:
    """Whether gemmakit's server still runs its background compile (a child running gemmakit.runtime.aot)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"gemmakit.runtime.aot" in (stat.parent / "cmdline").read_bytes():
                return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def warm_up(server: Server, args) -> float:
    """Short completions (at least 3) until two in a row decode within 10% of each other, then one
    round of --slots at once; gemmakit first finishes compiling its decode step in the background
    (`--compile auto`, its default), which takes a core meanwhile and swaps the compiled step in once
    it is there. Returns the last batch-1 completion's ms per token."""
    probe_fields(server)
    if server.name == "gemmakit":
        deadline = time.monotonic() + args.start_timeout
        with tqdm(desc="gemmakit: background compile of the decode step", unit="s", leave=False) as bar:
            while compiling(server.proc.pid) and time.monotonic() < deadline:
                time.sleep(1)
                bar.update()
    times = []
    for _ in range(10):
        trace = one(server, short_prompt(1), 32)
        gaps = [b - a for a, b in trace.gaps()]
        times.append(1000 * sum(gaps) / max(1, len(gaps)))
        if len(times) >= 3 and abs(times[-1] - times[-2]) <= 0.1 * times[-2]:
            break
    ms = times[-1]

    async def full():
        async with client() as http:
            await asyncio.gather(*(complete(http, server, short_prompt(1000 + k), 8) for k in range(args.slots)))
    asyncio.run(full())
    print(f"{server.name}: warm, {ms:.1f} ms a token at batch 1, fields {server.extra}; "
          f"{short_prompt(1)!r} -> {trace.text!r}", file=sys.stderr)
    return ms


# -- prompts ---------------------------------------------------------------------------------------

def count_tokens(server: Server, text: str) -> int:
    """Prompt tokens as the server counts them (<bos> included): each server's /tokenize."""
    body = ({"content": text, "add_special": True} if server.name == "llama-server"
            else {"model": server.model, "prompt": text})
    r = httpx.post(server.url + "/tokenize", json=body, timeout=60)
    r.raise_for_status()
    return len(r.json()["tokens"])


def fitted(server: Server, head: str, tail: str, target: int) -> str:
    """head + the longest prefix (in words) of the repeated filler text + tail within `target` tokens."""
    text = FILLER.read_text()
    pieces = re.findall(r"\S+\s*", text * (4 + 2 * target // len(text.split())))
    lo, hi = 0, len(pieces)
    while lo < hi:  # the most words that fit
        mid = (lo + hi + 1) // 2
        if count_tokens(server, head + "".join(pieces[:mid]) + tail) <= target:
            lo = mid
        else:
            hi = mid - 1
    return head + "".join(pieces[:lo]) + tail


@dataclass
class Prompts:
    """The long prompts, fitted once with the first server's tokenizer and sent as the same text to all."""

    shared: str  # the shared system prompt, without a question
    long: str

    @staticmethod
    def fit(server: Server, args) -> Prompts:
        return Prompts(fitted(server, SHARED_HEAD, "\n\n", args.prefix_tokens),
                       fitted(server, LONG_HEAD, "\n\nSummary:", args.long_tokens))

    def question(self, i: int) -> str:
        return f"{self.shared}Question {i + 1}: {QUESTIONS[i % len(QUESTIONS)]}\nAnswer:"


# -- scenarios -------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Nearest rank (with few samples, p99 is the largest)."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(1, min(len(s), round(q * len(s) + 0.5))) - 1]


def summary(scenario: str, traces: list[Trace], seconds: float, budgets: list[int], **extra) -> dict:
    texts = [t for t in traces if t.chunks]
    return {"scenario": scenario, "requests": len(traces), "tokens": sum(t.tokens for t in traces),
            "seconds": seconds, "tok_s": sum(t.tokens for t in traces) / seconds,
            "ttft": [t.ttft for t in texts], "itl": [b - a for t in texts for a, b in t.gaps()],
            "early": sum(t.tokens < n for t, n in zip(traces, budgets)), **extra}


async def clients(server: Server, args, n: int) -> dict:
    per = args.requests_per_client
    bar = tqdm(total=n * per, desc=f"{server.name} clients-{n}", leave=False)

    async def one_client(http, c: int) -> list[Trace]:
        out = []
        for i in range(per):
            out.append(await complete(http, server, short_prompt(100 + c * per + i), args.max_tokens))
            bar.update()
        return out

    async with client() as http:
        t0 = time.perf_counter()
        traces = [t for ts in await asyncio.gather(*(one_client(http, c) for c in range(n))) for t in ts]
        seconds = time.perf_counter() - t0
    bar.close()
    return summary(f"clients-{n}", traces, seconds, [args.max_tokens] * len(traces))


async def shared_prefix(server: Server, args, prompts: Prompts) -> dict:
    n, budget = args.prefix_requests, args.prefix_max_tokens
    async with client() as http:
        t0 = time.perf_counter()
        first = await complete(http, server, prompts.question(0), budget)  # nothing of it cached yet
        rest = await asyncio.gather(*(complete(http, server, prompts.question(i), budget) for i in range(1, n)))
        seconds = time.perf_counter() - t0
    out = summary("shared-prefix", [first, *rest], seconds, [budget] * n)
    rest_ttft = [t.ttft for t in rest if t.chunks]
    out["ttft"] = rest_ttft  # the main table's TTFT columns: the 2nd..nth, which may reuse the prefix
    out |= {"prompt_tokens": count_tokens(server, prompts.question(0)), "first_ttft": first.ttft,
            "rest_p50": percentile(rest_ttft, 0.5), "rest_p99": percentile(rest_ttft, 0.99)}
    return out


async def until(condition, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError("the streams did not reach the state the scenario waits for")
        await asyncio.sleep(0.005)


async def long_prompt(server: Server, args, prompts: Prompts) -> dict:
    n = args.streams
    streams = [Trace() for _ in range(n)]
    async with client() as http:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(complete(http, server, short_prompt(200 + k), args.stream_tokens, streams[k]))
                 for k in range(n)]
        await until(lambda: all(t.chunks or t.done for t in streams), args.start_timeout)
        streaming = time.perf_counter()  # every stream has its first token
        await until(lambda: all(sum(c > streaming for c in t.chunks) >= args.idle_chunks or t.done
                                for t in streams), args.start_timeout)
        long = await complete(http, server, prompts.long, args.long_max_tokens)
        await asyncio.gather(*tasks)  # raises what a stream raised
        seconds = time.perf_counter() - t0
    arrival = long.sent
    first = long.chunks[0] if long.chunks else time.perf_counter()
    idle = [b - a for t in streams for a, b in t.gaps() if a >= streaming and b <= arrival]
    # a gap overlapping the prefill: a stream stalled through all of it shows as one gap spanning it
    during = [b - a for t in streams for a, b in t.gaps() if b > arrival and a < first]
    out = summary("long-prompt", [*streams, long], seconds, [args.stream_tokens] * n + [args.long_max_tokens])
    out["ttft"] = [t.ttft for t in streams if t.chunks]
    out["itl"] = [b - a for t in streams for a, b in t.gaps()]
    out |= {"prompt_tokens": count_tokens(server, prompts.long), "prefill_s": first - arrival,
            "alive": sum(bool(t.chunks) and t.chunks[-1] >= first for t in streams), "streams": n,
            "idle_p50": percentile(idle, 0.5), "idle_p99": percentile(idle, 0.99),
            "during_p50": percentile(during, 0.5), "during_p99": percentile(during, 0.99)}
    return out


def run_scenarios(server: Server, args, prompts: Prompts) -> list[dict]:
    out = []
    for scenario in args.scenarios:
        if scenario == "clients":
            for n in args.clients:
                out.append(asyncio.run(clients(server, args, n)))
        elif scenario == "shared-prefix":
            out.append(asyncio.run(shared_prefix(server, args, prompts)))
        else:
            out.append(asyncio.run(long_prompt(server, args, prompts)))
        r = out[-1]
        print(f"{server.name:12} {r['scenario']:13} {r['tok_s']:7.1f} tok/s, TTFT p50 {percentile(r['ttft'], .5):.3f} s, "
              f"ITL p50 {1000 * percentile(r['itl'], .5):.1f} ms p99 {1000 * percentile(r['itl'], .99):.1f} ms",
              file=sys.stderr)
    return out


# -- what ran, and the report ----------------------------------------------------------------------

def cpu_name() -> str:
    text = Path("/proc/cpuinfo").read_text()
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    flags = set(re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE).group(1).split())
    units = [u for u in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if u in flags]
    return f"{name.group(1).strip() if name else 'unknown CPU'} ({', '.join(units)}; {os.cpu_count()} CPUs)"


def output(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"


def versions(args, names: list[str]) -> dict[str, str]:
    """One line per server: its version and build."""
    out = {}
    if "gemmakit" in names:
        head = output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
        dirty = " + uncommitted changes" if output(["git", "-C", str(REPO), "status", "--porcelain", "src"]) else ""
        out["gemmakit"] = (f"gemmakit {head}{dirty} (torch {importlib.metadata.version('torch')}), its default mode "
                           f"(int8 weights, decode step compiled ahead of time)")
    if "llama-server" in names:
        version = re.search(r"version: (.+)", output([args.llama_server, "--version"]))
        cache = Path(args.llama_server).resolve().parent.parent / "CMakeCache.txt"
        flags = re.findall(r"^(GGML_(?:NATIVE|AVX\w*|AMX\w*|CPU_REPACK)):BOOL=(\w+)",
                           cache.read_text() if cache.exists() else "", re.MULTILINE)
        on = [k for k, v in flags if v == "ON"]
        off = [k for k, v in flags if v != "ON"]
        out["llama-server"] = (f"llama.cpp llama-server {version.group(1) if version else '(version unknown)'}, "
                               f"from llama-cpp-python 0.3.36's vendor/llama.cpp, CMake Release with "
                               f"{', '.join(on) or '?'} on and {', '.join(off) or '?'} off")
    if "vllm" in names:
        script = "import importlib.metadata as m; print(m.version('vllm-cpu'), '(torch', m.version('torch') + ')')"
        out["vllm"] = "vllm-cpu " + output([args.vllm_python, "-c", script])
    return out


def fmt(seconds: float, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * scale:.{digits}f}"


def tables(rows: list[tuple[str, dict]]) -> str:
    out = [("| server | scenario | requests | completion tokens | tokens/s | TTFT p50 (s) | TTFT p99 (s) | "
            "ITL p50 (ms) | ITL p99 (ms) | stopped early |"),
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        out.append(f"| {name} | {r['scenario']} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | "
                   f"{fmt(percentile(r['ttft'], .5))} | {fmt(percentile(r['ttft'], .99))} | "
                   f"{fmt(percentile(r['itl'], .5), 1000, 1)} | {fmt(percentile(r['itl'], .99), 1000, 1)} | "
                   f"{r['early']} |")
    shared = [(n, r) for n, r in rows if r["scenario"] == "shared-prefix"]
    if shared:
        out += ["", ("| server | shared-prefix: prompt tokens | first TTFT (s) | others' TTFT p50 (s) | "
                     "others' p99 (s) | p50 / first | tokens/s |"), "|---|---:|---:|---:|---:|---:|---:|"]
        for name, r in shared:
            out.append(f"| {name} | {r['prompt_tokens']} | {r['first_ttft']:.3f} | {fmt(r['rest_p50'])} | "
                       f"{fmt(r['rest_p99'])} | {fmt(r['rest_p50'] / r['first_ttft'], digits=2)} | {r['tok_s']:.1f} |")
    long = [(n, r) for n, r in rows if r["scenario"] == "long-prompt"]
    if long:
        out += ["", ("| server | long-prompt: prompt tokens | its prefill (s) | streams decoding through it | "
                     "ITL idle p50 (ms) | idle p99 (ms) | during prefill p50 (ms) | during p99 (ms) | "
                     "p99 during / idle |"),
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in long:
            out.append(f"| {name} | {r['prompt_tokens']} | {r['prefill_s']:.2f} | {r['alive']}/{r['streams']} | "
                       f"{fmt(r['idle_p50'], 1000, 1)} | {fmt(r['idle_p99'], 1000, 1)} | "
                       f"{fmt(r['during_p50'], 1000, 1)} | {fmt(r['during_p99'], 1000, 1)} | "
                       f"{fmt(r['during_p99'] / r['idle_p99'], digits=1)} |")
    return "\n".join(out)


def write_results(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    block = f"{START}\n{section}\n{END}"
    if START in text and END in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.DOTALL)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, RESULTS)  # another benchmark may write its own section of the same file


def report(args, rows, about: dict, starts: dict, failed: dict, load_before: float) -> str:
    how = (f"`python benchmarks/serve_bench.py {shlex.join(sys.argv[1:])}` on {cpu_name()}, "
             f"{time.strftime('%Y-%m-%d %H:%M')}; load average before the run {load_before:.1f} (other work on the "
             f"box skews absolute numbers). Servers ran one at a time, in this order: {', '.join(args.only)}; each "
             f"with {args.threads} threads and room for {args.slots} requests of {args.context} tokens, warmed up "
             f"before its scenarios. Greedy `/v1/completions`, streamed; TTFT from sending to the first text chunk, "
             f"ITL the gaps between text chunks; tokens/s counts completion tokens over each scenario's wall time. "
             f"clients-N: each client sends {args.requests_per_client} request(s) of {args.max_tokens} tokens, back "
             f"to back. shared-prefix: {args.prefix_requests} requests of {args.prefix_max_tokens} tokens, one alone "
             f"then the rest at once (TTFT columns: the rest). long-prompt: {args.streams} streams of "
             f"{args.stream_tokens} tokens, then one long prompt ({args.long_max_tokens} tokens); its ITL columns "
             f"are the streams'. How the peers were built: [peers.md](peers.md).")
    lines = ["## Serving: gemmakit vs llama.cpp's llama-server and vLLM (CPU), streamed", "", how, ""]
    for name in args.only:
        if name in about:
            lines.append(f"- **{name}**: {about[name]}; `{starts.get(name, '(did not start)')}`")
    lines += ["", tables(rows), ""]
    early = {(n, r["scenario"]) for n, r in rows if r["early"]}
    if early:
        lines.append("Stopped early: requests that ended (at `<eos>`) before their token budget, on servers "
                     "without `ignore_eos`; their tokens are the ones they produced.")
    for name, why in failed.items():
        lines.append(f"{name} failed: {why}")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: the real Gemma 3 270M Q4_K_M)")
    p.add_argument("--hf-folder", default=str(HF_FOLDER), help="vLLM's model: `gemmakit convert GGUF FOLDER`")
    p.add_argument("--llama-server", default=str(LLAMA_SERVER), help="llama.cpp's llama-server binary")
    p.add_argument("--vllm-python", default=str(VLLM_PYTHON), help="the python of the venv with vllm-cpu")
    p.add_argument("--only", default=",".join(SERVERS), help="servers to run, in this order (comma-separated)")
    p.add_argument("--scenarios", default="clients,shared-prefix,long-prompt",
                   help="comma-separated, from clients, shared-prefix, long-prompt")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for each server")
    p.add_argument("--slots", type=int, default=16, help="requests decoded together (gemmakit --max-batch, "
                                                          "llama-server -np)")
    p.add_argument("--context", type=int, default=10240, help="tokens per request, prompt and completion")
    p.add_argument("--max-tokens", type=int, default=64, help="clients-N: completion tokens per request")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prefix-tokens", type=int, default=2000, help="shared-prefix: the shared system prompt")
    p.add_argument("--prefix-requests", type=int, default=16)
    p.add_argument("--prefix-max-tokens", type=int, default=16)
    p.add_argument("--streams", type=int, default=15, help="long-prompt: streams decoding when it arrives")
    p.add_argument("--stream-tokens", type=int, default=256, help="long-prompt: each stream's completion tokens")
    p.add_argument("--idle-chunks", type=int, default=8, help="long-prompt: chunks each stream gets before it")
    p.add_argument("--long-tokens", type=int, default=8000, help="long-prompt: the long prompt's tokens")
    p.add_argument("--long-max-tokens", type=int, default=16)
    p.add_argument("--vllm-kv-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE (its KV cache, GiB)")
    p.add_argument("--vllm-cpus", default=None, help="VLLM_CPU_OMP_THREADS_BIND (default: 0-<threads-1>)")
    p.add_argument("--gemmakit-args", default="", help="more options for `gemmakit serve`")
    p.add_argument("--llama-args", default="", help="more options for llama-server")
    p.add_argument("--vllm-args", default="", help="more options for vLLM's api_server")
    p.add_argument("--start-timeout", type=int, default=1200, help="seconds a server (and gemmakit's background "
                                                                    "compile) may take to come up")
    p.add_argument("--write", action="store_true", help="replace this script's section of benchmarks/RESULTS.md")
    args = p.parse_args()
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for name in args.only:
        if name not in SERVERS:
            p.error(f"--only: unknown server {name!r} (choose from {', '.join(SERVERS)})")
    for s in args.scenarios:
        if s not in ("clients", "shared-prefix", "long-prompt"):
            p.error(f"--scenarios: unknown scenario {s!r}")
    if args.long_tokens + args.long_max_tokens > args.context or args.prefix_tokens + 64 > args.context:
        p.error(f"--context {args.context} is too small for --long-tokens/--prefix-tokens")
    if "llama-server" in args.only and not Path(args.llama_server).is_file():
        p.error(f"--llama-server {args.llama_server}: no such file (build it as benchmarks/peers.md says)")
    if "vllm" in args.only and not (Path(args.vllm_python).is_file() and Path(args.hf_folder).is_dir()):
        p.error(f"--vllm-python {args.vllm_python} / --hf-folder {args.hf_folder}: missing (see benchmarks/peers.md)")
    if args.model is None:
        from gemmakit.checkpoints.default import default_model_path

        args.model = str(default_model_path())

    about = versions(args, args.only)
    load_before = os.getloadavg()[0]
    rows, starts, failed, prompts = [], {}, {}, None
    for name in args.only:
        with tempfile.NamedTemporaryFile("w", prefix=f"serve_bench_{name}_", suffix=".log", delete=False) as log:
            try:
                server = start(name, args, log)
            except ServerFailed as e:
                print(e, file=sys.stderr)
                failed[name] = str(e)
                continue
            starts[name] = shown(args, name)
            try:
                warm_up(server, args)
                if prompts is None and set(args.scenarios) & {"shared-prefix", "long-prompt"}:
                    prompts = Prompts.fit(server, args)
                rows += [(name, r) for r in run_scenarios(server, args, prompts)]
            except Exception as e:  # noqa: BLE001 - the other servers still run; the report names it
                print(f"{name} failed: {e!r}; see {log.name}", file=sys.stderr)
                failed[name] = f"{type(e).__name__}: {e} (log: {log.name})"
            finally:
                stop(server.proc)
    section = report(args, rows, about, starts, failed, load_before)
    print(section)
    if args.write:
        write_results(section)
        print(f"wrote {RESULTS}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
