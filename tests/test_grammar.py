"""Constrained decoding in the engine: grammars (OpenAI ``response_format``) and ``logit_bias``.

A random tiny model writes nonsense, so a grammar has to do all the work: every document must parse
and validate (``jsonschema``) whatever the model prefers, greedy or sampled, batched with requests
that must not notice. ``logit_bias`` is checked against transformers' ``sequence_bias``.
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
import torch

from qwen.engine import Engine
from qwen.grammar import json_schema_grammar, lark_grammar, regex_grammar, response_format_grammar
from qwen.sampling import SamplingParams

PADDING_ID = 151900  # in the model's vocabulary (151936) but not the tokenizer's (151851)

# Bounded strings, numbers and arrays: a random model rarely ends a free string, and every document
# of these schemas ends within the token budget, so every request must finish "stop".
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": -5, "maximum": 5},
        "ok": {"type": "boolean"},
        "owner": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 6}, "kind": {"enum": ["a", "b"]}},
            "required": ["city", "kind"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "ok", "owner"],
    "additionalProperties": False,
}
CHOICE = {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]}}, "required": ["answer"],
          "additionalProperties": False}
SCHEMAS = [PERSON, NESTED, CHOICE]
# Sampling settings per constrained request: greedy, and sampled with and without top-k/top-p.
SETTINGS = [{"do_sample": False}, {"seed": 1}, {"seed": 2, "temperature": 0.7, "top_k": 50, "top_p": 0.9}]


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def engine(tiny_model, tokenizer) -> Engine:
    return Engine(tiny_model, tokenizer, max_batch_size=16)


@pytest.fixture(scope="module")
def stops(tokenizer) -> list[int]:
    """The server's stop ids: end of turn, start of turn, end of text."""
    return [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    return tokenizer.encode("Describe a person as JSON.")


def token(tokenizer, text: str) -> int:
    [tid] = tokenizer.encode(text)
    return tid


def params(stops: list[int], **kw) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 120, "stop_token_ids": stops, **kw})


# ----- response_format -> grammar -----------------------------------------------------------------


def test_response_format_grammar():
    assert response_format_grammar(None) is None
    assert response_format_grammar({"type": "text"}) is None
    assert response_format_grammar({"type": "json_object"}) == json_schema_grammar({"type": "object"})
    assert response_format_grammar(schema_format(PERSON)) == json_schema_grammar(PERSON)
    with pytest.raises(ValueError, match="unknown response_format type"):
        response_format_grammar({"type": "yaml"})
    with pytest.raises(ValueError, match="Invalid type"):
        response_format_grammar(schema_format({"type": "integr"}))
    with pytest.raises(ValueError, match="a JSON schema is an object"):
        json_schema_grammar([1, 2])  # type: ignore[arg-type]
    # A keyword that cannot be enforced: refused when strict (also when unset), ignored when not.
    loose = {"type": "object", "properties": {"mail": {"type": "string", "format": "no-such-format"}}}
    for strict in (True, None):
        with pytest.raises(ValueError, match="no-such-format"):
            response_format_grammar({"type": "json_schema", "json_schema": {"schema": loose, "strict": strict}})
    assert response_format_grammar({"type": "json_schema", "json_schema": {"schema": loose, "strict": False}})
    with pytest.raises(ValueError, match="invalid grammar"):
        regex_grammar("((")
    with pytest.raises(ValueError, match="invalid grammar"):
        lark_grammar("start: 'a' | ")


def test_invalid_grammar_raises_on_submit(engine, prompt):
    with pytest.raises(ValueError, match="invalid grammar"):
        engine.submit(prompt, SamplingParams(grammar='{"grammars": [{"lark_grammar": "start: nope"}]}'))
    assert not engine.waiting


# ----- grammar-constrained generation -------------------------------------------------------------


def test_a_grammar_with_no_way_on_finishes_grammar_not_stop(engine, prompt, stops):
    """A regex that no string matches compiles, but its matcher can allow nothing but the end of the reply: the
    sequence finishes "grammar" (the server's 400), never "stop" with an empty reply that the grammar rejects."""
    [seq] = engine.generate([prompt], params(stops, grammar=regex_grammar(r"[^\s\S]")))
    assert seq.finish_reason == "grammar" and seq.output_ids == []
    [seq] = engine.generate([prompt], params(stops, grammar=regex_grammar("[ab]{3}")))
    assert seq.finish_reason == "stop" and len(seq.text) == 3 and set(seq.text) <= {"a", "b"}


def test_schemas_validate_batched_with_unconstrained_requests(engine, tokenizer, prompt, stops):
    """Every schema x greedy/sampled, in one batch with plain requests that decode as if alone."""
    plain_prompts = [tokenizer.encode("Hello"), tokenizer.encode("Once upon a time")]
    plain_params = [params(stops, max_new_tokens=12, do_sample=False), params(stops, max_new_tokens=12, seed=5)]
    alone = [engine.generate([p], s)[0].output_ids for p, s in zip(plain_prompts, plain_params, strict=True)]
    cases = [(schema, kw) for schema in SCHEMAS for kw in SETTINGS]
    requests = [(prompt, params(stops, grammar=response_format_grammar(schema_format(schema)), **kw))
                for schema, kw in cases]
    requests[1:1] = zip(plain_prompts, plain_params, strict=True)  # plain rows between constrained ones
    seqs = engine.generate([p for p, _ in requests], [s for _, s in requests])
    plain = seqs[1:3]
    constrained = seqs[:1] + seqs[3:]
    assert [s.output_ids for s in plain] == alone
    for seq, (schema, kw) in zip(constrained, cases, strict=True):
        assert seq.finish_reason == "stop", (kw, seq.text)
        jsonschema.validate(json.loads(seq.text), schema)
        assert seq.text == tokenizer.decode(seq.output_ids)
        assert not set(seq.output_ids) & set(stops)  # the grammar's end, not an end-of-turn token, stopped it
    # Sampling still samples under a grammar: the seeds gave different documents somewhere.
    assert len({s.text for s in constrained}) > len(SCHEMAS)


def test_unconstrained_random_model_would_not_write_json(engine, prompt, stops):
    """The control: without the grammar these settings give no JSON at all."""
    for kw in SETTINGS:
        text = engine.generate([prompt], params(stops, max_new_tokens=30, **kw))[0].text
        with pytest.raises(ValueError):
            json.loads(text)


def test_json_object(engine, tokenizer, prompt, stops):
    """Any JSON object. A random model never ends a free string, so a bias on quotes (more) and the
    brace (less) keeps documents short; what they may be is still the grammar's business alone."""
    bias = {token(tokenizer, '"'): 30.0, token(tokenizer, '"}'): 30.0, token(tokenizer, "}"): 20.0}
    grammar = response_format_grammar({"type": "json_object"})
    seqs = engine.generate([prompt] * len(SETTINGS), [params(stops, grammar=grammar, logit_bias=bias, **kw)
                                                      for kw in SETTINGS])
    for seq in seqs:
        assert seq.finish_reason == "stop", seq.text
        assert isinstance(json.loads(seq.text), dict)
    assert any(len(s.text) > 2 for s in seqs)  # not only "{}"


def test_length_before_the_document_completes(engine, prompt, stops):
    grammar = response_format_grammar(schema_format(PERSON))
    seq = engine.generate([prompt], params(stops, max_new_tokens=4, do_sample=False, grammar=grammar))[0]
    assert seq.finish_reason == "length" and len(seq.output_ids) == 4
    assert seq.text.startswith('{"name": "')  # a prefix of a valid document, cut off
    with pytest.raises(ValueError):
        json.loads(seq.text)


def test_end_of_turn_only_when_the_grammar_is_complete(engine, tokenizer, prompt, stops):
    """A model that wants to stop at once (a +100 bias on both end tokens, and on a padding id) is
    held to the grammar until it is complete; then an end token ends it and is not part of the text."""
    ends = {tokenizer.im_end_id: 100.0, tokenizer.eod_id: 100.0, PADDING_ID: 100.0}
    grammar = response_format_grammar(schema_format(NESTED))
    seq = engine.generate([prompt], params(stops, do_sample=False, grammar=grammar, logit_bias=ends))[0]
    assert seq.finish_reason == "stop"
    jsonschema.validate(json.loads(seq.text), NESTED)
    assert PADDING_ID not in seq.output_ids
    # A grammar that may go on once complete ([ab]+): the end token is taken at the first chance.
    # Without stop_token_ids it still ends the sequence (a grammar's end) and is not in the output.
    for stop_ids in (stops, []):
        seq = engine.generate([prompt], params(stop_ids, do_sample=False, grammar=regex_grammar("[ab]+"),
                                               logit_bias=ends))[0]
        assert seq.finish_reason == "stop" and len(seq.output_ids) == 1
        assert re.fullmatch("[ab]+", seq.text)
    # A grammar with nothing left to add stops by itself, whatever the stop ids.
    for stop_ids in (stops, []):
        seq = engine.generate([prompt], params(stop_ids, do_sample=False, grammar=regex_grammar("(yes|no)!")))[0]
        assert seq.finish_reason == "stop" and seq.text in ("yes!", "no!")


def test_streamed_text_adds_up_to_the_document(tiny_model, tokenizer, prompt, stops):
    """The server's path: requests submitted from an event loop, matchers advanced on the engine's
    thread; the streamed deltas of each choice add up to its document."""
    grammar = response_format_grammar(schema_format(PERSON))
    requests = [(prompt, params(stops, seed=seed, grammar=grammar)) for seed in (3, 4)]
    requests.append((prompt, params(stops, max_new_tokens=8, seed=5)))  # an unconstrained batch mate
    engine = Engine(tiny_model, tokenizer).start()

    async def collect() -> tuple[list[str], list]:
        texts, seqs = [""] * len(requests), [None] * len(requests)
        async for index, seq, text, _ in engine.stream_many(requests):
            texts[index] += text
            seqs[index] = seq
        return texts, seqs

    try:
        texts, seqs = asyncio.run(collect())
    finally:
        engine.stop()
    assert texts == [s.text for s in seqs]
    for seq in seqs[:2]:
        assert seq.finish_reason == "stop"
        jsonschema.validate(json.loads(seq.text), PERSON)
    assert seqs[2].finish_reason == "length"


def test_logprobs_under_a_grammar(engine, tokenizer, prompt, stops):
    """Logprobs are those of the constrained distribution: an alternative the grammar forbids has
    -9999 (OpenAI's finite stand-in for -inf), and the allowed ones continue a valid document."""
    grammar = response_format_grammar(schema_format(CHOICE))
    seq = engine.generate([prompt], params(stops, do_sample=False, grammar=grammar, logprobs=3))[0]
    documents = [json.dumps({"answer": a}) for a in CHOICE["properties"]["answer"]["enum"]]
    assert seq.text in documents
    choices = 0
    for i, (_, _, alternatives) in enumerate(seq.logprobs):
        allowed = [t for t, lp in alternatives if lp > -9999.0]
        prefix = tokenizer.decode(seq.output_ids[:i])
        assert all(any(d.startswith(prefix + tokenizer.decode([t])) for d in documents) for t in allowed)
        choices += len(allowed) > 1
    assert choices  # the enum value was a real choice among allowed tokens


def test_each_distinct_grammar_compiles_once(engine, prompt, stops):
    grammars = engine.grammars
    grammar = response_format_grammar(schema_format(CHOICE))
    first = grammars.matcher(grammar)
    compiled = dict(grammars._compiled)
    assert grammars.matcher(grammar) is not first  # a fresh matcher per request ...
    assert grammars._compiled == compiled  # ... from the one compiled copy
    for seed in range(3):
        engine.generate([prompt], params(stops, seed=seed, grammar=grammar))
    assert grammars._compiled == compiled


# ----- logit_bias ---------------------------------------------------------------------------------


def test_logit_bias_matches_transformers_sequence_bias(tiny_model, engine, prompt):
    """Greedy with a bias (and a repetition penalty, applied after it, as transformers does) equals
    ``model.generate(sequence_bias=...)``; a batch mate without a bias is untouched."""
    n = 10
    plain = engine.generate([prompt], SamplingParams(max_new_tokens=n, do_sample=False))[0].output_ids
    bias = {plain[0]: -100.0, plain[3]: 5.0, 7: 2.5}
    biased, mate = engine.generate([prompt, prompt], [
        SamplingParams(max_new_tokens=n, do_sample=False, repetition_penalty=1.3, logit_bias=bias),
        SamplingParams(max_new_tokens=n, do_sample=False),
    ])
    out = tiny_model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=n,
        do_sample=False, top_p=None, top_k=None, eos_token_id=None, pad_token_id=0, repetition_penalty=1.3,
        sequence_bias=[[[t], b] for t, b in bias.items()],
    )
    assert biased.output_ids == out[0, len(prompt):].tolist()
    assert biased.output_ids[0] != plain[0]
    assert mate.output_ids == plain


def test_logit_bias_forces_and_bans_sampled_tokens(engine, prompt):
    forced = engine.generate([prompt], SamplingParams(max_new_tokens=5, seed=0, logit_bias={PADDING_ID: 100.0}))[0]
    assert forced.output_ids == [PADDING_ID] * 5
    free = engine.generate([prompt], SamplingParams(max_new_tokens=8, seed=0, temperature=1.5))[0].output_ids
    banned = engine.generate([prompt], SamplingParams(max_new_tokens=8, seed=0, temperature=1.5,
                                                      logit_bias=dict.fromkeys(free, -100.0)))[0].output_ids
    assert not set(banned) & set(free)


@pytest.mark.parametrize(
    ("bias", "message"),
    [({0: 100.5}, r"values must be in \[-100, 100\]"), ({1: -101}, r"values must be in"),
     ({151936: 1.0}, r"ids must be in \[0, 151936\)"), ({-1: 1.0}, r"ids must be in")],
)
def test_invalid_logit_bias_raises_on_submit(engine, prompt, bias, message):
    with pytest.raises(ValueError, match=message):
        engine.submit(prompt, SamplingParams(logit_bias=bias))
    assert not engine.waiting
