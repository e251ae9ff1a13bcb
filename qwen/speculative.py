"""Speculative decoding: guess a few tokens cheaply, check them all with one forward of the model.

A batch-1 decode reads every weight once per token, so its speed is the memory's. A forward over the last
token plus k guessed ones reads the weights once too and gives the model's choice after each of them, so
every guess the model agrees with is a token gained for the price of one read.

The engine (``Engine(..., draft=...)``) verifies guesses as k + 1 ordinary token selections fed by that one
forward: position j selects the next token exactly as a plain decode step would (logit bias, penalties counting
the tokens accepted before it, temperature, top-k/top-p, the grammar's mask, the request's own generator),
and the row stops at the first selection that differs from the guess. That selection is the next token; the
guesses after it are dropped. For a guess that is one token (a point mass q), this is speculative sampling's
rule itself: a draw from the model's distribution p equals the guess d with probability p(d), its acceptance
probability min(1, p(d) / q(d)); otherwise it is a draw from p without d, which is the residual distribution
norm(max(0, p - q)). So sampled replies have the model's distribution, and a seeded request draws the same
random numbers in the same order as without speculation: its reply is the same token for token (greedy
ones too), up to the rounding of a forward over several positions against one at a time.

Guesses come from a proposer:

* ``NgramProposer`` (``draft="ngram"``): prompt lookup, the tokens that followed the latest earlier occurrence of
  the sequence's last n tokens (n from ``NGRAM_MAX`` down to ``NGRAM_MIN``), in the prompt and the reply so far.
  It costs nothing to propose and gains where replies copy their input (summaries, document QA, code edits, RAG
  answers).
* ``DraftModel`` (``draft=model``): a second, smaller Qwen v1 model with the same vocabulary (Qwen-1.8B for
  Qwen-7B/14B/72B, or the model itself quantized to int4) decodes the guess greedily (with the request's logit
  bias), batched over the sequences, from its own KV cache, one slot per engine slot.

A grammar constrains the guesses as it does the model's choices. ``adapt`` sizes each sequence's next guess from
how the last one fared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .cpu_kernels import decode_rows
from .kv_cache import SlotKVCache
from .sampling import add_logit_bias, argmax_rows

if TYPE_CHECKING:
    from .modeling import QWenLMHeadModel
    from .sampling import SamplingParams

# (logits [n, V], [(row, grammar matcher)]): masks, in place, what each row's grammar forbids now
Constrain = Callable[[torch.Tensor, list], None]

NGRAM_MAX = 4  # the longest suffix looked up
NGRAM_MIN = 2  # the shortest: single tokens repeat too often to predict what follows
DECODE_WIDTH = 8  # a draft model's forward of at most this many tokens per sequence runs on the decode kernels


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


class Sequence(Protocol):
    """A running request as a proposer sees it (``qwen.engine.Sequence``)."""

    prompt_ids: list[int]
    output_ids: list[int]
    params: SamplingParams
    matcher: Any  # its grammar's llguidance matcher, or None
    ngram: NgramIndex | None
    drafted: int
    slot: int
    computed: int  # positions whose keys the model's cache holds


class Proposer:
    """Where guesses come from. The engine asks for guesses of ``lengths[i]`` tokens (0: none) for its running
    sequences (in slots 0..n-1; a guess holds only tokens the sequence's grammar allows), tells which were kept, and
    mirrors its slot moves. ``least`` is the shortest guess ``adapt`` shrinks to."""

    least = 1

    def propose(self, seqs: list[Sequence], lengths: list[int], alpha: torch.Tensor,
                constrain: Constrain | None) -> list[list[int]]:
        raise NotImplementedError

    def prefilled(self, seqs: list[Sequence], alpha: torch.Tensor) -> None:
        """The engine computed the keys of these sequences' prompts up to ``Sequence.computed`` (in slots
        ``Sequence.slot``; ``alpha`` is the engine's NTK alpha per slot)."""

    def kept(self, seqs: list[Sequence], guesses: list[list[int]], accepted: list[int]) -> None:
        """After a check: ``accepted[i]`` of ``guesses[i]`` were kept."""

    def move(self, src: int, dst: int) -> None:
        """The engine moved a sequence from slot ``src`` to ``dst``."""

    def swap(self, a: int, b: int) -> None:
        """The engine swapped the sequences of slots ``a`` and ``b``."""


class NgramProposer(Proposer):
    """Prompt lookup: each sequence's ``NgramIndex`` (kept on the sequence), cut before the first token its
    grammar forbids."""

    def propose(self, seqs: list[Sequence], lengths: list[int], alpha: torch.Tensor,
                constrain: Constrain | None) -> list[list[int]]:
        guesses = []
        for seq, length in zip(seqs, lengths, strict=True):
            if seq.ngram is None:
                seq.ngram = NgramIndex()
            guess = seq.ngram.propose(seq.prompt_ids + seq.output_ids, length)
            if seq.matcher is not None and guess:
                guess = guess[: seq.matcher.validate_tokens(guess)]
            guesses.append(guess)
        return guesses


class DraftModel(Proposer):
    """A smaller model that guesses greedily (and pauses after failures: ``least`` 0). Its cache has a slot per
    engine slot; ``Sequence.drafted`` counts the positions of a sequence's tokens whose keys it holds. It reads each
    prompt chunk as the engine prefills it; each proposal first feeds the tokens it has not seen (the model's last
    token or two) in one forward, then one forward per further guessed token, for the sequences still guessing."""

    least = 0

    def __init__(self, model: QWenLMHeadModel, target: QWenLMHeadModel, slots: int, max_len: int) -> None:
        draft, config = model.config, target.config
        if draft.vocab_size != config.vocab_size:
            raise ValueError(f"the draft model's vocabulary has {draft.vocab_size} tokens and the model's "
                             f"{config.vocab_size}: a draft must share the model's tokenizer (for Qwen-7B/14B/72B, "
                             "Qwen-1.8B)")
        if model.device != target.device:
            raise ValueError(f"the draft model is on {model.device} and the model on {target.device}: put both on "
                             "one device")
        if any(draft.layer_windows()) or draft.use_cache_quantization:
            raise ValueError("a draft model with window attention or the int8 KV cache is not supported: load it "
                             "without them")
        self.model = model.eval()
        self.cache = SlotKVCache(draft.num_hidden_layers, slots, draft.num_attention_heads, draft.head_dim, max_len,
                                 model.transformer.wte.weight.dtype, model.device)

    def propose(self, seqs: list[Sequence], lengths: list[int], alpha: torch.Tensor,
                constrain: Constrain | None) -> list[list[int]]:
        if not any(lengths):  # no forward at all (what it has not seen, it reads at the next guess)
            return [[] for _ in seqs]
        tokens = [seq.prompt_ids + seq.output_ids for seq in seqs]
        rows = list(range(len(seqs)))
        logits = self._forward(rows, [seq.drafted for seq in seqs],
                               [t[seq.drafted :] for seq, t in zip(seqs, tokens, strict=True)], alpha)
        for seq, t in zip(seqs, tokens, strict=True):
            seq.drafted = len(t)
        guesses: list[list[int]] = [[] for _ in seqs]
        going = [i for i in rows if lengths[i] > 0]
        logits = logits[going]
        while going:
            add_logit_bias(logits, [seqs[i].params for i in going])  # a request's bias steers its guesses too
            constrained = [(k, seqs[i].matcher) for k, i in enumerate(going) if seqs[i].matcher is not None]
            if constrained and constrain is not None:
                constrain(logits, constrained)
            stopped = set()
            for i, token in zip(going, argmax_rows(logits).tolist(), strict=True):
                if seqs[i].matcher is not None and not seqs[i].matcher.try_consume_tokens([token]):
                    stopped.add(i)  # nothing the grammar allows was left: the guess ends here
                    continue
                guesses[i].append(token)
            going = [i for i in going if i not in stopped and len(guesses[i]) < lengths[i]]
            if going:
                logits = self._forward(going, [len(tokens[i]) + len(guesses[i]) - 1 for i in going],
                                       [guesses[i][-1:] for i in going], alpha[going])
        for seq, guess in zip(seqs, guesses, strict=True):
            if seq.matcher is not None and guess:
                seq.matcher.rollback(len(guess))
        return guesses

    def prefilled(self, seqs: list[Sequence], alpha: torch.Tensor) -> None:
        """Read the same prompt tokens, so that a sequence's first guess reads one token, not its whole prompt
        (which would stall every running sequence for that step, unchunked)."""
        seqs = [seq for seq in seqs if seq.drafted < seq.computed]
        if not seqs:
            return
        slots = [seq.slot for seq in seqs]
        chunks = [seq.prompt_ids[seq.drafted : seq.computed] for seq in seqs]
        self._forward(slots, [seq.drafted for seq in seqs], chunks, alpha[slots], logits=False)
        for seq in seqs:
            seq.drafted = seq.computed

    def kept(self, seqs: list[Sequence], guesses: list[list[int]], accepted: list[int]) -> None:
        for seq, guess, taken in zip(seqs, guesses, accepted, strict=True):
            seq.drafted += min(taken, max(len(guess) - 1, 0))  # the kept guesses it was fed (all but the last)

    def move(self, src: int, dst: int) -> None:
        self.cache.move(src, dst)

    def swap(self, a: int, b: int) -> None:
        self.cache.swap(a, b)

    def _forward(self, slots: list[int], offsets: list[int], chunks: list[list[int]], alpha: torch.Tensor,
                 logits: bool = True) -> torch.Tensor | None:
        """Feed ``chunks[i]`` at positions ``offsets[i]`` on into slot ``slots[i]``; the logits [n, V] (fp32) after
        each chunk's last token (if ``logits``)."""
        device = self.model.device
        ids, positions, mask = self.cache.begin_chunks(slots, offsets, chunks)
        # A few tokens a sequence (the usual catch-up) run on the decode kernels: a quantized draft's prompt path
        # dequantizes every weight, and PyTorch's bf16 matmul is slower than qwen's kernel for a few rows.
        with decode_rows() if ids.shape[1] <= DECODE_WIDTH else contextlib.nullcontext():
            hidden = self.model.transformer(input_ids=ids, position_ids=positions, cache=self.cache, use_cache=True,
                                            attention_mask=mask, ntk_alpha_override=alpha).last_hidden_state
        if not logits:
            return None
        ends = torch.tensor([len(c) - 1 for c in chunks], device=device)
        return self.model.lm_head(hidden[torch.arange(len(slots), device=device), ends]).float()


PAUSE_TOKENS = 16  # a draft model's sequence whose one-token guesses fail stops guessing for this many tokens


def adapt(k: int, proposed: int, accepted: int, most: int, least: int) -> int:
    """The next guess's length for a sequence whose last guess of ``proposed`` tokens had ``accepted`` kept: twice
    as long (up to ``most``) when all were, half as long (down to ``least``) when none was. ``least`` is 0 for a
    draft model, whose forwards cost a step something: a failed one-token guess then pauses guessing (see
    ``PAUSE_TOKENS``); 1 for prompt lookup, which costs a step next to nothing (one more position to check)."""
    if proposed == 0:
        return k
    if accepted == proposed:
        return min(most, 2 * k)
    if accepted == 0:
        return max(least, k // 2)
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
