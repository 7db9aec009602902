"""Evaluation over 2 processes under torchrun (gloo): a rank that is killed ends the run with an
error naming it and no results file; the same command resumes each shard from its own file and
gathers results equal to one process's."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gemmakit
from gemmakit.eval import evaluate, make_task
from gemmakit.eval.shards import Shards


def test_blocks_are_contiguous_balanced_and_cover_every_item():
    for n in (0, 1, 7, 100):
        for size in (1, 2, 3, 8):
            blocks = [Shards(rank, size).block(n) for rank in range(size)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def _rank_pid(parent: int, rank: int) -> int | None:
    """The worker of torchrun `parent` with RANK=rank (found in /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds the rank to kill in /proc")
def test_two_ranks_kill_resume_equal_one_process(tmp_path, tiny_lm):
    model = tmp_path / "model"
    tiny_lm.save(model, progress=False)
    data = tmp_path / "mc.jsonl"
    words = "red green blue cat dog bird sun moon tree rock".split()
    with open(data, "w") as f:
        for i in range(100):
            choices = [" ".join(words[(i + j + k) % 10] for k in range(3)) for j in range(4)]
            f.write(json.dumps({"question": f"the {words[i % 10]} of {i} is", "choices": choices, "answer": i % 4}) + "\n")
    lm = gemmakit.load(str(model), progress=False)
    # The ranks run one thread each: so does the reference, since a float32 matmul's sums split
    # by thread count (on some CPUs), and the records must be equal, not merely close.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = evaluate(lm, make_task(lm, "mc", data=[data], shots=1), progress=False)
    finally:
        torch.set_num_threads(threads)

    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "gemmakit.eval", "--model", str(model), "--task", "mc", "--data", str(data), "--shots", "1",
           "--threads", "1", "--output", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    shard1 = Path(f"{out}.rank1-of-2.partial.jsonl")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (shard1.is_file() and len(shard1.read_text().splitlines()) >= 3):  # settings + 2 records
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.005)
        # Rank 1 stops with its shard partly written; rank 0 finishes its own and waits for rank 1's.
        rank1 = _rank_pid(proc.pid, 1)
        os.kill(rank1, signal.SIGSTOP)
        shard0 = Path(f"{out}.rank0-of-2.partial.jsonl")
        # (rank 0 may not have opened its shard yet: the ranks start at their own pace)
        while ((not shard0.is_file() or len(shard0.read_text().splitlines()) < 51) and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.01)
        os.kill(rank1, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    ours = [line for line in stderr.splitlines() if line.startswith("gemmakit: error:")]
    assert len(ours) == 1 and ("rank 1 of 2 stopped" in ours[0] or "rank 0 of 2 stopped by SIGTERM" in ours[0]), stderr[-3000:]
    assert "results.json.rank*-of-2.partial.jsonl" in ours[0] or "SIGTERM" in ours[0]
    assert "local_rank: 1" in stderr  # torchrun's report names the rank that died
    assert not out.exists() and not list(tmp_path.glob(".partial-*"))
    finished = [json.loads(line) for line in shard1.read_text().splitlines()[1:] if line.endswith("}")]
    assert 2 <= len(finished) < 50 and all(50 <= r["index"] < 100 for r in finished)

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert not list(tmp_path.glob("results.json.rank*"))
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in single["records"]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in two["records"]] == strip
    assert two["metrics"] == single["metrics"] and two["settings"] == single["settings"]
    assert two["timings"]["processes"] == 2
    # The killed shard resumed: its finished records came back from its file, not scored again.
    for rec in finished:
        assert two["records"][rec["index"]] == rec
