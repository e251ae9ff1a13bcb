"""Speculative decoding with prompt lookup (``Engine(..., draft="ngram")``, ``qwen.speculative``): replies equal
plain decoding's, greedy and seeded-sampled, with every selection setting, stop words, grammars, logprobs,
cancellation, the prefix cache and quantized layers; guesses are really made and kept (so equality is not
vacuous); bad settings are refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from qwen.engine import Engine
from qwen.sampling import SamplingParams
from qwen.speculative import NgramIndex, adapt

# A tiny random model repeats itself within a few dozen tokens, so its replies copy n-grams of themselves (and
# of these prompts, which repeat too): guesses get kept as well as dropped.
TEXTS = [
    "a b c d a b c d a b c d a b",
    "Once upon a time there was a tiny model that",
    "1 2 3 1 2 3 1 2",
    "你好，世界。你好，世界。你好",
    "x",
]
NEW = 40


def greedy(n: int = NEW, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, do_sample=False, **kw)


def sampled(seed: int, n: int = NEW, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, do_sample=True, seed=seed, **{"temperature": 0.7, **kw})


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(t) for t in TEXTS]


def run(model, tokenizer, prompts, params, **engine_kw) -> tuple[list, Engine]:
    engine = Engine(model, tokenizer, **engine_kw)
    return engine.generate(prompts, params), engine


def outputs(seqs) -> list[list[int]]:
    return [s.output_ids for s in seqs]


def test_ngram_index_proposes_what_followed_the_latest_match():
    index = NgramIndex(max_n=3, min_n=2)
    tokens = [1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 2, 3]
    # the suffix [2, 3] last occurred followed by 5, 6, 7 (the latest match, not the first); [7, 2, 3] never
    assert index.propose(tokens, 3) == [5, 6, 7]
    assert index.propose(tokens, 1) == [5]
    assert index.propose(tokens + [5], 4) == [6, 7, 2, 3]  # the longer suffix [2, 3, 5] wins
    assert NgramIndex().propose([1, 2, 3, 4], 4) == []  # nothing repeats: no guess
    # the suffix is not a match of itself; a match that runs into the end repeats its period
    assert NgramIndex().propose([1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]
    assert NgramIndex().propose([7, 7, 7], 4) == [7, 7, 7, 7]
    with pytest.raises(ValueError, match="n-gram sizes"):
        NgramIndex(max_n=1, min_n=2)


def test_adapt_doubles_on_success_halves_on_failure_and_pauses_a_draft_model():
    assert adapt(2, 2, 2, most=8, least=1) == 4 and adapt(8, 8, 8, most=8, least=1) == 8
    assert adapt(4, 4, 0, most=8, least=1) == 2 and adapt(1, 1, 0, most=8, least=1) == 1
    assert adapt(1, 1, 0, most=8, least=0) == 0  # a draft model's pause
    assert adapt(4, 4, 2, most=8, least=1) == 4 and adapt(4, 0, 0, most=8, least=1) == 4


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_replies_equal_plain_decoding(tiny_model, tokenizer, prompts, k, batch):
    plain, _ = run(tiny_model, tokenizer, prompts, greedy(), max_batch_size=batch)
    fast, engine = run(tiny_model, tokenizer, prompts, greedy(), max_batch_size=batch, draft="ngram",
                       num_speculative_tokens=k)
    assert outputs(fast) == outputs(plain)
    counts = engine.speculated
    assert counts.accepted > 0 and counts.proposed > counts.accepted  # guesses both kept and dropped
    assert counts.tokens_per_draft > 1


def test_seeded_sampling_equals_plain_decoding_with_every_setting(tiny_model, tokenizer, prompts):
    """A selection that equals the guess keeps it, one that differs is the next token: the same random draws, in
    the same order, as without speculation, so a seeded reply is the same (and its distribution the model's:
    a draw equals a guess d with probability p(d), speculative sampling's acceptance for a one-token guess, and
    otherwise is a draw from p without d, the residual distribution). Logprobs are those of plain decoding."""
    settings = [
        dict(),
        dict(top_k=3),
        dict(top_p=0.8, temperature=1.0),
        dict(repetition_penalty=1.3),
        dict(presence_penalty=0.5, frequency_penalty=0.5, logprobs=2),
        dict(logit_bias={tokenizer.encode(" b")[0]: 5.0}, top_k=5),
    ]
    params = [sampled(seed, **kw) for seed, kw in enumerate(settings)]
    batch = [prompts[i % len(prompts)] for i in range(len(params))]
    plain, _ = run(tiny_model, tokenizer, batch, params, max_batch_size=8)
    fast, engine = run(tiny_model, tokenizer, batch, params, max_batch_size=8, draft="ngram")
    assert outputs(fast) == outputs(plain)
    assert engine.speculated.accepted > 0 and engine.speculated.proposed > engine.speculated.accepted
    for a, b in zip(fast[4].logprobs, plain[4].logprobs, strict=True):
        assert a[0] == b[0] and a[1] == pytest.approx(b[1], abs=1e-4)
        assert [t for t, _ in a[2]] == [t for t, _ in b[2]]


def test_many_seeds_keep_and_drop_guesses_as_plain_sampling_does(tiny_model, tokenizer):
    """The coupling above over 32 seeds, where guesses are kept about half the time: a logit bias makes " a" and
    " b" the likely tokens (about even), and the prompt holds every pair of them, so a guess exists at every
    step. Each seed's reply equals plain sampling's, and " a" comes about as often as the model gives it."""
    a, b = tokenizer.encode(" a")[0], tokenizer.encode(" b")[0]
    prompt = tokenizer.encode(" a b a a b b a b a a b b")
    settings = [dict(), dict(top_k=2), dict(top_p=0.9), dict(temperature=0.8)]
    params = [sampled(seed, n=16, logit_bias={a: 20.0, b: 20.0}, **{"temperature": 1.0, **settings[seed % 4]})
              for seed in range(32)]
    plain, _ = run(tiny_model, tokenizer, [prompt] * len(params), params, max_batch_size=8)
    fast, engine = run(tiny_model, tokenizer, [prompt] * len(params), params, max_batch_size=8, draft="ngram")
    assert outputs(fast) == outputs(plain)
    assert len({tuple(s.output_ids) for s in plain}) == 32  # really random
    counts = engine.speculated
    assert 0.2 < counts.acceptance < 0.8 and counts.proposed > 200
    tokens = [t for s in fast for t in s.output_ids]
    assert set(tokens) <= {a, b} and 0.35 < tokens.count(a) / len(tokens) < 0.65


def test_stop_words_tokens_and_lengths(tiny_model, tokenizer, prompts):
    plain, _ = run(tiny_model, tokenizer, prompts, greedy())
    ref = plain[0].output_ids
    stop_text = tokenizer.decode(ref[10:12])
    params = [greedy(stop=[stop_text]), greedy(stop_token_ids=[ref[7]]), greedy(n=5), greedy(n=1), greedy()]
    want, _ = run(tiny_model, tokenizer, [prompts[0]] * 5, params)
    got, _ = run(tiny_model, tokenizer, [prompts[0]] * 5, params, draft="ngram")
    assert [(s.output_ids, s.text, s.finish_reason) for s in got] == [
        (s.output_ids, s.text, s.finish_reason) for s in want]
    assert want[0].finish_reason == "stop" and want[1].finish_reason == "stop" and len(want[2].output_ids) == 5


def test_max_model_len_bounds_the_guesses(tiny_model, tokenizer, prompts):
    longest = max(len(p) for p in prompts)
    want, _ = run(tiny_model, tokenizer, prompts, greedy(), max_model_len=longest + 12)
    got, _ = run(tiny_model, tokenizer, prompts, greedy(), max_model_len=longest + 12, draft="ngram")
    assert outputs(got) == outputs(want)
    assert all(len(p) + len(s.output_ids) <= longest + 12 for p, s in zip(prompts, got, strict=True))


def test_a_grammar_constrains_every_verified_position(tiny_model, tokenizer, prompts):
    pytest.importorskip("llguidance")
    from qwen.grammar import response_format_grammar

    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 30}}, "required": ["a"],
              "additionalProperties": False}
    grammar = response_format_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    params = [greedy(n=60, grammar=grammar), sampled(3, n=60, grammar=grammar), greedy()]
    batch = [prompts[0], prompts[2], prompts[0]]
    want, _ = run(tiny_model, tokenizer, batch, params)
    got, engine = run(tiny_model, tokenizer, batch, params, draft="ngram")
    assert outputs(got) == outputs(want)
    for seq in got[:2]:
        if seq.finish_reason == "stop":
            assert set(json.loads(seq.text)) == {"a"}
    assert engine.speculated.proposed > 0


def test_cancelling_a_speculating_request_leaves_the_others(tiny_model, tokenizer, prompts):
    want, _ = run(tiny_model, tokenizer, [prompts[2]], greedy(n=200))
    engine = Engine(tiny_model, tokenizer, draft="ngram")
    doomed, kept = engine.submit(prompts[0], greedy(n=200)), engine.submit(prompts[2], greedy(n=200))
    for _ in range(4):
        engine.step()
    engine.cancel(doomed)
    while engine.step():
        pass
    assert doomed.finish_reason == "cancelled" and len(doomed.output_ids) < 200
    assert kept.output_ids == want[0].output_ids


def test_the_prefix_cache_keeps_only_kept_tokens(tiny_model, tokenizer, prompts):
    """A finished speculative reply's keys go to the prefix cache up to its last fed token, never a dropped guess:
    a follow-up that extends the conversation reuses their whole blocks and still equals plain decoding."""
    engine = Engine(tiny_model, tokenizer, draft="ngram")
    first = engine.generate([prompts[0]], greedy(n=80))[0]
    assert engine.speculated.accepted > 0
    follow = prompts[0] + first.output_ids + tokenizer.encode(" and then")
    again = engine.generate([follow], greedy())[0]
    block = engine.prefix_cache.block
    assert again.cached_tokens == (len(prompts[0]) + len(first.output_ids) - 1) // block * block > 0
    assert again.output_ids == run(tiny_model, tokenizer, [follow], greedy(), prefix_cache_bytes=0)[0][0].output_ids


def test_quantized_layers_verify_on_their_decode_kernels(tiny_model, tokenizer, prompts):
    """The verification forward takes the decode kernels (``qwen.cpu_kernels.decode_rows``): a guessed token's
    numbers are those decoding it alone would get, so an int8 model's greedy replies equal plain decoding's."""
    from qwen.quantize import quantize_int8_

    model = quantize_int8_(copy.deepcopy(tiny_model))
    want, _ = run(model, tokenizer, prompts, greedy(), max_batch_size=8)
    got, engine = run(model, tokenizer, prompts, greedy(), max_batch_size=8, draft="ngram")
    assert outputs(got) == outputs(want) and engine.speculated.accepted > 0


def test_bad_settings_are_refused(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="draft must be"):
        Engine(tiny_model, tokenizer, draft="medusa")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        Engine(tiny_model, tokenizer, draft="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="int8"):
        Engine(tiny_model, tokenizer, draft="ngram", kv_cache_int8=True)


def test_a_reply_that_repeats_itself_takes_several_tokens_per_forward(tiny_model, tokenizer, prompts):
    """A logit bias makes the greedy reply one token over and over: from its third token on every guess is kept,
    the guesses grow to num_speculative_tokens, and a forward yields several tokens."""
    a = tokenizer.encode(" a")[0]
    params = greedy(n=60, logit_bias={a: 50.0})
    want, _ = run(tiny_model, tokenizer, [prompts[1]], params)
    got, engine = run(tiny_model, tokenizer, [prompts[1]], params, draft="ngram", num_speculative_tokens=8)
    assert outputs(got) == outputs(want) == [[a] * 60]
    counts = engine.speculated
    assert counts.acceptance == 1.0 and counts.tokens_per_draft > 6


def test_bf16_replies_part_only_at_ties(tmp_path_factory, tokenizer, prompts):
    """In bf16 a forward over several positions rounds attention apart from one at a time by a unit in the last
    place, which decides exact ties of the logits: replies may part there, and only there. Up to where they
    part the logprobs agree within two units in the last place of these logits (under 4: 2^-6 each), and where
    they part plain decoding's top two are as close."""
    from transformers import AutoModelForCausalLM

    from qwen.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("wide") / "m", hidden=512, heads=8, intermediate=4096, seed=5)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    params = greedy(n=60, logprobs=2)
    want, _ = run(model, tokenizer, prompts, params, max_batch_size=8)
    got, engine = run(model, tokenizer, prompts, params, max_batch_size=8, draft="ngram")
    assert engine.speculated.accepted > 0
    for plain, fast in zip(want, got, strict=True):
        pairs = zip(plain.output_ids, fast.output_ids, strict=True)  # both run to n tokens
        parted = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        kept = plain.logprobs if parted is None else plain.logprobs[:parted]
        assert all(abs(a[1] - b[1]) <= 2**-5 for a, b in zip(kept, fast.logprobs, strict=False))
        if parted is not None:
            (_, first), (_, second) = plain.logprobs[parted][2]
            assert first - second <= 2**-5


# ----- a draft model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory):
    """An unrelated small model with Qwen's vocabulary: its guesses are mostly wrong."""
    from transformers import AutoModelForCausalLM

    from qwen.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("draft") / "m", layers=1, hidden=32, heads=2,
                                intermediate=64, seed=7)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_a_draft_model_gives_plain_decodings_replies(tiny_model, other_draft, tokenizer, prompts):
    """Greedy replies equal plain decoding's with the model as its own draft (every guess kept: the upper bound)
    and with an unrelated draft (few kept, then guessing pauses), across guess lengths and with requests joining
    and leaving a batch of two slots (the draft's cache moves with the engine's slots)."""
    lengths = [NEW, 7, 25, 3, 33]
    params = [greedy(n) for n in lengths]
    want, _ = run(tiny_model, tokenizer, prompts, params, max_batch_size=2)
    for draft, k in ((tiny_model, 4), (other_draft, 2), (tiny_model, 8)):
        got, engine = run(tiny_model, tokenizer, prompts, params, max_batch_size=2, draft=draft,
                          num_speculative_tokens=k)
        assert outputs(got) == outputs(want)
        counts = engine.speculated
        if draft is tiny_model:
            assert counts.acceptance > 0.95 and counts.tokens_per_draft > k / 2
        else:  # failing guesses shrink to one token, then pause: few drafts for the tokens decoded
            assert counts.proposed > 0 and counts.acceptance < 0.5
            assert counts.drafts < sum(lengths) / 4


def test_a_draft_model_with_sampling_grammars_and_stops(tiny_model, tokenizer, prompts):
    """Seeded sampling with penalties and top-k/top-p, a grammar (the draft's guesses follow it too) and stop
    strings, through a draft model: plain decoding's replies."""
    pytest.importorskip("llguidance")
    from qwen.grammar import response_format_grammar

    grammar = response_format_grammar({"type": "json_object"})
    stop = tokenizer.decode(run(tiny_model, tokenizer, [prompts[0]], greedy())[0][0].output_ids[8:10])
    params = [sampled(1, top_k=5), sampled(2, top_p=0.9, repetition_penalty=1.2), greedy(n=60, grammar=grammar),
              sampled(4, n=60, grammar=grammar), greedy(stop=[stop])]
    batch = [prompts[0], prompts[1], prompts[2], prompts[3], prompts[0]]
    want, _ = run(tiny_model, tokenizer, batch, params, max_batch_size=8)
    got, engine = run(tiny_model, tokenizer, batch, params, max_batch_size=8, draft=tiny_model)
    assert [(s.output_ids, s.finish_reason) for s in got] == [(s.output_ids, s.finish_reason) for s in want]
    assert engine.speculated.accepted > 0 and want[4].finish_reason == "stop"


def test_an_int8_copy_of_the_model_as_its_draft(tiny_model, tokenizer, prompts):
    """The self-speculative setup: the model's own weights in int8 guess for it (nearly all kept)."""
    from qwen.quantize import quantize_int8_

    draft = quantize_int8_(copy.deepcopy(tiny_model))
    want, _ = run(tiny_model, tokenizer, prompts, greedy(), max_batch_size=8)
    got, engine = run(tiny_model, tokenizer, prompts, greedy(), max_batch_size=8, draft=draft)
    assert outputs(got) == outputs(want) and engine.speculated.acceptance > 0.8


def test_a_draft_with_another_vocabulary_is_refused(tiny_model, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from qwen.tiny import make_tiny_checkpoint

    other = AutoModelForCausalLM.from_pretrained(make_tiny_checkpoint(tmp_path / "v", vocab=152064)).eval()
    with pytest.raises(ValueError, match="vocabulary has 152064 tokens.*151936"):
        Engine(tiny_model, tokenizer, draft=other)


def test_a_draft_model_guesses_with_the_requests_logit_bias(tiny_model, other_draft, tokenizer, prompts):
    """A bias that makes the reply one token: an unrelated draft guesses it too (every guess kept)."""
    params = greedy(n=30, logit_bias={tokenizer.encode(" a")[0]: 50.0})
    want, _ = run(tiny_model, tokenizer, [prompts[1]], params)
    got, engine = run(tiny_model, tokenizer, [prompts[1]], params, draft=other_draft)
    assert outputs(got) == outputs(want) and engine.speculated.acceptance == 1.0


def test_a_draft_model_reads_prompts_as_the_engine_prefills_them(tiny_model, tokenizer, prompts):
    """The draft reads each prompt chunk in the step that prefills it (and a prefix cache's part with the first
    chunk), so its first guess does not read a whole prompt in a decode step. Its keys equal those of a draft
    that read the prompt in one forward, and the replies equal plain decoding's."""
    prompt = sum(prompts[:4], []) * 3  # 144 tokens
    earlier = greedy(n=2)
    reference = Engine(tiny_model, tokenizer, draft=tiny_model, prefix_cache_bytes=0)
    reference.generate([prompt], greedy())
    engine = Engine(tiny_model, tokenizer, draft=tiny_model, prefill_chunk=16)
    engine.generate([prompt[:70]], earlier)  # its first 64 tokens (two blocks) into the prefix cache
    seq = engine.submit(prompt, greedy())
    steps = []
    while not seq.output_ids:
        engine.step()
        steps.append((seq.computed, seq.drafted))
    assert steps[0] == (64 + 16, 64 + 16) and len(steps) > 2  # the cached prefix and a chunk of 16, then chunks
    assert all(drafted == computed for computed, drafted in steps[:-1])  # (the last step guesses too)
    while engine.step():
        pass
    assert seq.output_ids == Engine(tiny_model, tokenizer).generate([prompt], greedy())[0].output_ids
    n = len(prompt)
    for (k, v), (k_ref, v_ref) in zip(engine.proposer.cache.read(0, 0, n), reference.proposer.cache.read(0, 0, n),
                                      strict=True):
        torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-4)
