"""Learn BPE merges for new words on top of Qwen's vocabulary and write them as an extra vocabulary file.

    python examples/add_merges.py examples/qwen_extra_vocab.txt qwen_extra.tiktoken [VOCAB] [--start_id 151851]

The input holds one ``word<TAB>frequency`` line per word. The output is a tiktoken file (``base64(token)
id`` per line) with only the new tokens; load it with ``QWenTokenizer(extra_vocab_file=...)`` or
``AutoTokenizer.from_pretrained(folder, extra_vocab_file=...)``. The model's embedding has rows up to
id 151935, so up to 85 new tokens fit without resizing it (the new rows still need training).

How merges are learned, so that tiktoken then encodes each word as one token:

1. Each word is segmented exactly as tiktoken does it: start from bytes and repeatedly join the adjacent
   pair whose joined bytes have the lowest id, until no adjacent pair is a token.
2. Every adjacent pair is a candidate for the token it would make. A candidate's count is the number of
   such pairs over all words, each word counting its frequency.
3. The most frequent candidate becomes a new token with the next id. Ties go to the shorter token, then to
   the smaller bytes, so the result never depends on the input's order.
4. Only words holding that candidate are segmented again; repeat from 2 until every word is one token.

A new token always has the highest id so far, so tiktoken applies it last: segmenting with it is the
old segmentation followed by the new merges, which is why step 4 only needs the words holding it.

On the example input (qwen_extra_vocab.txt) this gives 一只猫, 只猫, 是一只猫, 我是一只猫, 你是一只猫 and
他是一只猫, ids 151851-151856. tiktoken splits 是一只猫 as 是一|只|猫, so once 一只猫 is learned, the
candidates 只+猫 and 是一+只 both count 35 (20 + 10 + 5), and the shorter 只猫 goes first.

Words that Qwen's pre-tokenizer splits (e.g. ones with spaces) can never be one token; they are skipped
with a warning, and so are words that already are one token.
"""

from __future__ import annotations

import argparse
import base64
import heapq
import logging
import sys
import unicodedata
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path

import regex
from tqdm import tqdm

from qwen.tokenizer import BUNDLED_VOCAB, PAT_STR, SPECIAL_START_ID, SPECIAL_TOKENS, load_tiktoken_ranks

logger = logging.getLogger("add_merges")
PRETOKENIZE = regex.compile(PAT_STR)
FIRST_FREE_ID = SPECIAL_START_ID + len(SPECIAL_TOKENS)  # 151851, right after <|extra_204|>


def read_word_freqs(path: str | Path) -> dict[str, int]:
    """``word<TAB>freq`` lines (LF or CRLF) -> ``{NFC word: summed freq}``; the word may hold spaces."""
    freqs: Counter[str] = Counter()
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        word, tab, freq = line.rpartition("\t")
        if not tab or not word or not freq.strip().isdigit() or int(freq) == 0:
            raise ValueError(f"{path} line {lineno}: expected 'word<TAB>frequency' (a whole number above 0), "
                             f"got {line!r}")
        freqs[unicodedata.normalize("NFC", word)] += int(freq)  # the tokenizer sees NFC text
    return dict(freqs)


def bpe_segment(word: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """The tokens tiktoken gives ``word``: join the lowest-id adjacent pair until none is a token."""
    parts = [bytes([b]) for b in word]
    while True:
        candidates = [(ranks[a + b], i) for i, (a, b) in enumerate(pairwise(parts)) if a + b in ranks]
        if not candidates:
            return parts
        _, i = min(candidates)  # equal ids only for equal bytes: the leftmost goes first, as in tiktoken
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def usable_words(freqs: dict[str, int], ranks: dict[bytes, int]) -> dict[bytes, int]:
    """The words that can become single tokens, as UTF-8 bytes; warn about the others."""
    words: dict[bytes, int] = {}
    for word, freq in freqs.items():
        pieces = PRETOKENIZE.findall(word)
        if len(pieces) != 1:
            logger.warning("skipped %r: the pre-tokenizer splits it into %r, so it can never be one token",
                           word, pieces)
        elif word.encode() in ranks:
            logger.warning("skipped %r: it is already a token (id %d)", word, ranks[word.encode()])
        else:
            words[word.encode()] = freq
    return words


def learn_merges(freqs: dict[bytes, int], ranks: dict[bytes, int], start_id: int) -> dict[bytes, int]:
    """New ``{token: id}`` (ids from ``start_id``) that make every word of ``freqs`` a single token.

    A candidate is counted by the token it would make, so the pairs ``ab|c`` and ``a|bc`` count
    together: tiktoken joins both once ``abc`` exists."""
    ranks = dict(ranks)
    segments: dict[bytes, list[bytes]] = {}
    counts: Counter[bytes] = Counter()  # candidate token -> adjacent pairs that make it, weighted by frequency
    holders: defaultdict[bytes, set[bytes]] = defaultdict(set)  # candidate token -> words with such a pair
    queue: list[tuple[int, int, bytes]] = []  # (-count, length, token): the best candidate first; stale entries skipped

    def segment(word: bytes) -> None:
        """(Re)segment ``word`` and update the counts of the candidates it holds."""
        before = [a + b for a, b in pairwise(segments.get(word, ()))]
        segments[word] = bpe_segment(word, ranks)
        after = [a + b for a, b in pairwise(segments[word])]
        for token in before:
            counts[token] -= freqs[word]
            holders[token].discard(word)
        for token in after:
            counts[token] += freqs[word]
            holders[token].add(word)
        for token in set(before + after):  # queue every changed count, up or down
            if counts[token]:
                heapq.heappush(queue, (-counts[token], len(token), token))

    for word in freqs:
        segment(word)
    new: dict[bytes, int] = {}
    with tqdm(desc="merges", unit="merge", disable=len(freqs) < 1000) as progress:
        while queue:
            count, _, token = heapq.heappop(queue)
            if count != -counts[token]:
                continue  # the count changed since this entry was queued
            new[token] = ranks[token] = start_id + len(new)
            for word in list(holders[token]):
                segment(word)
            progress.update()
    return new


def write_extra_vocab(tokens: dict[bytes, int], path: str | Path) -> None:
    with Path(path).open("wb") as f:
        for token, rank in sorted(tokens.items(), key=lambda item: item[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input_path", help="word<TAB>frequency lines")
    parser.add_argument("output_path", help="extra vocabulary to write (tiktoken format, new tokens only)")
    parser.add_argument("vocab_path", nargs="?", default=str(BUNDLED_VOCAB),
                        help="base vocabulary (default: the qwen.tiktoken shipped with the qwen package)")
    parser.add_argument("--start_id", type=int, default=FIRST_FREE_ID, help="id of the first new token")
    args = parser.parse_args(argv)
    logging.basicConfig(format="warning: %(message)s")

    try:
        ranks = load_tiktoken_ranks(args.vocab_path)
        freqs = read_word_freqs(args.input_path)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    # New ids must be above every base id (so tiktoken applies them last) and the special tokens.
    lowest = max(max(ranks.values()) + 1, FIRST_FREE_ID)
    if args.start_id < lowest:
        parser.error(f"--start_id {args.start_id} is not above the base vocabulary and the special tokens; "
                     f"use {lowest} or more")
    new = learn_merges(usable_words(freqs, ranks), ranks, args.start_id)
    write_extra_vocab(new, args.output_path)
    for token, rank in new.items():
        print(f"{rank}\t{token.decode('utf-8', errors='replace')}")
    print(f"wrote {len(new)} new tokens to {args.output_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
