"""Encode throughput of QWenTokenizer against raw tiktoken on a mixed Chinese/English/code corpus.

    python bench/tokenizer.py [--mb 3] [--repeats 5]

The corpus is generated deterministically here (shuffled paragraphs of English prose, Chinese prose
and Python code). Three encoders are timed on the same text in the same run, best of N with
time.perf_counter (``--clock cpu``: time.thread_time, for a busy machine), and reported in MB/s of UTF-8 input:

* raw tiktoken: ``tok.tokenizer.encode(text, allowed_special="all")`` (the wrapper's own Encoding);
* ``tok.encode(text)``: the wrapper (NFC normalisation plus transformers' encode path);
* ``tok(text)``: the BatchEncoding path (``__call__``), per text and as one batch call.

Workloads: the whole corpus as one string, 64 KB chunks, and ~100-character short texts. Every
wrapper output is checked to equal raw tiktoken's ids. Overhead is the extra time over raw tiktoken
on the same workload (``t_wrapper / t_raw - 1``).
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
import unicodedata
from collections.abc import Callable

from transformers.utils import logging as hf_logging

from qwen.tokenizer import QWenTokenizer

ENGLISH_WORDS = (
    "the of and to in is was that for on with as by at from his her they this which be have are not but "
    "were had one all their there been has when who will more would into time only some could new than "
    "model language training data tokenizer attention layer network inference memory throughput batch "
    "people history government between during without although however because several important system "
    "research university science development experiment result analysis performance evaluation context"
).split()
CHINESE_SENTENCES = (
    "通义千问是阿里云研发的大规模语言模型。",
    "它能够理解和生成自然语言文本，并回答各种问题。",
    "在训练过程中，模型学习了大量的中文和英文语料。",
    "今天天气很好，我们一起去公园散步吧。",
    "人工智能技术正在改变我们的生活和工作方式。",
    "这个分词器使用字节级别的编码方法，可以处理任意文本。",
    "北京是中国的首都，有着悠久的历史和灿烂的文化。",
    "请把这段代码改写成更高效的版本，并解释原因。",
    "长文本的处理速度对于推理服务的延迟非常重要。",
    "数据集包含了新闻、百科、小说和技术文档等多种类型。",
    "我们在多个基准测试上评估了模型的表现。",
    "如果你有任何问题，欢迎随时联系我们的团队。",
)
CODE_TEMPLATE = '''def {name}({arg}: list[int], limit: int = {n}) -> dict[str, int]:
    """Count the {word} items below ``limit``."""
    result: dict[str, int] = {{}}
    for index, value in enumerate({arg}):
        if value < limit and index % {m} == 0:
            key = f"{word}_{{index}}"
            result[key] = result.get(key, 0) + value * {n}
    return result


class {cls}:
    def __init__(self, size: int = {n}) -> None:
        self.size = size
        self.items = [{name}(list(range(i)), size) for i in range(size)]
'''
NAMES = ["count", "collect", "encode", "merge", "split", "scan", "tally", "reduce", "filter_rows"]
CLASSES = ["Buffer", "Cache", "Batcher", "Worker", "Loader", "Planner"]


def english_paragraph(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 7)):
        words = [rng.choice(ENGLISH_WORDS) for _ in range(rng.randint(8, 22))]
        words[0] = words[0].capitalize()
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(1, 2024)))
        sentences.append(" ".join(words) + rng.choice([".", ".", "!", "?", ";"]))
    return " ".join(sentences)


def chinese_paragraph(rng: random.Random) -> str:
    return "".join(rng.choice(CHINESE_SENTENCES) for _ in range(rng.randint(3, 8)))


def code_paragraph(rng: random.Random) -> str:
    return CODE_TEMPLATE.format(
        name=rng.choice(NAMES),
        arg=rng.choice(["values", "xs", "data", "numbers"]),
        n=rng.randint(2, 999),
        m=rng.randint(2, 9),
        word=rng.choice(ENGLISH_WORDS),
        cls=rng.choice(CLASSES),
    )


def make_corpus(megabytes: float, seed: int = 0) -> str:
    """About ``megabytes`` MB of UTF-8: a third each (by paragraph count) prose, Chinese and code."""
    rng = random.Random(seed)
    makers = (english_paragraph, chinese_paragraph, code_paragraph)
    target = int(megabytes * 1e6)
    paragraphs, size = [], 0
    while size < target:
        p = makers[len(paragraphs) % 3](rng)
        paragraphs.append(p)
        size += len(p.encode("utf-8")) + 2
    rng.shuffle(paragraphs)
    return unicodedata.normalize("NFC", "\n\n".join(paragraphs))


def chunks(text: str, nbytes: int) -> list[str]:
    """Split ``text`` into pieces of about ``nbytes`` UTF-8 bytes (at character boundaries)."""
    out, start = [], 0
    while start < len(text):
        end = start + nbytes
        while end < len(text) and len(text[start:end].encode("utf-8")) > nbytes:
            end -= max(1, (len(text[start:end].encode("utf-8")) - nbytes) // 3)
        out.append(text[start:end])
        start = end
    return out


def best_of(
    fns: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, tuple[float, object]]:
    """Best-of-``repeats`` time of each function, interleaved so drift hits them all alike."""
    best: dict[str, tuple[float, object]] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            result = fn()
            elapsed = clock() - t0
            if name not in best or elapsed < best[name][0]:
                best[name] = (elapsed, result)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=3.0, help="corpus size in MB of UTF-8 (default 3)")
    parser.add_argument("--short-mb", type=float, default=0.5, help="how much of it to cut into short texts")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: time.perf_counter (default); cpu: time.thread_time, steadier on a busy machine",
    )
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()  # no "sequence longer than model_max_length" warning
    logging.getLogger("transformers").setLevel(logging.ERROR)

    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    tok = QWenTokenizer()
    raw = tok.tokenizer
    corpus = make_corpus(args.mb, args.seed)
    long_chunks = chunks(corpus, 64 * 1024)
    prefix = corpus[: int(len(corpus) * min(1.0, args.short_mb / args.mb))]
    short_texts = [prefix[i : i + 100] for i in range(0, len(prefix), 100)]
    n_cn = sum(1 for c in corpus if "\u4e00" <= c <= "\u9fff")
    print(
        f"corpus: {len(corpus.encode('utf-8')) / 1e6:.2f} MB, {len(corpus):,} chars ({n_cn / len(corpus):.0%} CJK), "
        f"{len(long_chunks)} x 64 KB chunks, {len(short_texts):,} short texts; "
        f"best of {args.repeats}, {args.clock} clock"
    )

    def raw_one(texts: list[str]) -> list[list[int]]:
        return [raw.encode(t, allowed_special="all") for t in texts]

    workloads = {
        "whole corpus (1 string)": [corpus],
        "64 KB chunks": long_chunks,
        "~100-char texts": short_texts,
    }
    for warm in (raw.encode("warm up 你好", allowed_special="all"), tok.encode("warm up"), tok(["warm", "up"])):
        del warm  # first-call costs (lazy imports, caches) stay out of the timings
    rows = []
    failures = []
    for label, texts in workloads.items():
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        fns: dict[str, Callable[[], list[list[int]]]] = {
            "raw tiktoken": lambda texts=texts: raw_one(texts),
            "tok.encode(text)": lambda texts=texts: [tok.encode(t) for t in texts],
            "tok(text)": lambda texts=texts: [tok(t)["input_ids"] for t in texts],
        }
        if len(texts) > 1:
            fns["tok(list) batch"] = lambda texts=texts: tok(texts)["input_ids"]
        timings = best_of(fns, args.repeats, clock)
        t_raw, want = timings.pop("raw tiktoken")
        rows.append((label, "raw tiktoken", mb / t_raw, None))
        for name, (t, got) in timings.items():
            if got != want:
                failures.append(f"{label} / {name}: ids differ from raw tiktoken")
            rows.append((label, name, mb / t, 100.0 * (t / t_raw - 1.0)))

    print()
    print("| workload | encoder | MB/s | overhead vs raw tiktoken |")
    print("|---|---|---:|---:|")
    for label, name, mbps, overhead in rows:
        ov = "(baseline)" if overhead is None else f"{overhead:+.1f}%"
        print(f"| {label} | {name} | {mbps:.2f} | {ov} |")
    print()
    if failures:
        print("MISMATCH:\n  " + "\n  ".join(failures))
        return 1
    print("all wrapper outputs identical to raw tiktoken")
    return 0


if __name__ == "__main__":
    sys.exit(main())
