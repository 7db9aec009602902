"""Constrained decoding on Gemma 3's real 262k-token vocabulary, with a tiny random-weights Gemma:
whatever the model prefers, the masked loop writes text that parses and validates."""

import json

import jsonschema
import pytest
import torch

from gemmakit.checkpoints import gguf
from gemmakit.config import GemmaConfig
from gemmakit.errors import GenerationError
from gemmakit.model import Gemma
from gemmakit.runtime.grammar import Grammar
from gemmakit.runtime.sampling import Sampling, make_generator, next_tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
ENUM = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                         "size": {"enum": ["S", "M", "L", 42, None]}},
        "required": ["color", "size"], "additionalProperties": False}
NESTED = {"type": "object", "properties": {"matrix": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
    "type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "integer", "minimum": -50, "maximum": 50}}},
    "tags": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 12}}},
    "required": ["matrix", "tags"], "additionalProperties": False}
BOUNDED = {"type": "integer", "minimum": -7, "maximum": 2025}
SCHEMAS = {"person": PERSON, "enum": ENUM, "nested": NESTED, "bounded": BOUNDED}


@pytest.fixture(scope="module")
def tokenizer(real_gguf):
    return gguf.read(real_gguf).tokenizer  # the real Gemma 3 vocabulary, without loading the weights


@pytest.fixture(scope="module")
def model(tokenizer):
    config = GemmaConfig(family="gemma3", vocab_size=tokenizer.vocab_size + 64, d_model=32, n_layers=2, n_heads=2,
                         n_kv_heads=1, head_dim=16, ffn_dim=64, max_seq_len=512, sliding_window=16, global_every=2,
                         post_norms=True, qk_norm=True, query_pre_attn_scalar=16)  # a padded embedding: V > vocab
    torch.manual_seed(0)
    model = Gemma(config)
    model.reset_parameters(std=0.1, norm_std=0.3)
    return model.eval()


@torch.inference_mode()
def constrained(model, tokenizer, grammar, sampling, max_new=160):
    """The masked decoding loop: full forwards (no cache), the grammar's mask on every step."""
    prompt = tokenizer.encode("Answer in JSON:\n")
    output = []
    constraint = grammar.constraint()
    generator = make_generator(sampling)
    V = model.config.vocab_size
    while not constraint.done and len(output) < max_new:
        logits = model(torch.tensor([prompt + output]), last_only=True)[:, -1]  # (1, V)
        token = int(next_tokens(logits, [sampling], [generator], [(prompt, output)], [constraint.mask(V)])[0])
        constraint.accept(token)
        output.append(token)
    assert constraint.done, f"not complete after {max_new} tokens: {tokenizer.decode(output)!r}"
    return tokenizer.decode([t for t in output if t not in tokenizer.stop_ids])


SAMPLINGS = {"greedy": Sampling(frequency_penalty=0.5), "sampled": Sampling(temperature=1.0, seed=0),
             "sampled-top-p": Sampling(temperature=0.8, top_p=0.9, seed=1)}


@pytest.mark.parametrize("how", SAMPLINGS)
@pytest.mark.parametrize("name", SCHEMAS)
def test_decoding_under_a_schema_gives_valid_json(model, tokenizer, name, how):
    text = constrained(model, tokenizer, Grammar.json_schema(tokenizer, SCHEMAS[name]), SAMPLINGS[how])
    jsonschema.validate(json.loads(text), SCHEMAS[name])


@pytest.mark.parametrize("how", SAMPLINGS)
def test_json_object_gives_an_object(model, tokenizer, how):
    # A random model writes strings without end where no schema bounds them: a bias towards '"'
    # closes them (and the mask still decides where a '"' may go).
    sampling = SAMPLINGS[how].replace(logit_bias={tokenizer.encode('"', add_bos=False)[0]: 10})
    value = json.loads(constrained(model, tokenizer, Grammar.json_object(tokenizer), sampling, max_new=300))
    assert isinstance(value, dict)


def test_a_complete_grammar_allows_only_the_stop_tokens(tokenizer):
    constraint = Grammar.json_schema(tokenizer, PERSON).constraint()
    for token in tokenizer.encode(json.dumps({"name": "Ada", "age": 36}), add_bos=False):
        assert constraint.mask(tokenizer.vocab_size)[token]
        constraint.accept(token)
    assert constraint.done
    mask = constraint.mask(tokenizer.vocab_size + 64)  # a model's padded vocabulary: the extra ids never
    assert mask.shape == (tokenizer.vocab_size + 64,) and mask.nonzero()[:, 0].tolist() == tokenizer.stop_ids
    constraint.accept(tokenizer.token_id("<end_of_turn>"))
    assert constraint.done


def test_a_token_the_grammar_does_not_allow_is_refused(tokenizer):
    constraint = Grammar.json_object(tokenizer).constraint()
    x = tokenizer.encode("x", add_bos=False)[0]
    assert not constraint.mask(tokenizer.vocab_size)[x]
    with pytest.raises(GenerationError, match=f"token {x} .* not allowed"):
        constraint.accept(x)
    for token in (tokenizer.eos_id, tokenizer.token_id("<start_of_turn>"), tokenizer.vocab_size + 3):
        with pytest.raises(GenerationError, match="not allowed"):
            constraint.accept(token)
    constraint.accept(tokenizer.encode("{", add_bos=False)[0])  # refusals leave it usable


@pytest.mark.parametrize("schema,problem", [
    ({"type": "nope"}, "nope"), ({"type": "integer", "minimum": "x"}, "minimum"),
    ({"$ref": "#/$defs/missing"}, "missing"), ({"type": "string", "pattern": "(("}, "unclosed"),
    (["not", "an", "object"], "must be an object"), ({"enum": {1, 2}}, "serializable"),
])
def test_a_bad_schema_names_the_problem_in_one_line(tokenizer, schema, problem):
    with pytest.raises(GenerationError, match="invalid JSON schema") as e:
        Grammar.json_schema(tokenizer, schema)
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_regex_and_ebnf_grammars(tokenizer):
    def complete(grammar, text):
        constraint = grammar.constraint()
        for token in tokenizer.encode(text, add_bos=False):
            constraint.accept(token)
        return constraint

    assert complete(Grammar.regex(tokenizer, r"(yes|no)"), "yes").done
    assert complete(Grammar.ebnf(tokenizer, 'root ::= "a" [0-9]+ "."'), "a42.").done  # llama.cpp's GBNF
    assert complete(Grammar.ebnf(tokenizer, 'start: "x" /[0-9]+/ "!"'), "x7!").done  # Lark
    with pytest.raises(GenerationError, match="invalid regex"):
        Grammar.regex(tokenizer, "((")
    with pytest.raises(GenerationError, match="invalid grammar.*foo"):
        Grammar.ebnf(tokenizer, "start: foo")


def test_token_bytes_are_the_text_of_each_token(tokenizer):
    table = tokenizer.token_bytes()
    assert len(table) == tokenizer.vocab_size
    assert all(table[i] is None for i in (*tokenizer.stop_ids, tokenizer.bos_id, tokenizer.pad_id,
                                          tokenizer.token_id("<start_of_turn>"), tokenizer.token_id("<unused0>")))
    text = 'Héllo,  wörld! {"a": [1, 2]}\n\t🙂 日本語 𓀀'  # the hieroglyph is in no piece: 4 byte tokens
    ids = tokenizer.encode(text, add_bos=False)
    assert b"".join(table[i] for i in ids).decode("utf-8") == text == tokenizer.decode(ids)
    assert any(len(table[i]) == 1 and table[i][0] >= 0x80 for i in ids)  # byte fallback pieces among them


def test_the_tokenizer_info_is_built_once_per_tokenizer(tokenizer):
    from gemmakit.runtime import grammar

    Grammar.json_object(tokenizer)
    ll = grammar._LL_TOKENIZERS[tokenizer]
    Grammar.json_schema(tokenizer, PERSON)
    assert grammar._LL_TOKENIZERS[tokenizer] is ll
