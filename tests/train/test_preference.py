"""Preference tuning and reward models against trl on the same tiny random Gemma 3, exported to
Hugging Face: DPO and IPO (DPOTrainer.compute_loss), SimPO (CPOTrainer's own log-probs and loss),
Bradley-Terry (RewardTrainer.compute_loss); losses and every parameter's gradient equal.
Then the commands end to end, and bad pairs failing in one line."""

import json
import random
from types import SimpleNamespace

import pytest
import torch

import gemmakit
from gemmakit.checkpoints.hf import tensor_names
from gemmakit.cli.main import main
from gemmakit.config import GemmaConfig
from gemmakit.errors import CheckpointError
from gemmakit.lm import LM
from gemmakit.model import Gemma
from gemmakit.train import pairs
from gemmakit.train.dpo import preference_loss, sequence_logps
from gemmakit.train.reward import RewardModel, bradley_terry

# tests/train/conftest.py's TINY as a Gemma 3: its tokenizer fits (384 tokens); windows of 8 bite.
TINY3 = GemmaConfig(family="gemma3", vocab_size=384, d_model=64, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=32,
                    ffn_dim=128, max_seq_len=128, sliding_window=8, global_every=3, post_norms=True, qk_norm=True,
                    rope_theta_global=1e6)


def randomised(seed: int) -> Gemma:
    """Every parameter random, norms included (zero norm weights would hide a norm in the wrong place)."""
    torch.manual_seed(seed)
    model = Gemma(TINY3)
    model.reset_parameters(std=0.05, norm_std=0.3)
    return model


def write_pairs(path, n: int = 12) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            wrong = " ".join(["the cat sat"] * rng.randint(1, 3))
            if i % 3 == 2:  # plain text, and answers of different lengths
                record = {"prompt": f"{a} and {b} is", "chosen": f" {a + b}", "rejected": f" {wrong}"}
            else:
                record = {"messages": [{"role": "user", "content": f"what is {a} and {b}"}],
                          "chosen": f"{a} and {b} is {a + b}", "rejected": [{"role": "assistant", "content": wrong}]}
            f.write(json.dumps(record) + "\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    """Policy and reference as gemmakit modules and HF folders, and four tokenized pairs."""
    root = tmp_path_factory.mktemp("preference")
    policy, reference = randomised(1), randomised(2)
    LM(policy, tiny_tokenizer).save(root / "policy", progress=False)
    LM(reference, tiny_tokenizer).save(root / "reference", progress=False)
    write_pairs(root / "pairs.jsonl")
    batch = pairs.read(root / "pairs.jsonl", tiny_tokenizer, max_len=128)[:6]
    return SimpleNamespace(root=root, policy=policy, reference=reference, pairs=batch, tok=tiny_tokenizer)


def hf(folder, cls: str = "AutoModelForCausalLM", **kw):
    import transformers

    return getattr(transformers, cls).from_pretrained(folder, dtype=torch.float32, attn_implementation="eager", **kw)


def dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])  # trl wants one; unused


def grads_match(ours: torch.nn.Module, theirs: torch.nn.Module, extra: dict[str, str] | None = None) -> None:
    """Every parameter's gradient equal. float32 on both sides with different summation orders:
    errors of a few ulps per product, over sums of ~1e3 terms through 3 layers, stay well under
    1e-4 of each gradient's largest entry."""
    names = {k: "model." + v for k, v in tensor_names(TINY3).items()}
    names.update(extra or {})
    theirs_params = dict(theirs.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        q = theirs_params[names[name]]
        assert p.grad is not None and q.grad is not None, name
        scale = q.grad.abs().max()
        assert scale > 0, name  # a zero gradient would compare equal for nothing
        assert (p.grad - q.grad).abs().max() <= 1e-4 * scale, name
        checked += 1
    assert checked == len(theirs_params)


def our_logps(model, batch):
    return sequence_logps(model, pairs.collate(batch, 0))


@pytest.mark.parametrize("kind", ["dpo", "ipo"])
def test_dpo_and_ipo_equal_trl_dpo_trainer(setup, kind, tmp_path):
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    beta = 0.3
    with torch.no_grad():
        ref_chosen, ref_rejected = our_logps(setup.reference, setup.pairs)[0].chunk(2)
    policy = setup.policy
    policy.zero_grad()
    logps, counts = our_logps(policy, setup.pairs)
    loss, chosen_reward, rejected_reward = preference_loss(kind, beta, 0.0, *logps.chunk(2), ref_chosen, ref_rejected,
                                                           *counts.chunk(2))
    loss.backward()

    model, ref_model = hf(setup.root / "policy"), hf(setup.root / "reference")
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(setup.root / "policy")
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=["sigmoid" if kind == "dpo" else "ipo"],
                     report_to=[], use_cpu=True, max_length=None, bf16=False)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset(), processing_class=tok)
    collate = DataCollatorForPreference(pad_token_id=setup.tok.pad_id)
    batch = collate([{"prompt_ids": list(p.prompt), "chosen_ids": list(p.chosen), "rejected_ids": list(p.rejected)}
                     for p in setup.pairs])
    model.train()  # trl files its metrics under the mode (no dropout in Gemma: the same numbers)
    theirs = trainer.compute_loss(model, batch)
    theirs.backward()
    assert abs(loss.item() - theirs.item()) <= 1e-5 * abs(theirs.item())
    assert abs(loss.item() - 0.6931) > 1e-3  # policy and reference differ: the loss is not its value at zero
    metrics = trainer._metrics["train"]
    assert chosen_reward.mean().item() == pytest.approx(metrics["rewards/chosen"][-1], rel=1e-4, abs=1e-6)
    assert (chosen_reward - rejected_reward).mean().item() == pytest.approx(metrics["rewards/margins"][-1], rel=1e-4,
                                                                            abs=1e-6)
    grads_match(policy, model)


def test_simpo_equals_trl_cpo_trainer(setup):
    from trl.experimental.cpo import CPOTrainer

    beta, gamma = 2.0, 0.5
    policy = setup.policy
    policy.zero_grad()
    logps, counts = our_logps(policy, setup.pairs)
    loss, _, _ = preference_loss("simpo", beta, gamma, *logps.chunk(2), None, None, *counts.chunk(2))
    loss.backward()

    model = hf(setup.root / "policy")
    full = pairs.collate(setup.pairs, setup.tok.pad_id, full=True)
    labels = torch.full_like(full.tokens, -100)
    for r, p in enumerate([*setup.pairs, *setup.pairs]):
        completion = p.chosen if r < len(setup.pairs) else p.rejected
        labels[r, len(p.prompt): len(p.prompt) + len(completion)] = torch.tensor(completion)
    logits = model(input_ids=full.tokens, attention_mask=(labels != -100) | (torch.arange(full.tokens.shape[1])
                                                                              < full.lengths[:, None])).logits
    theirs_logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    # CPOTrainer.cpo_loss reads only these attributes of the trainer.
    fake = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=0.0, loss_type="simpo",
                           accelerator=SimpleNamespace(device="cpu"))
    losses, _, _ = CPOTrainer.cpo_loss(fake, *theirs_logps.chunk(2))
    theirs = losses.mean()
    theirs.backward()
    assert abs(loss.item() - theirs.item()) <= 1e-5 * abs(theirs.item())
    grads_match(policy, model)


def test_reward_model_equals_trl_reward_trainer(setup, tmp_path):
    import transformers
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    torch.manual_seed(0)
    ours = RewardModel(setup.policy, setup.tok)
    ours.zero_grad()
    rows = pairs.collate(setup.pairs, setup.tok.pad_id, full=True)
    chosen, rejected = ours(rows.tokens, rows.lengths).chunk(2)
    loss = bradley_terry(chosen, rejected)
    loss.backward()

    model = hf(setup.root / "policy", "AutoModelForSequenceClassification", num_labels=1)
    assert type(model).__name__ == "Gemma3TextForSequenceClassification"
    with torch.no_grad():
        model.score.weight.copy_(ours.head.weight)
    model.config.pad_token_id = setup.tok.pad_id
    tok = transformers.AutoTokenizer.from_pretrained(setup.root / "policy")
    args = RewardConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, max_length=None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset(), processing_class=tok)
    batch = DataCollatorForPreference(pad_token_id=setup.tok.pad_id)(
        [{"chosen_ids": list(p.prompt + p.chosen), "rejected_ids": list(p.prompt + p.rejected)} for p in setup.pairs])
    theirs = trainer.compute_loss(model, batch)
    theirs.backward()
    assert abs(loss.item() - theirs.item()) <= 1e-5 * abs(theirs.item())
    grads_match(ours, model, {f"body.{k}": "model." + v for k, v in tensor_names(TINY3).items()} |
                {"head.weight": "score.weight"})


# -- the commands -----------------------------------------------------------------------------------
def test_dpo_command_lora_trains_and_caches_the_reference(setup, tmp_path, capsys):
    out = tmp_path / "dpo"
    argv = ["dpo", "--model", str(setup.root / "policy"), "--data", str(setup.root / "pairs.jsonl"), "--out", str(out),
            "--lora-rank", "4", "--batch-size", "3", "--max-steps", "4", "--eval-fraction", "0.25", "--lr", "1e-2",
            "--no-progress"]
    assert main(argv) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4 and all({"accuracy", "margin"} <= set(r) for r in steps)
    assert steps[0]["margin"] == pytest.approx(0, abs=1e-6)  # LoRA starts as the reference: no margin yet
    assert any(abs(r["margin"]) > 1e-4 for r in steps[1:])
    assert (out / "curves.png").stat().st_size > 0 and (out / "adapter" / "adapter_config.json").is_file()
    cached = list((out / "data").glob("reference-*.pt"))
    assert len(cached) == 1
    tuned = gemmakit.load(out, quantize=None, compile=None, progress=False)
    base = gemmakit.load(setup.root / "policy", quantize=None, compile=None, progress=False)
    ids = torch.tensor([list(setup.pairs[0].prompt)])
    assert not torch.allclose(tuned.logits(ids), base.logits(ids))


def test_reward_command_saves_a_model_that_scores(setup, tmp_path, capsys):
    out = tmp_path / "rm"
    argv = ["reward", "--model", str(setup.root / "policy"), "--data", str(setup.root / "pairs.jsonl"),
            "--out", str(out), "--batch-size", "4", "--max-steps", "2", "--lr", "1e-3", "--no-progress"]
    assert main(argv) == 0
    assert main(argv) == 1  # over a finished run's checkpoints
    assert "already holds training checkpoints; pass --resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0  # from its last checkpoint: nothing left to train, the model written again
    rm = RewardModel.load(out)
    prompt = [{"role": "user", "content": "what is 2 and 3"}]
    scores = rm.score([prompt, prompt, "2 and 3 is"], ["2 and 3 is 5", "the cat sat", " 5"])
    assert scores.shape == (3,) and scores.dtype == torch.float32
    # The same rows through forward, one at a time: padding in a batch changes nothing.
    first = pairs.render(setup.tok, prompt, "2 and 3 is 5", "x")
    alone = rm(torch.tensor([first[0] + first[1]]), torch.tensor([len(first[0]) + len(first[1])]))
    assert alone.item() == pytest.approx(scores[0].item(), rel=1e-5, abs=1e-6)


BAD = {
    "missing": ({"prompt": "hi", "chosen": "a"}, "missing field 'rejected'"),
    "empty": ({"prompt": "hi", "chosen": "  ", "rejected": "b"}, "'chosen' is empty"),
    "same": ({"messages": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "a"}, "are the same answer"),
    "not json": ("{not json", "not valid JSON"),
}


@pytest.mark.parametrize("command", ["dpo", "reward"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_pairs_fail_in_one_line_naming_the_line(setup, tmp_path, capsys, command, case):
    record, message = BAD[case]
    data = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"})
    data.write_text(f"{good}\n{good}\n{record if isinstance(record, str) else json.dumps(record)}\n")
    out = tmp_path / "out"
    rc = main([command, "--model", str(setup.root / "policy"), "--data", str(data), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and err.startswith("gemmakit: error:")
    assert "bad.jsonl:3: " in err and message in err
    assert not out.exists()


def test_bad_settings_are_refused_before_anything_loads():
    from gemmakit.errors import ConfigError
    from gemmakit.train.dpo import DPOConfig

    with pytest.raises(ConfigError, match="--eval-data or --eval-fraction, not both"):
        DPOConfig(model="m", data="d", out="o", eval_data="held.jsonl", eval_fraction=0.2)
    with pytest.raises(ConfigError, match="loss must be one of dpo, ipo, simpo"):
        DPOConfig(model="m", data="d", out="o", loss="kto")
    assert DPOConfig(model="m", data="d", out="o", loss="simpo").beta == 2.0
    assert DPOConfig(model="m", data="d", out="o", eval_data="held.jsonl").eval_fraction == 0.0


# -- checkpoints and resume -------------------------------------------------------------------------
class Stopped(Exception):
    pass


def stop_after(k: int):
    def on_step(step, record):
        if step == k:
            raise Stopped

    return on_step


def curve(out) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds_per_step"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {name: t for f in sorted(folder.glob("*.safetensors")) for name, t in load_file(f).items()}


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_a_stopped_run_resumes_on_the_uninterrupted_curve(setup, tmp_path, objective):
    """DPO with LoRA (adapter-only checkpoints) and a full reward model (body and head): stopped after
    step 5 with checkpoints at 2 and 4, resumed from 4, the run equals one that never stopped. One
    process, the same thread count and the same operations on the same bits: exactly equal."""
    from gemmakit.errors import ConfigError
    from gemmakit.train.dpo import DPOConfig, dpo
    from gemmakit.train.reward import RewardConfig, train_reward

    run, make = (dpo, DPOConfig) if objective == "dpo" else (train_reward, RewardConfig)
    # 9 training pairs in batches of 3: step 4 is the middle of the second epoch.
    values = dict(model=str(setup.root / "policy"), data=str(setup.root / "pairs.jsonl"), batch_size=3,
                  max_steps=6, eval_fraction=0.25, eval_every=3, save_every=2, progress=False,
                  **({"lora_rank": 4, "lr": 1e-2} if objective == "dpo" else {"lr": 1e-3}))
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run(make(**values, out=str(full)))
    with pytest.raises(Stopped):
        run(make(**values, out=str(stopped)), on_step=stop_after(5))
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["step-000002.pt", "step-000004.pt"]
    assert [r["step"] for r in curve(stopped) if "loss" in r] == [1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="already holds training checkpoints; pass --resume"):
        run(make(**values, out=str(stopped)))
    run(make(**values, out=str(stopped), resume=True))
    assert [r["step"] for r in curve(stopped) if "loss" in r] == [1, 2, 3, 4, 5, 6]  # one curve
    assert curve(stopped) == curve(full)
    ours, theirs = tensors(stopped), tensors(full)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with pytest.raises(CheckpointError, match="another run: max_steps is 6 there, 8 here"):
        run(make(**values | {"max_steps": 8}, out=str(stopped), resume=True))
