"""Reward models as transformers' sequence classifiers, both ways, for Gemma 1, 2 and 3 (tiny random
models, every norm randomised): the folder `RewardModel.save` writes loads with
`AutoModelForSequenceClassification` and scores what gemmakit scores; a classifier transformers
saves (as trl's RewardTrainer does) loads as a RewardModel that scores what transformers scores."""

import json

import pytest
import torch

import gemmakit
from gemmakit.checkpoints import hf
from gemmakit.config import GemmaConfig
from gemmakit.errors import CheckpointError
from gemmakit.model import Gemma
from gemmakit.train import pairs
from gemmakit.train.reward import RewardModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"vocab_size": 384, "d_model": 64, "ffn_dim": 128, "head_dim": 16, "max_seq_len": 128}  # vocab: the tiny tokenizer
CONFIGS = {
    "gemma": GemmaConfig(family="gemma", n_layers=2, n_heads=4, n_kv_heads=1, **SMALL),  # MQA
    # a soft-cap small enough to bite at these logit sizes, a query scale that is not head_dim
    "gemma2": GemmaConfig(family="gemma2", n_layers=3, n_heads=4, n_kv_heads=2, attn_logit_softcap=2.0,
                          final_logit_softcap=3.0, sliding_window=8, global_every=2, post_norms=True,
                          query_pre_attn_scalar=24, **SMALL),
    "gemma3": GemmaConfig(family="gemma3", n_layers=3, n_heads=4, n_kv_heads=2, sliding_window=8, global_every=3,
                          post_norms=True, qk_norm=True, rope_theta_global=1e6, query_pre_attn_scalar=12, **SMALL),
}
CHAT = [{"role": "user", "content": "what is 2 and 3, and the cat sat on a mat"}]
PROMPTS = [CHAT, CHAT, "the dog ran far from home and", "a"]  # rows past the window of 8, and padded
COMPLETIONS = ["2 and 3 is 5", "the cat sat", " birds sang old songs while the dog ran", " cat"]


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, norms included (their weights are 0 at init, which hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "norm" in name else 0.05))


def rows(tokenizer, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PROMPTS + COMPLETIONS as gemmakit renders them, right-padded with pad_id: (B, T) ids and mask."""
    ids = [p + c for p, c in (pairs.render(tokenizer, p, c, "x") for p, c in zip(PROMPTS, COMPLETIONS))]
    tokens = torch.full((len(ids), max(map(len, ids))), pad_id)
    for r, row in enumerate(ids):
        tokens[r, : len(row)] = torch.tensor(row)
    return tokens, torch.arange(tokens.shape[1])[None] < torch.tensor([len(r) for r in ids])[:, None]


@torch.no_grad()
def transformers_scores(folder, tokenizer) -> torch.Tensor:
    import transformers

    # as a user loads it: transformers picks eager attention for Gemma 2 (its soft-cap), SDPA for the others
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    tokens, mask = rows(tokenizer, model.config.pad_token_id)
    return model(input_ids=tokens, attention_mask=mask.long()).logits.squeeze(-1)


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """float32 on both sides, summed in different orders: the forward's few-ulp differences through
    3 layers stay far under 1e-5 of the largest score (the logits' tolerance in tests/test_model.py)."""
    assert ours.shape == theirs.shape == (len(PROMPTS),)
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    assert len(set(theirs.tolist())) == len(PROMPTS)  # distinct scores: the rows' own last tokens were read


@pytest.mark.parametrize("family", list(CONFIGS))
def test_a_saved_reward_model_scores_the_same_in_transformers(tmp_path, tiny_tokenizer, family):
    torch.manual_seed(0)
    body = Gemma(CONFIGS[family])
    randomise(body, 1)
    rm = RewardModel(body, tiny_tokenizer)
    out = rm.save(tmp_path / "rm", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [hf.CLASSIFIERS[config["model_type"]]]
    assert config["id2label"] == {"0": "LABEL_0"} and config["pad_token_id"] == tiny_tokenizer.pad_id
    ours = rm.score(PROMPTS, COMPLETIONS)
    close(ours, transformers_scores(out, tiny_tokenizer))
    assert torch.equal(RewardModel.load(out).score(PROMPTS, COMPLETIONS), ours)  # and back, bit for bit
    lm = gemmakit.load(out, quantize=None, compile=None, progress=False)  # the body alone, as a language model
    assert lm.config == CONFIGS[family] and torch.equal(lm.module.norm.weight, body.norm.weight)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_a_transformers_classifier_loads_as_a_reward_model(tmp_path, tiny_tokenizer, family):
    import transformers

    values = hf.hf_config(CONFIGS[family], tokenizer=tiny_tokenizer, num_labels=1)
    config = transformers.AutoConfig.for_model(**values)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    randomise(model, 2)
    model.save_pretrained(tmp_path / "theirs")  # what trl's RewardTrainer.save_model writes
    tiny_tokenizer.save(tmp_path / "theirs")
    rm = RewardModel.load(tmp_path / "theirs")
    assert torch.equal(rm.head.weight, model.score.weight.detach())
    close(rm.score(PROMPTS, COMPLETIONS), transformers_scores(tmp_path / "theirs", tiny_tokenizer))


def test_a_multimodal_gemma3_classifier_loads_as_a_reward_model(tmp_path, tiny_tokenizer):
    """Gemma3ForSequenceClassification (what trl writes for the 4B and larger Gemma 3): the language
    model's tensors under language_model.model., the vision tower left out."""
    import transformers

    text = hf.hf_config(CONFIGS["gemma3"], tokenizer=tiny_tokenizer)
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 28, "patch_size": 14}
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=383, boi_token_index=381, eoi_token_index=382,
                                       num_labels=1, pad_token_id=tiny_tokenizer.pad_id)
    model = transformers.Gemma3ForSequenceClassification(config)
    randomise(model, 3)
    model.save_pretrained(tmp_path / "theirs")
    tiny_tokenizer.save(tmp_path / "theirs")
    close(RewardModel.load(tmp_path / "theirs").score(PROMPTS, COMPLETIONS),
          transformers_scores(tmp_path / "theirs", tiny_tokenizer))


def test_a_folder_without_one_score_is_not_a_reward_model(tmp_path, tiny_tokenizer):
    import transformers

    body = Gemma(CONFIGS["gemma"])
    gemmakit.LM(body, tiny_tokenizer).save(tmp_path / "causal", progress=False)
    with pytest.raises(CheckpointError, match="causal: no score.weight tensor; not a sequence-classification"):
        RewardModel.load(tmp_path / "causal")
    values = hf.hf_config(CONFIGS["gemma"], num_labels=3)
    model = transformers.AutoModelForSequenceClassification.from_config(transformers.AutoConfig.for_model(**values))
    model.save_pretrained(tmp_path / "three")
    with pytest.raises(CheckpointError, match=r"three: score.weight has shape \[3, 64\]; a reward model has one label"):
        RewardModel.load(tmp_path / "three")
