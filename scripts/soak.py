"""Soak test of `gemmakit serve`: N clients for M minutes, on loopback, then a check for leaks.

    python scripts/soak.py                          # tiny random model, 8 clients, 3 minutes
    python scripts/soak.py --clients 16 --minutes 10 --model default   # the default model (Gemma 3 270M)
    python scripts/soak.py --seconds 30 --json soak.json --plot soak.png

It starts the server (a tiny random Gemma with a tokenizer trained here, unless --model says
otherwise), sends every request of a fixed set alone to learn its answer, loads the server for a
warm-up, then takes its RSS as the baseline. The clients then pick requests at random: completions
and chats, streamed and not, greedy and seeded, n 1 or 2, with stop strings; mixed in are clients
that hang up mid-stream, requests cancelled (the socket closed) before their answer, and bad
requests. Afterwards, with the server idle: its RSS against the baseline, the slots and the
prefix-cache blocks /health shows against what it has, and every completed answer against the
answer the same request got alone. Exit status 1 when a target is missed: RSS drift <= 5%, no
leaked slot or block, no mismatched answer, no 5xx.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

WORDS = ("the quick brown fox jumps over a lazy dog while the model answers the user in turn hello world "
         "gemma reads tokens and pieces of code def return class import print").split()


def train_tokenizer(folder: Path) -> Path:
    """The test suite's tiny SentencePiece model with Gemma's special tokens, for the random model."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import train_sentencepiece

    return train_sentencepiece(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "gemmakit.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue), "--context", str(args.context)]
    if args.model == "tiny":
        cmd += ["--model", "gemma-tiny", "--tokenizer", str(train_tokenizer(folder))]
    elif args.model != "default":
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a first run of the default model converts it once
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}): {(folder / 'server.log').read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not come up in 10 minutes")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)


def rss_bytes(proc: subprocess.Popen | None, url: str) -> int:
    """The server's resident memory: from /proc where it is our child, else from /metrics."""
    if proc is not None:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return int(float(line.split()[1]))
    raise RuntimeError("no RSS: not our child, and /metrics has no process_resident_memory_bytes")


def request_set(model: str, count: int, seed: int, max_tokens: int) -> list[dict]:
    """`count` fixed requests: (path, body) with answers that repeat (greedy, or seeded)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        body = {"model": model, "max_tokens": rng.randint(4, max_tokens), "stream": i % 2 == 1,
                "n": 2 if i % 5 == 0 else 1}
        if i % 3 == 0:
            body.update(temperature=0.8, top_p=0.95, seed=rng.randint(0, 2**32))
        else:
            body.update(temperature=0)
        if i % 4 == 0:
            body["stop"] = [rng.choice(WORDS)]
        if i % 2 == 0:
            out.append({"path": "/v1/completions", "body": {**body, "prompt": text}})
        else:
            out.append({"path": "/v1/chat/completions", "body": {**body, "messages": [{"role": "user", "content": text}]}})
    return out


def answer(client: httpx.Client, spec: dict) -> tuple[int, list[str] | None]:
    """The status and each choice's text (streamed or not)."""
    body, chat = spec["body"], spec["path"].endswith("chat/completions")
    if not body["stream"]:
        r = client.post(spec["path"], json=body)
        if r.status_code != 200:
            return r.status_code, None
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        return 200, [c["message"]["content"] if chat else c["text"] for c in choices]
    texts = [""] * body["n"]
    with client.stream("POST", spec["path"], json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, None
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    return 500, None
                for c in event["choices"]:
                    texts[c["index"]] += (c["delta"].get("content") or "") if chat else c["text"]
    return 200, texts


BAD = [b'{"model": "x", "prompt": "hi"}', b"{not json", b'{"model": "m", "prompt": "\\ud800"}',
       b'{"prompt": [' + b"[" * 5000 + b"]" * 5000 + b"]}", b'{"model": "m", "prompt": "hi", "max_tokens": 1e400}',
       b"\xff\xfe\xfd"]


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.latencies: list[float] = []
        self.mismatches: list[dict] = []

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n


def client_loop(url: str, specs: list[dict], refs: list[list[str]], deadline: float, max_requests: int,
                rng: random.Random, tally: Tally, port: int, sent: list[int]) -> None:
    with httpx.Client(base_url=url, timeout=300) as client:
        while time.monotonic() < deadline:
            with tally.lock:
                if sent[0] >= max_requests:
                    return
                sent[0] += 1
            i = rng.randrange(len(specs))
            spec, roll = specs[i], rng.random()
            try:
                if roll < 0.12:  # hangs up mid-stream, after a few events
                    with httpx.Client(base_url=url, timeout=300) as once:
                        with once.stream("POST", spec["path"], json={**spec["body"], "stream": True}) as r:
                            events = 0
                            for line in r.iter_lines():
                                events += line.startswith("data: {")
                                if events >= rng.randint(1, 3):
                                    break
                    tally.add("disconnected mid-stream")
                elif roll < 0.24:  # cancelled: the socket closes before the answer is complete
                    payload = json.dumps({**spec["body"], "stream": False}).encode()
                    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                        s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: %d\r\n\r\n%s" % (spec["path"].encode(), len(payload), payload))
                        time.sleep(rng.uniform(0, 0.3))
                    tally.add("cancelled")
                elif roll < 0.30:
                    r = client.post("/v1/completions", content=rng.choice(BAD),
                                    headers={"Content-Type": "application/json"})
                    tally.add("bad request: 4xx" if 400 <= r.status_code < 500 else f"bad request: {r.status_code}")
                    if r.status_code >= 500:
                        tally.add("server errors")
                else:
                    start = time.monotonic()
                    status, texts = answer(client, spec)
                    if status == 200:
                        with tally.lock:
                            tally.latencies.append(time.monotonic() - start)
                        tally.add("completed")
                        if texts != refs[i]:
                            tally.add("mismatched")
                            with tally.lock:
                                tally.mismatches.append({"request": spec, "alone": refs[i], "soaked": texts})
                    elif status == 503:
                        tally.add("refused (503 queue full)")
                    else:
                        tally.add(f"status {status}")
                        if status >= 500:
                            tally.add("server errors")
            except httpx.HTTPError as e:
                tally.add(f"client error {type(e).__name__}")


def wait_idle(url: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(url + "/health", timeout=10).json()
        if (health["running"] == health["waiting"] == 0) or time.monotonic() > deadline:
            return health
        time.sleep(0.2)


def load(url, specs, refs, clients, seconds, max_requests, seed, tally, port, rss_track, proc) -> None:
    deadline, sent = time.monotonic() + seconds, [0]
    threads = [threading.Thread(target=client_loop, daemon=True,
                                args=(url, specs, refs, deadline, max_requests, random.Random(seed * 1000 + k), tally,
                                      port, sent)) for k in range(clients)]
    for t in threads:
        t.start()
    start = time.monotonic()
    while any(t.is_alive() for t in threads):
        rss_track.append((time.monotonic() - start, rss_bytes(proc, url)))
        for t in threads:
            t.join(timeout=2.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' (random weights, the default), 'default' (Gemma 3 270M) "
                                                    "or anything `gemmakit serve --model` takes")
    p.add_argument("--url", default=None, help="soak a server already running here instead (RSS from /metrics)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--seconds", type=float, default=None, help="instead of --minutes")
    p.add_argument("--warmup", type=float, default=None, help="seconds of load before the baseline (default: "
                                                             "a fifth of the run, 20 s at least)")
    p.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    p.add_argument("--requests", type=int, default=24, help="distinct requests in the set")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--plot", default=None, help="write the RSS over time here (PNG; needs matplotlib)")
    args = p.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    warmup = args.warmup if args.warmup is not None else max(20.0, seconds / 5)

    with tempfile.TemporaryDirectory(prefix="gemmakit-soak-") as tmp:
        proc, url = (None, args.url.rstrip("/")) if args.url else start_server(args, Path(tmp))
        try:
            port = httpx.URL(url).port
            model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
            specs = request_set(model, args.requests, args.seed, args.max_tokens)
            refs = []
            with httpx.Client(base_url=url, timeout=600) as client:
                for spec in specs:  # each alone: the answer every later copy must get
                    status, texts = answer(client, spec)
                    if status != 200:
                        raise SystemExit(f"a request of the set got {status} alone: {spec}")
                    refs.append(texts)
            warm, soak_rss = Tally(), []
            load(url, specs, refs, args.clients, warmup, args.max_requests, args.seed + 1, warm, port, [], proc)
            idle = wait_idle(url)
            baseline = rss_bytes(proc, url)
            tally = Tally()
            started = time.monotonic()
            load(url, specs, refs, args.clients, seconds, args.max_requests, args.seed + 2, tally, port, soak_rss, proc)
            elapsed = time.monotonic() - started
            health = wait_idle(url)
            time.sleep(1.0)  # the last cancelled sockets' rows leave
            health = wait_idle(url)
            final = rss_bytes(proc, url)
            blocks = health["prefix_cache"]
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        lat = sorted(tally.latencies)
        report = {
            "model": args.model, "clients": args.clients, "seconds": round(elapsed, 1), "warmup_s": warmup,
            "requests": dict(sorted(tally.counts.items())), "warmup_requests": dict(sorted(warm.counts.items())),
            "rss_baseline_mib": round(baseline / 2**20, 1), "rss_final_mib": round(final / 2**20, 1),
            "rss_peak_mib": round(max([r for _, r in soak_rss] + [final]) / 2**20, 1),
            "rss_drift_pct": round(100 * (final - baseline) / baseline, 2),
            "leaked_slots": health["max_batch"] - health["free_slots"] if health["running"] == 0 else None,
            "running_after": health["running"], "waiting_after": health["waiting"],
            "idle_before": {k: idle[k] for k in ("running", "waiting", "free_slots")},
            "prefix_cache_after": blocks, "leaked_blocks": blocks["capacity"] - blocks["blocks"] - blocks["free"],
            "mismatched": tally.counts.get("mismatched", 0), "mismatch_examples": tally.mismatches[:3],
            "server_errors": tally.counts.get("server errors", 0),
            "latency_s_p50": round(lat[len(lat) // 2], 3) if lat else None,
            "latency_s_p99": round(lat[int(len(lat) * 0.99)], 3) if lat else None,
        }
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot and soak_rss:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([t for t, _ in soak_rss], [r / 2**20 for _, r in soak_rss], label="server RSS under load")
        ax.axhline(baseline / 2**20, color="gray", linestyle="--", label="baseline (idle, after warm-up)")
        ax.axhline(final / 2**20, color="green", linestyle=":", label="final (idle)")
        ax.set_xlabel("seconds")
        ax.set_ylabel("MiB")
        ax.set_title(f"gemmakit serve soak: {args.clients} clients, {args.model} model")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    ok = (abs(report["rss_drift_pct"]) <= 5 and report["leaked_slots"] == 0 and report["leaked_blocks"] == 0
          and report["mismatched"] == 0 and report["server_errors"] == 0)
    print("PASS" if ok else "FAIL", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("GEMMAKIT_COMPILE", "eager")  # no background compiler competing with the clients
    sys.exit(main())
