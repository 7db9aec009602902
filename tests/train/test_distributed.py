"""gemmakit.train.distributed: 2 processes under torchrun (gloo, DDP) follow the same loss curve
as 1 process with the same global batch, with DDP and with FSDP2 (fully_shard)."""

import json
import os
import subprocess
import sys

import pytest

from gemmakit.train import TrainConfig, train


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(tmp_path, tiny_config_file, corpus, strategy):
    common = ["--model", str(tiny_config_file), "--data", str(corpus), "--seq-len", "32", "--batch-size", "2",
              "--max-steps", "6", "--eval-every", "3", "--save-every", "6", "--lr", "3e-3", "--no-progress"]
    # One process: two micro-batches of 2 per step. Two processes: one micro-batch of 2 each.
    single = train(TrainConfig(model=str(tiny_config_file), data=[str(corpus)], out=str(tmp_path / "one"),
                               seq_len=32, batch_size=2, grad_accum=2, max_steps=6, eval_every=3, save_every=6,
                               lr=3e-3, progress=False))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "gemmakit.train", "train", *common, "--out", str(tmp_path / "two"),
                           "--strategy", strategy],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    held = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(losses) == 6
    assert losses == pytest.approx(single.losses, rel=1e-4, abs=1e-5)
    assert held[-1] == pytest.approx(single.val_loss, rel=1e-4)
    assert losses[-1] < losses[0]
