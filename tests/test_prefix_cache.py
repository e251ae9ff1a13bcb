"""The engine's prefix cache and chunked prefill, on tiny fp32 models with large weights, where keys that are
reused wrongly or written at the wrong place change the greedy tokens. The reference is the same engine
with neither (no cache, each prompt prefilled in one piece), which the engine tests hold to transformers'
own generate().
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from qwen.engine import Engine
from qwen.prefix_cache import PrefixCache
from qwen.sampling import SamplingParams
from qwen.tiny import make_tiny_checkpoint

BLOCK = PrefixCache(1).block
WHOLE = 10**6  # a prefill chunk no prompt reaches


def greedy(n: int = 6) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, do_sample=False)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(100, 30000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("prefix"), initializer_range=0.3, seed=1)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def plain(model, tokenizer, **kw) -> Engine:
    return Engine(model, tokenizer, max_batch_size=4, prefix_cache_bytes=0, prefill_chunk=WHOLE, **kw)


def outputs(engine: Engine, prompts: list[list[int]], n: int = 6) -> list[list[int]]:
    return [s.output_ids for s in engine.generate(prompts, greedy(n))]


def block_floor(n: int) -> int:
    return n // BLOCK * BLOCK


def common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_shared_prefixes_of_every_length_give_the_same_tokens(model, tokenizer):
    """Each prompt runs after the others left their prompt and reply behind; it reuses the whole blocks it
    shares with one of them (never its own last token), then the same prompts again as one batch."""
    base = ids(100, seed=0)
    prompts = [base[:40], base[:31] + ids(5, 1), base[:32] + ids(3, 2), base[:64] + ids(9, 3), base[:100],
               base[:100], base[:65] + ids(1, 4), base[:33]]
    expected = outputs(plain(model, tokenizer), prompts)
    engine = Engine(model, tokenizer, max_batch_size=4)
    seen: list[list[int]] = []  # what each finished request left in the cache: prompt + reply, bar the last
    for prompt, want in zip(prompts, expected, strict=True):
        (seq,) = engine.generate([prompt], greedy())
        assert seq.output_ids == want
        shared = max((common(prompt, s) for s in seen), default=0)
        assert seq.cached_tokens == block_floor(min(shared, len(prompt) - 1)), (len(prompt), shared)
        seen.append(prompt + seq.output_ids[:-1])
    assert engine.prefix_cache.stats.hits == sum(block_floor(min(max((common(p, s) for s in seen[:i]), default=0),
                                                                  len(p) - 1)) > 0 for i, p in enumerate(prompts))
    assert outputs(engine, prompts) == expected  # batched, every one found in the cache


def test_copies_of_one_prompt_are_prefilled_once(model, tokenizer):
    """n > 1 (or one long tools prompt before several questions): requests admitted together that share at
    least half of their prompt wait for the first one's keys instead of computing them again."""
    tools = ids(80, seed=30)
    prompts = [tools + ids(6, seed=31)] * 3 + [tools + ids(5, seed=32), ids(20, seed=33) + tools[:40]]
    expected = outputs(plain(model, tokenizer), prompts)
    engine = Engine(model, tokenizer, max_batch_size=8)
    seqs = engine.generate(prompts, greedy())
    assert [s.output_ids for s in seqs] == expected
    assert [s.cached_tokens for s in seqs] == [0, 64, 64, 64, 0]


def test_the_engine_thread_runs_prefills_that_leave_nothing_running(model, tokenizer):
    """In its own thread (the server's, the eval runners') the engine keeps stepping while prompts are only
    being prefilled: a chunk at a time, or one waiting for the other's keys, with nothing decoding yet."""
    import threading

    prompt = ids(80, seed=40)
    expected = outputs(plain(model, tokenizer), [prompt])[0]
    engine = Engine(model, tokenizer, max_batch_size=2, prefill_chunk=16).start()
    try:
        done = [threading.Event(), threading.Event()]
        seqs = [engine.submit(prompt, greedy(), lambda _s, _t, last, i=i: last and done[i].set()) for i in (0, 1)]
        assert all(event.wait(60) for event in done), [s.computed for s in seqs]
    finally:
        engine.stop()
    assert [s.output_ids for s in seqs] == [expected, expected] and seqs[1].cached_tokens == 64


def test_a_chat_turn_prefills_only_the_new_message(model, tokenizer):
    from qwen.chat import make_context

    engine, reference = Engine(model, tokenizer, max_batch_size=2), plain(model, tokenizer)
    history: list[tuple[str, str]] = []
    for turn, query in enumerate(["first question " * 12, "a follow-up " * 10, "and one more " * 9]):
        _, prompt = make_context(tokenizer, query, history, system="You are a helpful assistant.")
        (seq,) = engine.generate([prompt], greedy(8))
        assert seq.output_ids == outputs(reference, [prompt], 8)[0]
        if turn:
            _, before = make_context(tokenizer, history[-1][0], history[:-1], system="You are a helpful assistant.")
            assert seq.cached_tokens >= block_floor(len(before))  # the history, up to its last whole block
        history.append((query, tokenizer.decode(seq.output_ids)))


def test_chunked_prefill_gives_the_same_tokens_and_running_streams_keep_decoding(model, tokenizer):
    prompts = [ids(n, seed=n) for n in (5, 23, 70, 150)]
    expected = outputs(plain(model, tokenizer), prompts, 8)
    assert outputs(Engine(model, tokenizer, max_batch_size=4, prefill_chunk=7, prefix_cache_bytes=0), prompts,
                   8) == expected

    engine = Engine(model, tokenizer, max_batch_size=4, prefill_chunk=16, prefix_cache_bytes=0)
    short = engine.submit(prompts[0], greedy(40))
    engine.step()
    long = engine.submit(prompts[3], greedy(8))
    produced = [len(short.output_ids)]
    while not long.output_ids:
        engine.step()
        produced.append(len(short.output_ids))
    # 150 tokens in chunks of 16 take 10 steps, and every one of them decoded the short stream a token.
    assert len(produced) == 11 and produced == list(range(produced[0], produced[0] + 11))
    while engine.step():
        pass
    assert long.output_ids == expected[3]


def test_eviction_keeps_the_cache_in_its_budget_and_the_tokens_right(model, tokenizer):
    config = model.config
    block_bytes = 2 * config.num_hidden_layers * config.hidden_size * BLOCK * 4  # fp32 keys and values
    engine = Engine(model, tokenizer, max_batch_size=2, prefix_cache_bytes=3 * block_bytes)
    prompts = [ids(70, seed=s) for s in range(5)] + [ids(70, seed=0)]
    expected = outputs(plain(model, tokenizer), prompts)
    got = [engine.generate([p], greedy())[0] for p in prompts]
    assert [s.output_ids for s in got] == expected
    stats = engine.prefix_cache.stats
    assert stats.evictions > 0 and 0 < stats.bytes <= 3 * block_bytes
    assert got[-1].cached_tokens == 0  # the first prompt's blocks were evicted long ago


def test_a_cancelled_prefill_leaves_its_computed_blocks_and_others_go_on(model, tokenizer):
    long, other = ids(100, seed=7), ids(12, seed=8)
    expected = outputs(plain(model, tokenizer), [long, other], 10)
    engine = Engine(model, tokenizer, max_batch_size=2, prefill_chunk=16)
    running = engine.submit(other, greedy(10))
    doomed = engine.submit(long, greedy(10))
    for _ in range(4):  # chunks of 16, the first shared with the other prompt's 12: 52 of its 100 tokens
        engine.step()
    assert doomed.computed == 4 + 3 * 16 and not doomed.output_ids
    engine.cancel(doomed)
    again = engine.submit(long, greedy(10))
    while engine.step():
        pass
    assert doomed.finish_reason == "cancelled"
    assert running.output_ids == expected[1] and again.output_ids == expected[0]
    assert again.cached_tokens == 32  # the whole blocks of the 52 computed tokens


def test_keys_rotated_with_another_ntk_alpha_are_not_reused(tokenizer, tmp_path):
    """Dynamic NTK fixes alpha from the prompt's length: 40 tokens over a seq_length of 16 rotate with alpha
    7, 70 tokens with 15; their shared 40 tokens are not shared keys."""
    path = make_tiny_checkpoint(tmp_path, seq_length=16, initializer_range=0.3)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    first = ids(40, seed=9)
    longer, same_alpha = first + ids(30, seed=10), first + ids(10, seed=11)
    expected = outputs(plain(model, tokenizer, max_model_len=128), [first, longer, same_alpha])
    engine = Engine(model, tokenizer, max_batch_size=2, max_model_len=128)
    got = [engine.generate([p], greedy())[0] for p in (first, longer, same_alpha)]
    assert [s.output_ids for s in got] == expected
    assert [s.alpha for s in got] == [7.0, 15.0, 7.0]
    assert [s.cached_tokens for s in got] == [0, 0, 32]


def test_int8_kv_and_window_models_use_neither(tiny_chat, tokenizer):
    for overrides in ({"use_cache_quantization": True}, {"use_window_attn": True, "window_size": [None, 8]}):
        model = AutoModelForCausalLM.from_pretrained(tiny_chat, **overrides).eval()
        engine = Engine(model, tokenizer)
        assert engine.prefix_cache is None and engine.prefill_chunk is None


def test_compiled_decode_pads_over_a_prompt_being_prefilled(model, tokenizer):
    """With torch.compile the decode batch is padded to a power of two; a padding row may land on the slot
    of a prompt still being prefilled, and must not disturb its keys."""
    prompts = [ids(n, seed=20 + n) for n in (6, 9, 11, 90)]
    expected = outputs(plain(model, tokenizer), prompts, 12)
    engine = Engine(model, tokenizer, max_batch_size=4, compile=True, prefill_chunk=8)
    seqs = [engine.submit(p, greedy(12)) for p in prompts[:3]]
    engine.step()
    seqs.append(engine.submit(prompts[3], greedy(12)))  # 12 chunks while 3 rows decode, padded to 4
    while engine.step():
        pass
    assert [s.output_ids for s in seqs] == expected


def test_the_cache_drops_least_recently_used_leaves_and_never_a_parent():
    cache = PrefixCache(budget=10**9, block=2)
    kv = lambda start, end: [(torch.zeros(1, end - start, 1), torch.zeros(1, end - start, 1))]  # noqa: E731
    cache.store([1, 2, 3, 4], b"", kv)  # root: blocks [1 2] [3 4]
    cache.store([1, 2, 3, 4, 5, 6], b"", kv)  # child: [5 6]
    cache.store([1, 2, 7, 8], b"", kv)  # another child of the root, sharing only [1 2]
    assert cache.stats.entries == 3 and cache.stats.tokens == 8
    assert cache.lookup([1, 2, 3, 4, 5, 6, 9], b"", limit=7)[0] == 6
    assert cache.lookup([1, 2, 7, 8, 9], b"", limit=5)[0] == 4
    assert cache.lookup([1, 2, 3, 4], b"other salt", limit=4)[0] == 0
    cache.budget = 8 * 8  # 8 bytes a token (float32 keys and values): the 8 held, not the 2 to come
    cache.store([9, 9], b"", kv)  # one entry must go: the least recently used leaf, [5 6]
    assert cache.stats.bytes == cache.budget and cache.stats.evictions == 1
    assert cache.lookup([9, 9, 1], b"", limit=3)[0] == 2
    assert cache.lookup([1, 2, 7, 8, 9], b"", limit=5)[0] == 4
    assert cache.lookup([1, 2, 3, 4, 5, 6, 9], b"", limit=7)[0] == 4  # [5 6] gone, its parent kept
    cache.budget = 2 * 8
    cache.store([9, 9, 3, 3], b"", kv)  # a child of [9 9]: [7 8] goes, then its parent, freed, then the child
    assert cache.stats.evictions == 4 and cache.stats.bytes == cache.budget  # never over the budget
    assert cache.lookup([9, 9, 3, 3, 0], b"", limit=5)[0] == 2


def test_the_server_reports_cached_tokens_and_the_cache_in_health(api_server):
    import httpx
    import openai

    client = openai.OpenAI(base_url=f"{api_server.url}/v1", api_key="none")
    messages = [{"role": "system", "content": "Answer in the style of a patient teacher. " * 8},
                {"role": "user", "content": "What is a prefix cache?"}]
    first, second = (client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
                     for _ in range(2))
    assert first.choices[0].message.content == second.choices[0].message.content
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == block_floor(second.usage.prompt_tokens - 1) > 0
    health = httpx.get(f"{api_server.url}/health").json()["prefix_cache"]
    assert health["hits"] >= 1 and health["tokens_reused"] >= cached and 0 < health["bytes"] <= health["budget_bytes"]
