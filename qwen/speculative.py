"""Speculative decoding: guess a few tokens cheaply, check them all with one forward of the model.

A batch-1 decode reads every weight once per token, so its speed is the memory's. A forward over the last
token plus k guessed ones reads the weights once too and gives the model's choice after each of them, so
every guess the model agrees with is a token gained for the price of one read.

The engine (``Engine(..., draft="ngram")``) verifies guesses as k + 1 ordinary token selections fed by that one
forward: position j selects the next token exactly as a plain decode step would (logit bias, penalties counting
the tokens accepted before it, temperature, top-k/top-p, the grammar's mask, the request's own generator),
and the row stops at the first selection that differs from the guess. That selection is the next token; the
guesses after it are dropped. For a guess that is one token (a point mass q), this is speculative sampling's
rule itself: a draw from the model's distribution p equals the guess d with probability p(d), its acceptance
probability min(1, p(d) / q(d)); otherwise it is a draw from p without d, which is the residual distribution
norm(max(0, p - q)). So sampled replies have the model's distribution, and a seeded request draws the same
random numbers in the same order as without speculation: its reply is the same token for token (greedy
ones too), up to the rounding of a forward over several positions against one at a time.

Proposals here (``NgramIndex``): prompt lookup, the tokens that followed the latest earlier occurrence of the
sequence's last n tokens (n from ``NGRAM_MAX`` down to ``NGRAM_MIN``), from the prompt and the reply so far. It
costs nothing to propose and gains where replies copy their input (summaries, document QA, code edits, RAG
answers). ``adapt`` sizes each sequence's next guess from how the last one fared.
"""

from __future__ import annotations

from dataclasses import dataclass

NGRAM_MAX = 4  # the longest suffix looked up
NGRAM_MIN = 2  # the shortest: single tokens repeat too often to predict what follows


class NgramIndex:
    """For one sequence: where each n-gram (``NGRAM_MIN`` <= n <= ``NGRAM_MAX``) of its tokens last ended, kept
    up to date as tokens are added, so a lookup costs the same at any length."""

    def __init__(self, max_n: int = NGRAM_MAX, min_n: int = NGRAM_MIN) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min <= max, got min {min_n}, max {max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.last_end: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are in last_end

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """The ``k`` tokens that followed the latest earlier occurrence of the longest suffix of ``tokens``
        (``NGRAM_MAX`` tokens down to ``NGRAM_MIN``) seen before; [] when none was."""
        # Index every n-gram that ends before the last position: the suffix itself must not match itself.
        for end in range(max(self.indexed, self.min_n), len(tokens)):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self.last_end[tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, len(tokens))
        if k <= 0:
            return []
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            end = self.last_end.get(tuple(tokens[-n:]))
            if end is not None:
                # Copied as LZ77 does: a match close to the end runs on into the guess itself, so a period
                # shorter than k repeats (a run of one token guesses k of it, not 1).
                guess: list[int] = []
                for src in range(end, end + k):
                    guess.append(tokens[src] if src < len(tokens) else guess[src - len(tokens)])
                return guess
        return []


def adapt(k: int, proposed: int, accepted: int, most: int) -> int:
    """The next guess's length for a sequence whose last guess of ``proposed`` tokens had ``accepted`` taken:
    twice as long (up to ``most``) when all were, half as long (at least 1) when none was. A sequence whose
    guesses keep failing then checks one extra position per step, which costs a memory-bound forward little."""
    if proposed == 0:
        return k
    if accepted == proposed:
        return min(most, 2 * k)
    if accepted == 0:
        return max(1, k // 2)
    return k


@dataclass
class SpeculationCounts:
    """What an engine's speculative steps did, as vLLM counts it: drafts (a sequence's guess checked in a step),
    the tokens guessed, and those kept. A draft yields its kept tokens plus one, the model's own next token."""

    drafts: int = 0
    proposed: int = 0
    accepted: int = 0

    def add(self, drafts: int, proposed: int, accepted: int) -> None:
        self.drafts += drafts
        self.proposed += proposed
        self.accepted += accepted

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_draft(self) -> float:
        """Tokens a sequence got from a forward that checked its guess (1 without speculation)."""
        return 1 + self.accepted / self.drafts if self.drafts else 1.0
