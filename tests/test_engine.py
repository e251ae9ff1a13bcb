"""The inference engine: continuous batching, per-request sampling, streaming, threads, int8, NTK.

Every check runs the real engine on a tiny random checkpoint and compares it with an independent
path: ``model.generate`` (transformers' own greedy/penalty/score logic), a plain forward pass, or
transformers' ``Qwen2ForCausalLM`` via ``qwen.convert.to_qwen2``.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from qwen.convert import to_qwen2
from qwen.engine import Engine, Sequence
from qwen.quantize import Int8Linear, quantize_int8_
from qwen.sampling import SamplingParams, argmax_rows
from qwen.tiny import make_tiny_checkpoint

N = 10  # new tokens of the shared greedy references
TEXTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog",
    "a b c d e f g h i j k l m n o p",
    "你好，世界",
    "xxx",
    "Once upon a time there was a tiny model that",
]
# Different lengths so that requests leave a running batch at different steps.
MAX_NEW = [4, 10, 6, 8, 5, 9]


def greedy(max_new_tokens: int = N, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, do_sample=False, **kw)


def reference(model, ids: list[int], n: int, **kw) -> list[int]:
    """transformers' own greedy decoding of one unpadded prompt, run for exactly ``n`` tokens."""
    out = model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n,
        do_sample=False, top_p=None, top_k=None, eos_token_id=None, pad_token_id=0,
        **{"repetition_penalty": 1.0, **kw},
    )
    return out[0, len(ids):].tolist()


def drain(engine: Engine) -> list[list[tuple[int, int]]]:
    """Step until idle; return (id, tokens so far) of the running sequences after each step."""
    snapshots = []
    while engine.step():
        snapshots.append([(s.id, len(s.output_ids)) for s in engine.running])
    return snapshots


def wait_until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    ids = [tokenizer.encode(t) for t in TEXTS]
    assert len({len(p) for p in ids}) >= 4  # really of different lengths
    return ids


@pytest.fixture(scope="module")
def refs(tiny_model, prompts) -> list[list[int]]:
    out = [reference(tiny_model, p, N) for p in prompts]
    assert all(len(r) == N for r in out)
    return out


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """A tiny checkpoint with 15x larger weights: peaky attention, so positions and rotary matter a lot."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-sharp"), initializer_range=0.3, seed=1)
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def sharp_refs(sharp, prompts) -> list[list[int]]:
    return [reference(sharp, p, N) for p in prompts]


@pytest.fixture(params=[False, True], ids=["sync", "overlap"])
def started(request, tiny_model, tokenizer):
    engine = Engine(tiny_model, tokenizer, max_batch_size=4, overlap=request.param).start()
    thread = engine._thread
    yield engine
    engine.stop()
    assert engine._thread is None and not thread.is_alive()  # stop() joined the engine thread


# ----- greedy equals model.generate ---------------------------------------------------------------


@pytest.mark.parametrize("vocab", [151851, 151936, 1031, 7])  # tiny, real Qwen, prime, smaller than a block
def test_argmax_rows_equals_torch_argmax(vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(5, vocab, generator=g)
    x[1] = 0.0  # all ties: the first index
    x[2, vocab // 2 :] = 50.0  # a tie across blocks
    x[3, vocab - 1] = float("nan")  # NaN wins, as in torch.argmax
    x[4, 0] = 1e9
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    assert torch.equal(argmax_rows(x.t().contiguous().t()), x.argmax(dim=-1))  # non-contiguous input


@pytest.mark.parametrize("which", ["tiny", "sharp"])
@pytest.mark.parametrize("mode", ["batch8", "batch2", "one_by_one"])
def test_greedy_matches_model_generate(request, tokenizer, prompts, mode, which):
    if which == "tiny":
        model, refs = request.getfixturevalue("tiny_model"), request.getfixturevalue("refs")
    else:
        model, refs = request.getfixturevalue("sharp"), request.getfixturevalue("sharp_refs")
    params = [greedy(n) for n in MAX_NEW]
    if mode == "one_by_one":
        engine = Engine(model, tokenizer, max_batch_size=8)
        seqs = [engine.generate([p], [s])[0] for p, s in zip(prompts, params, strict=True)]
    else:
        engine = Engine(model, tokenizer, max_batch_size=8 if mode == "batch8" else 2)
        seqs = [engine.submit(p, s) for p, s in zip(prompts, params, strict=True)]
        snapshots = drain(engine)
        assert max(len(s) for s in snapshots) == min(engine.max_batch_size, len(prompts))
        if mode == "batch2":
            # Continuous batching: a request joined while its batch mate was mid-generation.
            assert any(len(s) == 2 and s[0][1] != s[1][1] for s in snapshots), snapshots
            assert len(snapshots) < sum(MAX_NEW)  # requests did share steps
    for seq, ref, n in zip(seqs, refs, MAX_NEW, strict=True):
        assert seq.output_ids == ref[:n]
        assert seq.finish_reason == "length"
        assert seq.text == tokenizer.decode(ref[:n])
    assert engine.running == [] and not engine.waiting


def test_repetition_penalty_matches_model_generate(tiny_model, tokenizer, prompts):
    engine = Engine(tiny_model, tokenizer, max_batch_size=2)
    params = [greedy(n, repetition_penalty=1.3) for n in (8, 5, 12)]
    seqs = engine.generate(prompts[2:5], params)
    for seq, p, s in zip(seqs, prompts[2:5], params, strict=True):
        assert seq.output_ids == reference(tiny_model, p, s.max_new_tokens, repetition_penalty=1.3)
    # ... and the penalty did change something, else the test would prove nothing.
    plain = engine.generate(prompts[2:5], [greedy(s.max_new_tokens) for s in params])
    assert [s.output_ids for s in seqs] != [s.output_ids for s in plain]


# ----- finishing: length, stop ids, stop strings, streamed deltas ---------------------------------


def test_requests_finish_independently_with_exact_lengths(tiny_model, tokenizer, prompts, refs):
    engine = Engine(tiny_model, tokenizer, max_batch_size=8)
    lengths = [1, 7, 3, 10, 2, 5]
    finished_at = {}
    seqs = [engine.submit(prompts[1], greedy(n)) for n in lengths]
    step, more = 0, True
    while more:
        more = engine.step()
        step += 1
        for s in seqs:
            if s.done and s.id not in finished_at:
                finished_at[s.id] = step
            assert (s in engine.running) == (not s.done)  # a finished request's slot is freed at once
    for s, n in zip(seqs, lengths, strict=True):
        assert s.finish_reason == "length"
        assert len(s.output_ids) == n
        assert s.output_ids == refs[1][:n]
        # The first step prefills (one token) and decodes (another); each later step adds one.
        assert finished_at[s.id] == max(n - 1, 1)
    assert step == max(lengths) - 1


def test_stop_token_ids(tiny_model, tokenizer, prompts, refs):
    i = next(i for i, r in enumerate(refs) if r.index(r[5]) == 5)
    stop = refs[i][5]
    events = []
    engine = Engine(tiny_model, tokenizer)
    seq = engine.submit(prompts[i], greedy(N, stop_token_ids=[stop]), lambda s, t, f: events.append((t, f)))
    other = engine.submit(prompts[i], greedy(N))  # a batch mate without the stop id runs on
    drain(engine)
    assert seq.output_ids == refs[i][:5] and stop not in seq.output_ids
    assert seq.finish_reason == "stop"
    assert seq.text == tokenizer.decode(refs[i][:5])
    assert "".join(t for t, _ in events) == seq.text
    assert [f for _, f in events].count(True) == 1 and events[-1][1]
    assert other.output_ids == refs[i] and other.finish_reason == "length"


def test_stop_token_on_the_first_token(tiny_model, tokenizer, prompts, refs):
    engine = Engine(tiny_model, tokenizer)
    seq = engine.generate([prompts[0]], greedy(N, stop_token_ids=[refs[0][0]]))[0]
    assert seq.output_ids == [] and seq.text == "" and seq.finish_reason == "stop"
    assert engine.running == []


def _stop_string(text: str) -> tuple[str, int]:
    """A 3-character piece of ``text`` that starts in its middle and does not occur earlier."""
    for start in range(len(text) // 2, len(text) - 3):
        piece = text[start : start + 3]
        if "\ufffd" not in piece and text.find(piece) == start and piece.strip():
            return piece, start
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings_cut_text_and_stream(tiny_model, tokenizer, prompts):
    n = 16
    full_ids = reference(tiny_model, prompts[5], n)
    full = tokenizer.decode(full_ids)
    stop, at = _stop_string(full)
    assert at > 0
    events: list[tuple[str, bool]] = []
    engine = Engine(tiny_model, tokenizer)
    seq = engine.submit(prompts[5], greedy(n, stop=["never-appears", stop]), lambda s, t, f: events.append((t, f)))
    while engine.step():
        pass
    assert seq.finish_reason == "stop"
    assert seq.text == full[:at]
    assert len(seq.output_ids) < n and seq.output_ids == full_ids[: len(seq.output_ids)]
    # Streaming: the deltas add up to the text, every partial sum is a prefix of it (nothing of the
    # stop string is ever shown and later taken back), and exactly the last event says finished.
    deltas = [t for t, _ in events]
    assert "".join(deltas) == seq.text
    for k in range(len(deltas) + 1):
        assert seq.text.startswith("".join(deltas[:k]))
    assert stop not in "".join(deltas)
    assert [f for _, f in events] == [False] * (len(events) - 1) + [True]
    assert all(t for t, f in events if not f)  # no empty non-final events


def test_streamed_deltas_without_stop_add_up(tiny_model, tokenizer, prompts):
    events: list[tuple[str, bool]] = []
    engine = Engine(tiny_model, tokenizer)
    seq = engine.submit(prompts[3], greedy(12), lambda s, t, f: events.append((t, f)))
    while engine.step():
        pass
    assert "".join(t for t, _ in events) == seq.text == tokenizer.decode(seq.output_ids)
    assert any(ord(c) > 0x2E80 for c in seq.text)  # CJK text: characters span several tokens here
    shown = ""
    for text, _ in events:  # nothing shown mid-stream (a half character, say) is changed later
        shown += text
        assert seq.text.startswith(shown)


# ----- max_model_len ------------------------------------------------------------------------------


def test_overlapped_steps_equal_synchronous_ones(tiny_model, tokenizer, prompts, refs):
    """Decoding one step ahead of the host (the CUDA default) changes nothing a request sees: lengths,
    stop tokens and strings, seeded sampling with logprobs, the context limit, admissions into a full
    batch, and a penalised request whose steps must run synchronously, all as without overlap."""
    stop_token = refs[1][3]
    stop_text = "".join(tokenizer.decode(refs[2][:5])[-2:])
    work = [
        (prompts[0], greedy(MAX_NEW[0])),
        (prompts[1], greedy(N, stop_token_ids=[stop_token])),
        (prompts[5], greedy(3, repetition_penalty=1.3)),
        (prompts[2], greedy(N, stop=[stop_text])),
        (prompts[3], sampled(5, 9, logprobs=2)),
        ((prompts[2] + prompts[1])[:20], greedy(100)),  # stops at max_model_len
        (prompts[4], greedy(MAX_NEW[4])),
    ]

    def run(overlap: bool, batch: int) -> tuple[list[tuple], int]:
        engine = Engine(tiny_model, tokenizer, max_batch_size=batch, max_model_len=24, overlap=overlap)
        seqs = [engine.submit(p, params) for p, params in work]
        ahead = 0
        while engine.step():
            ahead += engine._launched is not None
        return [(s.output_ids, s.text, s.finish_reason, s.logprobs) for s in seqs], ahead

    for batch in (2, 8):
        expected, ahead = run(False, batch)
        assert ahead == 0
        got, ahead = run(True, batch)
        assert ahead > 0  # steps really ran ahead of the host
        # A finished request decodes one step more, so batches differ and logprobs may round differently.
        assert [g[:3] for g in got] == [e[:3] for e in expected]
        for g, e in zip(got, expected, strict=True):
            ids = [[(t, [a for a, _ in alts]) for t, _, alts in seq[3]] for seq in (g, e)]
            values = [[v for _, lp, alts in seq[3] for v in [lp, *(x for _, x in alts)]] for seq in (g, e)]
            assert ids[0] == ids[1] and values[0] == pytest.approx(values[1], abs=1e-4)
    assert expected[0][0] == refs[0][: MAX_NEW[0]] and expected[6][0] == refs[4][: MAX_NEW[4]]
    assert expected[1][2] == "stop" and expected[1][0] == refs[1][:3]
    assert expected[3][2] == "stop" and expected[5][2] == "length" and len(expected[5][0]) == 4


def test_max_model_len(tiny_model, tokenizer, prompts):
    engine = Engine(tiny_model, tokenizer, max_model_len=24)
    long_prompt = (prompts[2] + prompts[1])[:30]
    for bad in (long_prompt[:24], long_prompt):
        with pytest.raises(ValueError, match=r"max_model_len") as info:
            engine.submit(bad, greedy(4))
        assert str(len(bad)) in str(info.value) and "24" in str(info.value)
    with pytest.raises(ValueError):
        engine.submit([], greedy(4))
    prompt = long_prompt[:20]
    capped = engine.submit(prompt, greedy(100))
    short = engine.submit(prompts[0], greedy(3))
    drain(engine)
    assert capped.finish_reason == "length" and len(capped.output_ids) == 4  # 20 + 4 = max_model_len
    assert capped.output_ids == reference(tiny_model, prompt, 4)
    assert short.finish_reason == "length" and len(short.output_ids) == 3


# ----- sampling -----------------------------------------------------------------------------------


def sampled(seed: int | None, n: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, do_sample=True, seed=seed, **{"temperature": 1.0, **kw})


def test_seeded_sampling_independent_of_batch(tiny_model, tokenizer, prompts, refs):
    alone = Engine(tiny_model, tokenizer).generate([prompts[1]], sampled(7))[0].output_ids
    assert len(alone) == 12
    # In a batch, in another slot, next to greedy, unseeded and other-seeded requests.
    engine = Engine(tiny_model, tokenizer, max_batch_size=8)
    seqs = engine.generate(
        [prompts[0], prompts[2], prompts[1], prompts[1], prompts[1]],
        [greedy(), sampled(None), sampled(7), sampled(8), sampled(7, top_p=1.0, top_k=0)],
    )
    assert seqs[2].output_ids == alone and seqs[4].output_ids == alone
    assert seqs[3].output_ids != alone  # another seed, another text
    assert seqs[0].output_ids == refs[0]  # the greedy row is not disturbed by sampled ones
    # Joining a running batch mid-way and moving slots when batch mates leave does not matter either.
    engine = Engine(tiny_model, tokenizer, max_batch_size=2)
    seqs = [engine.submit(prompts[0], greedy(3)), engine.submit(prompts[4], greedy(8)),
            engine.submit(prompts[1], sampled(7))]
    drain(engine)
    assert seqs[2].output_ids == alone
    assert seqs[1].output_ids == refs[4][:8]


def test_different_seeds_differ(tiny_model, tokenizer, prompts):
    engine = Engine(tiny_model, tokenizer)
    outs = [s.output_ids for s in engine.generate([prompts[1]] * 3, [sampled(1, 24), sampled(2, 24), sampled(1, 24)])]
    assert outs[0] != outs[1]
    assert outs[0] == outs[2]


@pytest.mark.parametrize(
    "params",
    [
        sampled(3, N, top_k=1),
        sampled(3, N, top_p=1e-6),
        sampled(3, N, top_k=1, temperature=2.0),
        SamplingParams(max_new_tokens=N, do_sample=True, temperature=0.0, seed=3),
        SamplingParams(max_new_tokens=N, do_sample=True, temperature=0.0),
    ],
    ids=["top_k_1", "tiny_top_p", "top_k_1_hot", "temperature_0", "temperature_0_unseeded"],
)
def test_degenerate_sampling_is_greedy(tiny_model, tokenizer, prompts, refs, params):
    engine = Engine(tiny_model, tokenizer)
    seqs = engine.generate(prompts[:3], params)
    assert [s.output_ids for s in seqs] == refs[:3]


def test_top_k_sampling_picks_among_top_k(tiny_model, tokenizer, prompts):
    engine = Engine(tiny_model, tokenizer)
    seq = engine.generate([prompts[1]], sampled(5, 16, top_k=3, logprobs=3))[0]
    assert len(seq.logprobs) == 16
    ranks = []
    for tok, _, alts in seq.logprobs:
        top3 = [t for t, _ in alts]
        assert tok in top3
        ranks.append(top3.index(tok))
    assert len(set(ranks)) > 1  # it really samples (not always the top token)


@pytest.mark.parametrize(
    "bad",
    [
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"temperature": -1.0},
        {"max_new_tokens": 0},
        {"top_k": -1},
        {"repetition_penalty": 0.0},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3.0},
        {"logprobs": 21},
    ],
)
def test_invalid_params_raise_on_submit(tiny_model, tokenizer, prompts, bad):
    engine = Engine(tiny_model, tokenizer)
    with pytest.raises(ValueError, match=next(iter(bad)).replace("logprobs", "top_logprobs")):
        engine.submit(prompts[0], SamplingParams(**bad))
    assert not engine.waiting


# ----- presence / frequency penalties -------------------------------------------------------------


def penalized_reference(model, ids: list[int], n: int, presence: float, frequency: float) -> list[int]:
    """OpenAI-style penalties by hand: logit -= presence * [count > 0] + frequency * count."""
    out: list[int] = []
    counts: Counter[int] = Counter()
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out]), use_cache=False).logits[0, -1].float()
            for tok, c in counts.items():
                logits[tok] -= presence + frequency * c
            out.append(int(logits.argmax()))
            counts[out[-1]] += 1
    return out


def test_presence_and_frequency_penalties(tiny_model, tokenizer, prompts, refs):
    prompt = prompts[4]
    n = 16
    plain = reference(tiny_model, prompt, n)
    assert len(set(plain)) < n  # the tiny model repeats itself here, so penalties have work to do
    # max_batch_size=2 with a short batch mate: the penalised request moves to slot 0 mid-run.
    engine = Engine(tiny_model, tokenizer, max_batch_size=2)
    mate = engine.submit(prompts[1], greedy(2))
    presence = engine.submit(prompt, greedy(n, presence_penalty=0.5))
    frequency = engine.submit(prompt, greedy(n, frequency_penalty=0.3, presence_penalty=0.1))
    drain(engine)
    assert mate.output_ids == refs[1][:2]
    assert presence.output_ids != plain and frequency.output_ids != plain
    assert presence.output_ids == penalized_reference(tiny_model, prompt, n, 0.5, 0.0)
    assert frequency.output_ids == penalized_reference(tiny_model, prompt, n, 0.1, 0.3)
    strong = Engine(tiny_model, tokenizer).generate([prompt], greedy(24, frequency_penalty=2.0))[0]
    assert len(strong.output_ids) == 24 and len(set(strong.output_ids)) == 24  # nothing repeated


# ----- logprobs -----------------------------------------------------------------------------------


def test_logprobs_match_model_generate_scores(tiny_model, tokenizer, prompts):
    prompt, n = prompts[5], 6
    out = tiny_model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=n,
        do_sample=False, top_p=None, top_k=None, eos_token_id=None, pad_token_id=0, repetition_penalty=1.0,
        output_scores=True, return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt):].tolist()
    engine = Engine(tiny_model, tokenizer)
    seqs = engine.generate([prompt, prompts[1], prompt], [greedy(n, logprobs=3), greedy(n), greedy(n, logprobs=0)])
    seq = seqs[0]
    assert seq.output_ids == tokens
    assert len(seq.logprobs) == n
    assert seqs[1].logprobs == []  # not asked for
    assert [(t, alts) for t, _, alts in seqs[2].logprobs] == [(t, []) for t in tokens]
    for step, (tok, lp, alts) in enumerate(seq.logprobs):
        expected = torch.log_softmax(out.scores[step][0].double(), dim=-1)
        assert tok == tokens[step]
        assert len(alts) == 3
        assert alts[0][0] == tok and lp == pytest.approx(max(v for _, v in alts), abs=1e-6)
        assert lp == pytest.approx(expected[tok].item(), abs=1e-4)
        top = expected.topk(3)
        assert [t for t, _ in alts] == top.indices.tolist()
        assert [v for _, v in alts] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert seqs[2].logprobs[step][1] == pytest.approx(lp, abs=1e-5)


def test_prompt_logprobs_score_the_prompt_in_chunks_beside_other_requests(tiny_model, tokenizer, prompts):
    """Prompt scoring (the server's echo) in the engine: each prompt token's logprob and top alternatives equal the
    model's own forward over the whole prompt, prefilled in chunks beside a generating request; the prefix cache
    is not asked (a prompt it already holds is scored in full); max_new_tokens 0 only scores, and a scored prompt
    can generate too."""
    prompt = [t for p in prompts for t in p][:45]  # several 16-token chunks, the last one partial
    with torch.no_grad():
        expected = torch.log_softmax(tiny_model(torch.tensor([prompt]), use_cache=False).logits[0].double(), -1)
    engine = Engine(tiny_model, tokenizer, max_batch_size=3, prefill_chunk=16)
    score = SamplingParams(max_new_tokens=0, prompt_logprobs=2)
    for _ in range(2):  # the second time, the prefix cache holds the prompt
        scored, other, both = engine.generate([prompt, prompts[1], prompt], [
            score, greedy(5), SamplingParams(max_new_tokens=3, do_sample=False, prompt_logprobs=0)])
        assert scored.finish_reason == "length" and scored.output_ids == [] and scored.cached_tokens == 0
        assert len(scored.prompt_logprobs) == len(prompt) and scored.prompt_logprobs[0] == (None, [])
        for i, (lp, alts) in enumerate(scored.prompt_logprobs[1:], start=1):
            assert lp == pytest.approx(expected[i - 1, prompt[i]].item(), abs=1e-4)
            top = expected[i - 1].topk(2)
            assert [t for t, _ in alts] == top.indices.tolist()
            assert [v for _, v in alts] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [lp for lp, _ in both.prompt_logprobs] == pytest.approx([lp for lp, _ in scored.prompt_logprobs])
        assert both.output_ids == reference(tiny_model, prompt, 3) and other.prompt_logprobs == []
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        engine.submit(prompt, SamplingParams(max_new_tokens=0))


def test_sampled_logprobs_use_the_temperature(tiny_model, tokenizer, prompts):
    prompt, t = prompts[1], 0.7
    seq = Engine(tiny_model, tokenizer).generate([prompt], sampled(11, 6, temperature=t, logprobs=2))[0]
    with torch.no_grad():
        logits = tiny_model(torch.tensor([prompt + seq.output_ids]), use_cache=False).logits[0].double()
    expected = torch.log_softmax(logits[len(prompt) - 1 : -1] / t, dim=-1)
    for step, (tok, lp, alts) in enumerate(seq.logprobs):
        assert lp == pytest.approx(expected[step, tok].item(), abs=1e-4)
        assert [a for a, _ in alts] == expected[step].topk(2).indices.tolist()


# ----- background thread, cancel, async stream ----------------------------------------------------


def test_background_thread_concurrent_submits(started, prompts, refs):
    with pytest.raises(RuntimeError):
        started.generate([prompts[0]], greedy(2))
    done = [threading.Event() for _ in prompts]
    seqs: list[Sequence | None] = [None] * len(prompts)
    texts: list[list[str]] = [[] for _ in prompts]
    barrier = threading.Barrier(3)

    def client(indices: list[int]) -> None:
        barrier.wait()
        for i in indices:
            def on_event(seq, text, finished, i=i):
                texts[i].append(text)
                if finished:
                    done[i].set()

            seqs[i] = started.submit(prompts[i], greedy(MAX_NEW[i]), on_event)

    threads = [threading.Thread(target=client, args=([k, k + 3],)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert all(e.wait(60) for e in done), [s.finish_reason if s else None for s in seqs]
    for i, seq in enumerate(seqs):
        assert seq.output_ids == refs[i][: MAX_NEW[i]] and seq.finish_reason == "length"
        assert "".join(texts[i]) == seq.text
    assert wait_until(lambda: not started.running and not started.waiting)


def test_cancel_frees_the_slot(started, prompts, refs):
    first_event, finished = threading.Event(), threading.Event()

    def on_event(seq, text, done):
        first_event.set()
        if done:
            finished.set()

    long = started.submit(prompts[1], greedy(200), on_event)
    assert first_event.wait(30)
    started.cancel(long)
    assert finished.wait(10)
    assert long.finish_reason == "cancelled"
    assert 0 < len(long.output_ids) < 200
    assert wait_until(lambda: not started.running, timeout=5)
    after = len(long.output_ids)
    done = threading.Event()
    new = started.submit(prompts[0], greedy(5), lambda s, t, f: f and done.set())
    assert done.wait(30)
    assert new.finish_reason == "length" and new.output_ids == refs[0][:5]
    assert len(long.output_ids) == after  # the cancelled request got no more tokens


def test_cancel_waiting_request(tiny_model, tokenizer, prompts, refs):
    engine = Engine(tiny_model, tokenizer, max_batch_size=1)
    events = []
    running = engine.submit(prompts[0], greedy(4))
    queued = engine.submit(prompts[1], greedy(4), lambda s, t, f: events.append((t, f)))
    engine.step()
    assert engine.running == [running] and list(engine.waiting) == [queued]
    engine.cancel(queued)
    drain(engine)
    assert queued.finish_reason == "cancelled" and queued.output_ids == [] and events == [("", True)]
    assert running.output_ids == refs[0][:4] and running.finish_reason == "length"


def test_async_stream(started, tokenizer, prompts, refs):
    async def collect():
        pieces, last = [], None
        async for seq, text in started.stream(prompts[3], greedy(8)):
            pieces.append(text)
            last = seq
        return pieces, last

    pieces, seq = asyncio.run(collect())
    assert seq.done and seq.finish_reason == "length"
    assert "".join(pieces) == seq.text == tokenizer.decode(refs[3][:8])
    assert seq.output_ids == refs[3][:8]

    async def leave_early():
        async for item in started.stream(prompts[1], greedy(200)):
            seq = item[0]
            break
        for _ in range(500):  # the abandoned generator is closed by the loop, which cancels
            if seq.done:
                break
            await asyncio.sleep(0.01)
        return seq

    seq = asyncio.run(leave_early())
    assert seq.cancelled and seq.finish_reason == "cancelled" and len(seq.output_ids) < 200
    assert wait_until(lambda: not started.running, timeout=5)


def test_stream_many(started, prompts, refs):
    requests = [(prompts[0], greedy(3)), (prompts[4], greedy(200))]

    async def run():
        events = []
        async for index, seq, text, finished in started.stream_many(requests):
            events.append((index, seq, text, finished))
            if index == 0 and finished:
                break  # the long request is still running
        long = next(s for i, s, _, _ in events if i == 1)
        for _ in range(500):  # the loop closes the abandoned iterator, which cancels the long request
            if long.done:
                break
            await asyncio.sleep(0.01)
        return events

    events = asyncio.run(run())
    seqs = {i: s for i, s, _, _ in events}
    assert seqs[0].output_ids == refs[0][:3] and seqs[0].finish_reason == "length"
    assert seqs[1].finish_reason == "cancelled" and len(seqs[1].output_ids) < 200
    assert "".join(t for i, _, t, _ in events if i == 0) == seqs[0].text


def _wait_done_or_engine_dead(engine: Engine, seqs: list[Sequence], timeout: float = 30.0) -> None:
    thread = engine._thread
    wait_until(lambda: all(s.done for s in seqs) or not thread.is_alive(), timeout)
    assert thread.is_alive(), "the engine thread died"


def test_raising_on_event_fails_only_its_own_request(started, prompts, refs):
    """A callback that raises must not take down its batch mates or the engine thread.

    BUG (qwen/engine.py): the exception propagates out of step(); _loop's handler then fails every
    running request and calls the same callback again from _finish, which raises once more and kills
    the engine thread, so every later request hangs forever.
    """
    def explode(seq, text, finished):
        raise KeyError("client went away")

    bad = started.submit(prompts[1], greedy(8), explode)
    good = started.submit(prompts[5], greedy(8))
    _wait_done_or_engine_dead(started, [bad, good])
    assert good.finish_reason == "length" and good.output_ids == refs[5][:8]
    assert bad.done and bad.finish_reason != "length"
    later = started.submit(prompts[0], greedy(3))
    _wait_done_or_engine_dead(started, [later])
    assert later.output_ids == refs[0][:3]


def test_stream_on_a_closed_event_loop_does_not_break_the_engine(started, prompts, refs):
    """A stream left early whose event loop then closes (``asyncio.run`` returning) must not fail the
    other requests: the engine may still emit one more event for the just-cancelled sequence.

    BUG (qwen/engine.py): that event's ``loop.call_soon_threadsafe`` raises "Event loop is closed"
    inside step(), which fails every running request and then kills the engine thread (see above).
    """
    other = started.submit(prompts[5], greedy(N))

    async def leave():
        async for _item in started.stream(prompts[1], greedy(200)):
            break

    asyncio.run(leave())
    _wait_done_or_engine_dead(started, [other])
    assert other.finish_reason == "length" and other.output_ids == refs[5]


def test_submit_rejects_token_ids_outside_the_vocabulary(tiny_model, tokenizer, prompts, refs):
    """BUG (qwen/engine.py): submit() accepts ids outside [0, vocab_size); the prefill then raises an
    IndexError (a device-side assert on CUDA) that fails every request of the step, not only this one."""
    engine = Engine(tiny_model, tokenizer)
    vocab = tiny_model.config.vocab_size
    for bad in ([vocab], [5, -1], [1, 2, vocab + 100]):
        with pytest.raises(ValueError, match="token"):
            engine.submit(bad, greedy(3))
        engine.waiting.clear()  # keep the engine usable for the next check even while the bug exists
    assert engine.generate([prompts[0]], greedy(3))[0].output_ids == refs[0][:3]


# ----- int8 weights -------------------------------------------------------------------------------


def test_int8_weights(tiny_chat, tokenizer, prompts):
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_chat, dtype=torch.bfloat16).eval()
    int8 = quantize_int8_(copy.deepcopy(bf16))
    linears = [m for m in int8.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 2 * 5 + 1 and int8.lm_head in linears
    assert all(m.weight.dtype == torch.int8 for m in linears)
    ids = torch.tensor([prompts[2] + prompts[1] + prompts[5]])
    with torch.no_grad():
        ref = bf16(ids).logits[0].float()
        got = int8(ids).logits[0].float()
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree
    assert torch.nn.functional.cosine_similarity(ref, got, dim=-1).min() > 0.99
    engine = Engine(int8, tokenizer)
    seqs = engine.generate([prompts[1], prompts[5]], greedy(6))
    for seq in seqs:
        assert seq.finish_reason == "length" and len(seq.output_ids) == 6
    with torch.no_grad():  # its first token is the argmax of the int8 model's own last logits
        first = int8(torch.tensor([prompts[5]])).logits[0, -1].argmax().item()
    assert seqs[1].output_ids[0] == first


# ----- the slot cache grows -----------------------------------------------------------------------


def test_slot_cache_grows_past_initial_capacity(tiny_model, tokenizer, prompts, refs):
    long_ids = tokenizer.encode(" ".join(f"word{i}" for i in range(200)))
    p300, p250 = long_ids[:300], long_ids[-250:]
    assert len(p300) == 300 and len(p250) == 250
    engine = Engine(tiny_model, tokenizer, max_batch_size=4, max_model_len=1024)
    assert engine.cache.capacity == 256
    initial_bytes = engine.cache.nbytes()
    short = engine.submit(prompts[1], greedy(10))
    crossing = engine.submit(p250, greedy(10))  # crosses 256 while decoding
    engine.step()
    assert engine.cache.capacity == 256
    grown = engine.submit(p300, greedy(10))  # joins mid-run and needs a bigger cache at prefill
    drain(engine)
    assert engine.cache.capacity == 512
    assert engine.cache.nbytes() == 2 * initial_bytes  # the tensors really doubled
    assert short.output_ids == refs[1]
    assert crossing.output_ids == reference(tiny_model, p250, 10)
    assert grown.output_ids == reference(tiny_model, p300, 10)


# ----- the compiled decode step ------------------------------------------------------------------


def test_fused_weights_change_nothing(tiny_model, prompts):
    """fuse_weights_ (one matmul for w1 and w2) computes the same logits; quantizing afterwards works,
    fusing quantized layers is refused with the fix."""
    fused = copy.deepcopy(tiny_model).fuse_weights_()
    mlp = fused.transformer.h[0].mlp
    assert not hasattr(mlp, "w1") and mlp.w12.out_features == 2 * tiny_model.transformer.h[0].mlp.w1.out_features
    x = torch.tensor([prompts[1], prompts[2][: len(prompts[1])]])
    with torch.no_grad():
        assert (fused(x).logits - tiny_model(x).logits).abs().max() < 1e-5
        assert isinstance(quantize_int8_(fused).transformer.h[0].mlp.w12, Int8Linear)
    with pytest.raises(ValueError, match="fuse the weights before quantizing"):
        quantize_int8_(copy.deepcopy(tiny_model)).fuse_weights_()


def test_compiled_decode_step_matches_eager_with_few_graphs(tmp_path, tokenizer, prompts):
    """torch.compile'd decode (batch padded to a power of two, attention over a power-of-two number
    of keys) gives the eager engine's tokens, on a sensitive model with a full and a windowed layer,
    and compiles a few graphs in all rather than one per step. It runs as on a GPU: fused MLP weights
    and steps overlapped with the host's work."""
    path = make_tiny_checkpoint(tmp_path, initializer_range=0.3, seed=1)
    model = AutoModelForCausalLM.from_pretrained(path, use_window_attn=True, window_size=[None, 8]).eval()
    long = tokenizer.encode(" ".join(f"word{i}" for i in range(200)))[:250]  # its decode crosses 256 keys
    work, params = [*prompts, long], [greedy(n) for n in MAX_NEW] + [greedy(20)]
    expected = [s.output_ids for s in Engine(model, tokenizer, max_batch_size=4).generate(work, params)]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    engine = Engine(copy.deepcopy(model).fuse_weights_(), tokenizer, max_batch_size=4, compile=True, overlap=True)
    engine.warm_up()
    # Batch 1 or any batch, times the initial or any key length.
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 < graphs <= 4
    seqs = engine.generate(work, params)
    assert [s.output_ids for s in seqs] == expected
    assert engine.cache.capacity == 512
    # 4, 3, 2 and 1 running rows and two key lengths over 40-odd steps compiled nothing more.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


# ----- dynamic NTK and logn -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ntk_model(tmp_path_factory):
    # Larger weights than the default tiny model, whose near-uniform attention hardly notices rotary.
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ntk"), seq_length=16, initializer_range=0.3)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_dynamic_ntk_and_logn_match_model(ntk_model, tokenizer):
    assert ntk_model.config.use_dynamic_ntk and ntk_model.config.use_logn_attn
    ids = tokenizer.encode(" ".join(f"w{i}" for i in range(40)))
    long, short = ids[:20], ids[20:28]
    n = 30
    ref_long, ref_short = reference(ntk_model, long, n), reference(ntk_model, short, n)
    engine = Engine(ntk_model, tokenizer, max_batch_size=3, max_model_len=64)
    assert engine.generate([long], greedy(n))[0].output_ids == ref_long
    # In a batch; the long prompt starts in slot 2 and moves to slot 0 when the first request leaves.
    mate = engine.submit(short[:5], greedy(2))
    seqs = [engine.submit(short, greedy(n)), engine.submit(long, greedy(n))]
    engine.step()
    assert mate.done and [s.slot for s in seqs] == [1, 0]
    assert engine.alpha[:2].tolist() == [3.0, 1.0]  # fixed per row at prefill (20 > 16 tokens, 8 <= 16)
    drain(engine)
    assert seqs[1].output_ids == ref_long
    assert seqs[0].output_ids == ref_short
    # The test is sensitive: without NTK and logn the long prompt continues differently.
    plain = copy.deepcopy(ntk_model)
    plain.config.use_dynamic_ntk = plain.config.use_logn_attn = False
    assert reference(plain, long, n) != ref_long


# ----- Qwen2 mapping ------------------------------------------------------------------------------


def test_to_qwen2_same_logits(tiny_model, tokenizer, prompts, refs):
    qwen2 = to_qwen2(tiny_model)
    ids = torch.tensor([prompts[2] + prompts[5]])
    with torch.no_grad():
        ours = tiny_model(ids).logits
        theirs = qwen2(ids).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    # An independent greedy reference for the engine as well.
    out = qwen2.generate(torch.tensor([prompts[1]]), max_new_tokens=N, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    assert out[0, len(prompts[1]):].tolist() == refs[1]


def test_priority_admits_the_most_urgent_waiting_request_first(tiny_model, tokenizer):
    """One batch slot, four requests waiting: lower priority values run first, equal ones in arrival order."""
    engine = Engine(tiny_model, tokenizer, max_batch_size=1)
    priorities = {"a": 0, "b": 5, "c": -1, "d": 5}
    seqs = {name: engine.submit(tokenizer.encode(f"request {name}"), greedy(3, priority=p))
            for name, p in priorities.items()}
    while engine.step():
        pass
    order = sorted(seqs, key=lambda name: seqs[name].first_token_time)
    assert order == ["c", "a", "b", "d"]
    assert all(len(s.output_ids) == 3 for s in seqs.values())
