"""Training survives its faults: a process killed during a step or while writing a checkpoint resumes
from the last complete checkpoint on the uninterrupted run's curve; a full disk while writing a
checkpoint is a one-line error with the previous checkpoint intact."""

import json
import subprocess
import sys

import torch
from test_train_loop import run_config

from gemmakit.train import TrainConfig, train

# Runs a training in a child that dies as told: SIGKILL after a step, SIGKILL halfway through writing
# a checkpoint, or a file-size limit (the OS refuses writes past it, as a full disk would).
CHILD = r"""
import json, os, resource, signal, sys
import torch
from gemmakit.errors import GemmaError
from gemmakit.train import TrainConfig, train
cfg, how, arg = TrainConfig(**json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3])
on_step = None
if how == "step":
    def on_step(step, record):
        if step == arg:
            os.kill(os.getpid(), signal.SIGKILL)
elif how == "save":
    real = torch.save
    def dying(obj, f):
        real(obj, f)
        if f"step-{arg:06d}" in f.name:
            f.flush()
            os.truncate(f.name, os.path.getsize(f.name) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    torch.save = dying
elif how == "disk":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (arg, arg))
try:
    train(cfg, on_step=on_step)
except GemmaError as e:
    print(e, file=sys.stderr)
    sys.exit(1)
"""


def child(cfg: TrainConfig, how: str, arg: int):
    values = {k: str(v) if k in ("model", "out") else v for k, v in vars(cfg).items()}
    return subprocess.run([sys.executable, "-c", CHILD, json.dumps(values, default=str), how, str(arg)],
                          capture_output=True, text=True, timeout=300)


def losses(out) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def test_killed_or_out_of_disk_the_run_resumes_on_the_uninterrupted_curve(tmp_path, tiny_config_file, corpus):
    full = train(run_config(tmp_path / "full", tiny_config_file, [corpus]))
    for how, at in (("step", 6), ("save", 8)):
        cfg = run_config(tmp_path / how, tiny_config_file, [corpus])
        out = tmp_path / how / "out"
        result = child(cfg, how, at)
        assert result.returncode == -9, result.stderr
        ckpts = out / "checkpoints"
        assert sorted(p.name for p in ckpts.glob("step-*.pt")) == ["step-000004.pt"]  # no half-written step 8
        cfg.resume = True
        if how == "step":  # resumed from step 4 on a full disk: step 8's checkpoint does not fit
            first = (ckpts / "step-000004.pt").read_bytes()
            result = child(cfg, "disk", len(first) // 2)
            error = result.stderr.strip().splitlines()[-1]  # (a kernel built under the limit may warn first)
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
            assert "step-000008.pt: could not write the checkpoint" in error
            assert "step-000004.pt is the last complete one" in error
            assert (ckpts / "step-000004.pt").read_bytes() == first
            assert sorted(p.name for p in ckpts.iterdir()) == ["step-000004.pt"]  # no temp file, no step 8
        resumed = train(cfg)
        assert not list(ckpts.glob(".partial-*"))  # a dead process's temp file is gone
        torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses[4:]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(full.losses), rtol=1e-5, atol=1e-6)
