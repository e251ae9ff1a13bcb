"""The engine's prefix cache: keys and values of token prefixes seen before, so that a request whose prompt
starts with them (the history of a chat, an agent's tools prompt, few-shot exemplars, the n copies of one
prompt) prefills only the rest.

What is kept: entries, each holding the keys and values of a run of whole blocks of ``block`` tokens and
pointing to the entry that holds the blocks before it, so the entries form a tree of shared prefixes and no
prefix is stored twice. A block is found by a hash chained over every token before it and over the
``salt`` (the dynamic-NTK alpha the keys were rotated with: keys cached under one alpha never serve a
request that needs another), and the matched tokens are compared too, so a hash collision cannot reuse
wrong keys. A lookup copies the longest cached prefix into the request's slot; the tail of a prompt that
does not fill a block is always computed.

Memory is bounded by ``budget`` bytes: when a store goes over it, the least recently used entries that no
other entry builds on are dropped first. Entries live on the device of the engine's cache.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the front ends read PREFIX_CACHE_BYTES before they import torch
    import torch

    LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [heads, tokens, head_dim]

PREFIX_CACHE_BYTES = 2 << 30  # the default budget, on a CPU or a GPU
PREFILL_CHUNK = 2048  # the engine's default: the most prompt tokens one step prefills


@dataclass(eq=False)
class _Entry:
    parent: _Entry | None
    start: int  # position of its first token; its parent's chain holds [0, start)
    tokens: list[int]  # tokens [start, start + len(tokens)), whole blocks
    kv: LayerKV
    nbytes: int
    hashes: list[bytes] = field(default_factory=list)  # of its blocks
    children: int = 0
    last_used: int = 0

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass
class PrefixCacheStats:
    """What the server's /health reports."""

    lookups: int = 0  # requests that asked
    hits: int = 0  # of those, requests that reused at least one block
    tokens_reused: int = 0  # prompt tokens not computed thanks to the cache
    evictions: int = 0  # entries dropped to stay within the budget
    entries: int = 0
    tokens: int = 0  # tokens held
    bytes: int = 0  # bytes held
    budget_bytes: int = 0


class PrefixCache:
    def __init__(self, budget: int, block: int = 32) -> None:
        if block < 1:
            raise ValueError("the prefix cache's block size must be at least 1 token")
        self.budget, self.block = budget, block
        self._blocks: dict[bytes, tuple[_Entry, int]] = {}  # block hash -> (entry, the block's end position)
        self._entries: set[_Entry] = set()
        self._clock = itertools.count(1)
        self.stats = PrefixCacheStats(budget_bytes=budget)

    def _hashes(self, tokens: list[int], salt: bytes) -> list[bytes]:
        """The chained hash of every whole block of ``tokens``."""
        out, previous = [], salt
        for start in range(0, len(tokens) - self.block + 1, self.block):
            chunk = array("q", tokens[start : start + self.block]).tobytes()
            previous = hashlib.blake2b(previous + chunk, digest_size=16).digest()
            out.append(previous)
        return out

    def _longest(self, tokens: list[int], hashes: list[bytes]) -> tuple[_Entry | None, int]:
        """The entry holding the longest cached prefix of ``tokens`` (whose block ``hashes`` are given) and
        that prefix's length."""
        for hashed in reversed(hashes):
            found = self._blocks.get(hashed)
            if found is not None and self._chain_tokens(*found) == tokens[: found[1]]:
                return found
        return None, 0

    @staticmethod
    def _segments(entry: _Entry | None, end: int) -> list[tuple[_Entry, int, int]]:
        """(entry, from, to) positions that make up the prefix [0, end) through ``entry``'s chain, first first."""
        out = []
        while entry is not None and end > 0:
            out.append((entry, entry.start, end))
            end, entry = entry.start, entry.parent
        return out[::-1]

    def _chain_tokens(self, entry: _Entry, end: int) -> list[int]:
        return [t for e, a, b in self._segments(entry, end) for t in e.tokens[a - e.start : b - e.start]]

    def _touch(self, entry: _Entry | None) -> None:
        now = next(self._clock)
        while entry is not None:
            entry.last_used = now
            entry = entry.parent

    def lookup(self, tokens: list[int], salt: bytes, limit: int) -> tuple[int, list[tuple[int, LayerKV]]]:
        """The cached prefix of ``tokens[:limit]``: its length and the pieces to copy, as (first position,
        per-layer keys and values). Counted in the stats."""
        entry, length = self._longest(tokens[:limit], self._hashes(tokens[:limit], salt))
        self.stats.lookups += 1
        if not length:
            return 0, []
        self._touch(entry)
        self.stats.hits += 1
        self.stats.tokens_reused += length
        return length, [(a, [(k[:, a - e.start : b - e.start], v[:, a - e.start : b - e.start]) for k, v in e.kv])
                        for e, a, b in self._segments(entry, length)]

    def store(self, tokens: list[int], salt: bytes, read) -> None:
        """Keep the whole blocks of ``tokens`` that are not cached yet; ``read(start, end)`` returns their
        keys and values (a copy, per layer). Then drop least recently used entries down to the budget."""
        full = len(tokens) // self.block * self.block
        hashes = self._hashes(tokens[:full], salt)
        parent, start = self._longest(tokens[:full], hashes)
        if full <= start:
            self._touch(parent)
            return
        kv = read(start, full)
        nbytes = sum(t.numel() * t.element_size() for pair in kv for t in pair)
        if nbytes > self.budget:
            return
        # The parent may hold more than the shared part; the entry's chain then reads it only up to `start`.
        entry = _Entry(parent, start, tokens[start:full], kv, nbytes)
        if parent is not None:
            parent.children += 1
        self._entries.add(entry)
        for i in range(start // self.block, full // self.block):
            self._blocks[hashes[i]] = (entry, (i + 1) * self.block)
            entry.hashes.append(hashes[i])
        self.stats.bytes += nbytes
        self.stats.tokens += len(entry.tokens)
        self._touch(entry)
        self._evict()
        self.stats.entries = len(self._entries)

    def _evict(self) -> None:
        """Drop least recently used leaves until the budget holds (the entry just stored, the newest, goes
        last: only when it and its own chain are all that is left over the budget)."""
        while self.stats.bytes > self.budget:
            self._drop(min((e for e in self._entries if e.children == 0), key=lambda e: e.last_used))

    def _drop(self, entry: _Entry) -> None:
        self._entries.discard(entry)
        for hashed in entry.hashes:
            if self._blocks.get(hashed, (None,))[0] is entry:
                del self._blocks[hashed]
        if entry.parent is not None:
            entry.parent.children -= 1
        self.stats.bytes -= entry.nbytes
        self.stats.tokens -= len(entry.tokens)
        self.stats.evictions += 1
        self.stats.entries = len(self._entries)

    def clear(self) -> None:
        """Drop everything (the counters of lookups, hits and reuse stay)."""
        self._entries.clear()
        self._blocks.clear()
        self.stats.bytes = self.stats.tokens = self.stats.entries = 0
