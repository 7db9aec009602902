"""gemmakit.train.loop: a tiny run learns, resumes exactly, refuses foreign checkpoints, and its
output loads with gemmakit.load; fine-tuning with LoRA on chat data."""

import json

import pytest
import torch

import gemmakit
from gemmakit.errors import CheckpointError, ConfigError, DataError
from gemmakit.train import TrainConfig, train
from gemmakit.train.loop import cosine_schedule


def run_config(tmp_path, model, data, **kw):
    values = dict(model=str(model), data=[str(d) for d in data], out=str(tmp_path / "out"), seq_len=32,
                  batch_size=4, max_steps=12, lr=3e-3, eval_every=6, save_every=4, keep_last=2, progress=False)
    values.update(kw)
    return TrainConfig(**values)


def test_tiny_run_learns_and_loads(tmp_path, tiny_config_file, corpus):
    cfg = run_config(tmp_path, tiny_config_file, [f"{corpus}:2", tmp_path / "code.py"], max_steps=30, eval_every=10,
                     save_every=10)
    result = train(cfg)
    assert result.losses[-1] < result.losses[0] - 1.5
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in steps)
    held = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(held) == 4 and held[-1] < held[0] - 1.0  # steps 0 (before training), 10, 20, 30
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000020.pt", "step-000030.pt"]

    lm = gemmakit.load(out, progress=False)
    assert lm.config.to_dict() == json.loads(tiny_config_file.read_text()) | {
        k: v for k, v in lm.config.to_dict().items() if k not in json.loads(tiny_config_file.read_text())}
    assert lm.tokenizer is not None and lm.tokenizer.decode(lm.tokenizer.encode("the cat", add_bos=False)) == "the cat"
    x = torch.tensor([lm.tokenizer.encode("the cat sat on a mat")])
    trained = torch.load(out / "checkpoints" / "step-000030.pt", weights_only=True)["model"]
    module = gemmakit.Gemma(lm.config)
    module.load_state_dict(trained)
    torch.testing.assert_close(lm.logits(x), module.eval()(x))


def test_resume_continues_the_same_curve(tmp_path, tiny_config_file, corpus):
    full = train(run_config(tmp_path / "a", tiny_config_file, [corpus], grad_accum=2))

    class Killed(Exception):
        pass

    def kill_at_6(step, record):
        if step == 6:
            raise Killed

    cfg = run_config(tmp_path / "b", tiny_config_file, [corpus], grad_accum=2)
    with pytest.raises(Killed):
        train(cfg, on_step=kill_at_6)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg)
    cfg.resume = True
    resumed = train(cfg)  # from step 4's checkpoint
    assert len(resumed.losses) == 8
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses[4:]), rtol=1e-5, atol=1e-6)
    logged = [json.loads(line) for line in (tmp_path / "b" / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 13))  # one curve, no repeated steps


def test_checkpoint_from_another_config_is_refused(tmp_path, tiny_config_file, corpus):
    cfg = run_config(tmp_path, tiny_config_file, [corpus], max_steps=4)
    train(cfg)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(json.loads(tiny_config_file.read_text()) | {"d_model": 96}))
    with pytest.raises(CheckpointError, match="another model config: d_model is 64 there, 96 here"):
        train(run_config(tmp_path, other, [corpus], max_steps=8, resume=True))
    with pytest.raises(CheckpointError, match="another run: max_steps is 4 there, 8 here"):
        train(run_config(tmp_path, tiny_config_file, [corpus], max_steps=8, resume=True))
    ckpt = tmp_path / "out" / "checkpoints" / "step-000004.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="step-000004.pt: not a readable training checkpoint"):
        train(run_config(tmp_path, tiny_config_file, [corpus], max_steps=4, resume=True))


def test_bad_settings_and_data(tmp_path, tiny_config_file, corpus):
    with pytest.raises(ConfigError, match="seq_len 512 is longer than the model's max_seq_len 128"):
        train(run_config(tmp_path, tiny_config_file, [corpus], seq_len=512))
    with pytest.raises(DataError, match="no such file"):
        train(run_config(tmp_path / "x", tiny_config_file, [tmp_path / "nothing.txt"]))
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        run_config(tmp_path, tiny_config_file, [corpus], batch_size=0)


def test_schedule_warms_up_then_decays():
    lrs = [cosine_schedule(s, warmup=10, total=100, min_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_lora_finetune_on_chats(tmp_path, tiny_config, tiny_tokenizer, chats):
    base = tmp_path / "base"
    torch.manual_seed(0)
    module = gemmakit.Gemma(tiny_config)
    module.reset_parameters()
    from gemmakit.train.loop import save_model

    base.mkdir()
    save_model(gemmakit.LM(module, tiny_tokenizer), base, progress=False)
    cfg = run_config(tmp_path, base, [chats], sft=True, seq_len=96, lora_rank=8, lr=1e-2, max_steps=20,
                     eval_every=10, save_every=10, val_fraction=0.1)
    result = train(cfg)
    assert result.losses[-1] < result.losses[0]
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    held = [r["val_loss"] for r in records if "val_loss" in r]
    assert held[-1] < held[0]
    # The checkpoint holds the adapters only; the merged output and base + adapter agree.
    state = torch.load(tmp_path / "out" / "checkpoints" / "step-000020.pt", weights_only=True)["model"]
    assert state and all("lora_" in k for k in state)
    tuned = gemmakit.load(tmp_path / "out", progress=False)
    from gemmakit.train import lora

    with_adapter = lora.load_adapter(gemmakit.load(base, progress=False).module, tmp_path / "out" / "adapter")
    x = torch.tensor([tiny_tokenizer.chat_ids([{"role": "user", "content": "what is 2 and 3"}])])
    with torch.no_grad():
        torch.testing.assert_close(tuned.logits(x), with_adapter(x), atol=1e-4, rtol=1e-4)


def test_compiled_training_follows_the_eager_curve(tmp_path, tiny_config_file, corpus):
    from torch._dynamo.utils import counters

    eager = train(run_config(tmp_path / "eager", tiny_config_file, [corpus], max_steps=4, save_every=4))
    counters.clear()
    compiled = train(run_config(tmp_path / "compiled", tiny_config_file, [corpus], max_steps=4, save_every=4,
                                compile=True))
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=1e-4, atol=1e-4)
    assert not counters["graph_break"], dict(counters["graph_break"])  # the loss runs inside the graph


def test_checkpointed_and_bf16_training_follow_the_eager_curve(tmp_path, tiny_config_file, corpus):
    eager = train(run_config(tmp_path / "eager", tiny_config_file, [corpus], max_steps=4, save_every=4))
    checkpointed = train(run_config(tmp_path / "ckpt", tiny_config_file, [corpus], max_steps=4, save_every=4,
                                    activation_checkpointing=True))
    torch.testing.assert_close(torch.tensor(checkpointed.losses), torch.tensor(eager.losses), rtol=1e-5, atol=1e-5)
    bf16 = train(run_config(tmp_path / "bf16", tiny_config_file, [corpus], max_steps=4, save_every=4, bf16=True))
    # bfloat16 matmuls: the same curve to about 1%, and still learning
    torch.testing.assert_close(torch.tensor(bf16.losses), torch.tensor(eager.losses), rtol=2e-2, atol=0)
    assert bf16.losses[-1] < bf16.losses[0]
