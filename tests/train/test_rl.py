"""`gemmakit rl` end to end on a tiny random model: GRPO and RLOO, full and LoRA, the output
loads; a bad reward function or prompt file is a one-line error that writes nothing; rewards
from a reward model go through the same interface; 2 processes under torchrun take the same
steps as 1 process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

import gemmakit
from gemmakit.cli.main import main
from gemmakit.errors import RewardError
from gemmakit.train import rewards
from gemmakit.train.rl import RLConfig, train_rl

REWARDS = '''
def has_cat(prompts, completions, answer, **fields):
    return [float(a in c) + 0.1 * len(c.split()) for c, a in zip(completions, answer)]

def raises(prompts, completions, **fields):
    raise ValueError("no answer found")

def text(prompts, completions, **fields):
    return ["1.0"] * len(completions)

def none(prompts, completions, **fields):
    return [None] * len(completions)

def short(prompts, completions, **fields):
    return [1.0]

def nan(prompts, completions, **fields):
    return [float("nan")] * len(completions)
'''


@pytest.fixture
def task(tmp_path, tiny_config_file, tiny_tokenizer):
    tiny_tokenizer.save(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"the dog {'ran far ' * (i % 3)}and", "answer": "cat"}) + "\n")
    (tmp_path / "rw.py").write_text(REWARDS)
    return {"model": str(tiny_config_file), "tokenizer": str(tmp_path / "tokenizer.model"), "prompts": str(prompts),
            "reward": f"{tmp_path / 'rw.py'}:has_cat"}


def _flags(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.mark.parametrize("algo, lora, updates", [("grpo", 0, 1), ("rloo", 4, 2)])
def test_rl_runs_and_writes_a_model(tmp_path, task, capsys, algo, lora, updates):
    out = tmp_path / "out"
    argv = ["rl", *_flags(task), "--out", str(out), "--algo", algo, "--lora-rank", str(lora),
            "--updates", str(updates), "--steps", "2", "--batch-prompts", "2", "--samples", "3",
            "--max-new-tokens", "6", "--micro-batch", "4", "--eval-prompts", task["prompts"], "--lr", "1e-3",
            "--beta", "0.1", "--no-progress"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert [r["step"] for r in records if "eval_reward" in r] == [0, 2]
    assert all(1 <= r["completion_length"] <= 6 and r["grad_norm"] > 0 for r in steps)
    if algo == "grpo":
        assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
        assert steps[1]["kl"] > 0  # and moves away from it
    assert (out / "reward.png").stat().st_size > 0
    assert (out / "adapter" / "adapter_config.json").is_file() == bool(lora)
    trained = gemmakit.load(str(out), quantize=None, compile=None, progress=False)
    config = gemmakit.GemmaConfig.from_dict(json.loads(open(task["model"]).read()))
    start = gemmakit.load(config, quantize=None, compile=None, progress=False)  # the same seed: the starting weights
    moved = [n for n, p in trained.module.named_parameters()
             if not torch.equal(p, start.module.get_parameter(n))]
    assert moved and (not lora or all(".attn." in n or ".mlp." in n for n in moved))
    assert "held-out reward" in capsys.readouterr().out
    if not lora:  # resumed at its last checkpoint: nothing left to do, one line, the same curve
        assert main([*argv, "--resume"]) == 0
        assert capsys.readouterr().out == f"{out}: 2 steps\n"
        assert [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] == records


@pytest.mark.parametrize("function, message", [
    ("raises", "reward {spec} raised ValueError: no answer found"),
    ("text", "reward {spec} returned '1.0' for completion 0: not a finite number"),
    ("none", "reward {spec} returned None for completion 0: not a finite number"),
    ("short", "reward {spec} returned 1 values for 4 completions"),
    ("nan", "reward {spec} returned nan for completion 0: not a finite number"),
])
def test_a_bad_reward_is_one_line_naming_it_and_writes_nothing(tmp_path, task, capsys, function, message):
    spec = task["reward"].replace(":has_cat", f":{function}")
    out = tmp_path / "out"
    code = main(["rl", *_flags(task | {"reward": spec}), "--out", str(out), "--steps", "1", "--batch-prompts", "2",
                 "--samples", "2", "--max-new-tokens", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert err == f"gemmakit: error: {message.format(spec=spec)}\n"
    assert not out.exists()


@pytest.mark.parametrize("line, message", [
    ("{not json", "{path}:2: not valid JSON"),
    ('{"text": "a"}', "{path}:2: no 'prompt' or 'messages' field"),
    ('{"prompt": ""}', "{path}:2: 'prompt' must be a non-empty string"),
    ("[1, 2]", "{path}:2: expected an object"),
    ("[" * 100_000 + "]" * 100_000, "{path}:2: JSON nested too deeply"),
    ('{"prompt": "caf\xe9"}'.encode("latin-1"), "{path}: not UTF-8 text"),
])
def test_a_bad_prompt_line_is_named(tmp_path, task, capsys, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "the cat"}\n' + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    out = tmp_path / "out"
    assert main(["rl", *_flags(task | {"prompts": path}), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"gemmakit: error: {message.format(path=path)}") and err.count("\n") == 1
    assert not out.exists()


def test_a_bad_reward_spec_is_named(tmp_path, task, capsys):
    for spec, message in [("nocolon", "expected module:function"), ("no_such_module_xyz:f", "cannot import"),
                          (task["reward"].replace("has_cat", "missing"), "has no missing")]:
        assert main(["rl", *_flags(task | {"reward": spec}), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"gemmakit: error: reward {spec!r}: " if spec == "nocolon" else
                              f"gemmakit: error: reward {spec}: ") and message in err


def test_a_reward_model_is_one_more_reward(monkeypatch):
    """`gemmakit.train.reward.RewardModel.load(path).score(prompts, completions)` is wrapped into the
    same checked callable as a function."""
    import types

    class RewardModel:
        @classmethod
        def load(cls, path):
            model = cls()
            model.path = path
            return model

        def score(self, prompts, completions):
            return torch.tensor([len(p) - len(c) for p, c in zip(prompts, completions)], dtype=torch.float32)

    monkeypatch.setitem(sys.modules, "gemmakit.train.reward", types.SimpleNamespace(RewardModel=RewardModel))
    reward = rewards.from_reward_model("rm-dir")
    assert reward(["abcd", "ab"], ["a", "ab"], {"answer": [1, 2]}) == [3.0, 0.0]
    monkeypatch.setattr(RewardModel, "score", lambda self, p, c: ["bad"] * len(c))
    with pytest.raises(RewardError, match="reward model rm-dir returned 'bad'"):
        reward(["a"], ["b"])


def test_lora_reference_is_the_base_model(tiny_config):
    """With LoRA, the reference log-probs come from the same module with its adapters off."""
    import copy

    from gemmakit.model import Gemma
    from gemmakit.train import lora
    from gemmakit.train.rl import _adapters_off

    torch.manual_seed(0)
    base = Gemma(tiny_config)
    model = lora.add_lora(copy.deepcopy(base), rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # adapters that change the output
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 9))
    with torch.no_grad():
        assert not torch.allclose(model(tokens), base(tokens), atol=1e-3)
        with _adapters_off(model):
            assert torch.allclose(model(tokens), base(tokens), atol=1e-6)
        assert not torch.allclose(model(tokens), base(tokens), atol=1e-3)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # trainable again


def test_two_processes_equal_one(tmp_path, task):
    settings = dict(steps=2, batch_prompts=4, samples=2, max_new_tokens=4, micro_batch=2, lr=3e-3, beta=0.1,
                    eval_every=2, progress=False)
    single = train_rl(RLConfig(**task, out=str(tmp_path / "one"), eval_prompts=task["prompts"], **settings))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    flags = _flags(task | {k: v for k, v in settings.items() if k != "progress"})
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "gemmakit.train", "rl", *flags, "--out", str(tmp_path / "two"),
                           "--eval-prompts", task["prompts"], "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert [r["reward"] for r in steps] == pytest.approx([r["reward"] for r in single.records], rel=1e-6)
    for name in ("loss", "grad_norm", "kl"):
        assert [r[name] for r in steps] == pytest.approx([r[name] for r in single.records], rel=1e-4, abs=1e-6)
    held = [r["eval_reward"] for r in records if "eval_reward" in r]
    assert held == pytest.approx([v for _, v in single.eval_rewards], rel=1e-6)


def test_the_rollout_copy_follows_the_policy(tiny_config):
    """bfloat16 rollouts sample with a copy that each refresh brings up to the policy's weights;
    float32 ones with the policy itself."""
    from gemmakit.model import Gemma
    from gemmakit.train.rl import _rollout_weights

    torch.manual_seed(0)
    policy = Gemma(tiny_config)
    assert _rollout_weights(policy, torch.float32)[0] is policy
    sampler, refresh = _rollout_weights(policy, torch.bfloat16)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)  # an optimizer step, in place
    refresh()
    for (name, p), q in zip(policy.named_parameters(), sampler.parameters()):
        assert q.dtype == torch.bfloat16 and torch.equal(q, p.detach().to(torch.bfloat16)), name


@pytest.mark.usefixtures("one_torch_thread")
def test_a_stopped_run_resumes_on_the_uninterrupted_curve(tmp_path, task):
    """GRPO with full weights (a frozen reference copy, a bfloat16 rollout copy): stopped after step 3
    with checkpoints at 2, resumed from 2, the run equals one that never stopped, exactly (one
    process, the same operations on the same bits; every sample's seed is a function of the step)."""
    from safetensors.torch import load_file

    from gemmakit.errors import ConfigError

    class Stopped(Exception):
        pass

    def stop_after_3(step, record):
        if step == 3:
            raise Stopped

    # 8 prompts, 3 a step: step 3 straddles the first and the second epoch of the prompt order.
    settings = dict(task, steps=4, batch_prompts=3, samples=2, max_new_tokens=4, micro_batch=4, lr=3e-3, beta=0.1,
                    save_every=2, eval_every=2, eval_prompts=task["prompts"], progress=False)
    full = train_rl(RLConfig(**settings, out=str(tmp_path / "full")))
    out = tmp_path / "stopped"
    with pytest.raises(Stopped):
        train_rl(RLConfig(**settings, out=str(out)), on_step=stop_after_3)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002.pt"]
    with pytest.raises(ConfigError, match="already holds training checkpoints; pass --resume"):
        train_rl(RLConfig(**settings, out=str(out)))
    resumed = train_rl(RLConfig(**settings, out=str(out), resume=True))

    def timeless(records):
        return [{k: v for k, v in r.items() if k not in ("rollout_tokens_per_s", "step_s")} for r in records]

    assert timeless(resumed.records) == timeless(full.records[2:])
    assert resumed.eval_rewards == full.eval_rewards[2:]  # of steps 0, 2 and 4
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert timeless(logged) == timeless(json.loads(line) for line in
                                        (tmp_path / "full" / "metrics.jsonl").read_text().splitlines())
    ours, theirs = load_file(out / "model.safetensors"), load_file(tmp_path / "full" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
