"""The inference engine: continuous batching over a preallocated per-slot KV cache.

Requests join a running batch between decode steps and leave it as soon as they finish or are
cancelled, so many users share each forward pass. Each step (1) frees finished slots and keeps the
running sequences packed in slots 0..n-1, (2) admits waiting requests into the free slots above them and
prefills up to ``prefill_chunk`` prompt tokens of them (several short prompts in one right-padded
batch, a long one a chunk per step), (3) decodes one token for every running sequence in one batch, so
running streams keep getting tokens while a long prompt is read. A prompt whose prefill is complete
moves into slot n and starts decoding. The forward pass is the model's own (``QWenModel`` with its
attention function); the engine only supplies positions, masks, the per-sequence dynamic-NTK alpha
fixed at admission, and its slot cache. Token selection runs on the device; the one host sync per step
reads the new token of every sequence at once.

The prefix cache (``qwen.prefix_cache``) keeps the keys and values of prompts and replies; an admitted
request whose tokens start with a cached prefix has it copied into its slot and prefills only the rest.
It is off for window attention and the int8 KV cache, whose stored keys depend on more than the tokens
(a ring keeps only the last w keys; int8 scales are taken over each forward's chunk), and those models
prefill each prompt in one piece, as before.

With ``overlap`` (opt-in: written for CUDA, where it has not run yet) a decode step is queued on the GPU
before the host reads the previous step's tokens, so the host's work between steps (reading tokens,
detokenizing, stop checks, launching) runs while the GPU computes instead of leaving it idle. The next
step's input tokens never leave the device. A sequence that turns out to have finished has computed one
token too many, which is dropped. Steps whose rows need the host's view of the tokens first (repetition,
presence or frequency penalties, grammars) and steps that admit new requests run without overlap.

A request with a grammar (``SamplingParams.grammar``, e.g. an OpenAI ``response_format``) has the
tokens its grammar forbids masked out before every selection, its first token included, and stops
("stop") as soon as the grammar is complete; ``max_new_tokens`` reached first ends it with "length"
and an incomplete document, as OpenAI does. Requests without one pay nothing for it.

Use it synchronously (``Engine.generate``) or from other threads/async code (``start()`` then
``submit``/``stream``), as the server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .chat import cut_text, stable_text
from .cpu_kernels import decode_rows
from .kv_cache import SlotKVCache
from .lora import LoraAdapter, row_groups, use_lora
from .modeling import QWenLMHeadModel, ntk_alpha
from .prefix_cache import PREFILL_CHUNK, PREFIX_CACHE_BYTES, PrefixCache
from .sampling import Rows, SamplingParams, TokenStats, device_tensor, select_tokens
from .speculative import (
    PAUSE_TOKENS,
    DraftModel,
    NgramIndex,
    NgramProposer,
    Proposer,
    SpeculationCounts,
    adapt,
)

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from llguidance import LLMatcher

    from .grammar import Grammars

# The SDPA kernels an eager decode step may use, in order of preference: cuDNN's attention builds a
# plan per key length, and an eager decode step has a new one each time (measured on an H100: 3x
# slower decoding). The compiled step sees a few lengths only and leaves the choice to PyTorch (cuDNN
# on an H200: 8 µs per layer for 256 keys; bench/gpu_profile.py measures the alternatives).
DECODE_ATTENTION = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
SCORE_BLOCK = 256  # prompt positions projected onto the vocabulary at once when scoring a prompt
SPECULATIVE_TOKENS = 4  # the longest guess a speculative step checks per sequence (by default)


@dataclass
class _Launched:
    """A decode step queued on the device whose tokens the host has not read yet."""

    seqs: list[Sequence]  # row i's sequence
    tokens: torch.Tensor  # on the host once ``ready`` has passed
    ready: torch.cuda.Event | None
    logprobs: tuple[torch.Tensor, torch.Tensor | None] | None  # (chosen [n], top-k of [n, V]) when wanted


def overlap_safe(params: SamplingParams) -> bool:
    """Whether a request can be decoded one step ahead of the host: penalties and grammars need the
    host to have seen the previous token before the next one is chosen."""
    return (params.repetition_penalty == 1.0 and not params.presence_penalty and not params.frequency_penalty
            and params.grammar is None)


@dataclass
class Sequence:
    """One request as it runs: prompt, settings, and what was generated so far."""

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Sequence, str, bool], None] | None = None
    id: int = field(default_factory=itertools.count().__next__)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of text already handed to on_event
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    # with params.prompt_logprobs: per prompt token, its logprob (None for the first) and the top alternatives
    prompt_logprobs: list[tuple[float | None, list[tuple[int, float]]]] = field(default_factory=list)
    # "stop", "length", "cancelled", "grammar" (no token the grammar allows was possible: a request that cannot be
    # served as asked) or "error: ..." (the engine failed)
    finish_reason: str | None = None
    cancelled: bool = False
    slot: int = -1
    generator: torch.Generator | None = None
    matcher: LLMatcher | None = None  # the state of params.grammar
    adapter: LoraAdapter | None = None  # the LoRA adapter it runs with (qwen.lora), None: the base model
    arrival_time: float = field(default_factory=time.perf_counter)  # when it was submitted
    first_token_time: float | None = None
    inflight: int = 0  # tokens computed on the device that the host has not read yet (0 or 1)
    computed: int = 0  # positions whose keys and values are in the slot (prompt, then fed outputs)
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of computed
    alpha: float = 1.0  # the dynamic-NTK alpha of its keys, fixed at admission from the prompt's length
    looked_up: bool = False  # whether the prefix cache was asked (once, before its first chunk)
    # with speculation (qwen.speculative): how many tokens its next guess may have (None: not guessed yet), the
    # n-grams of its tokens (prompt lookup), the positions whose keys a draft model holds
    guess_len: int | None = None
    guess_again_at: int = 0  # after a pause (guess_len 0): the reply length at which it guesses again
    ngram: NgramIndex | None = None
    drafted: int = 0

    @property
    def prefilled(self) -> bool:
        return self.computed >= len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Batched generation for a ``QWenLMHeadModel``.

    ``max_batch_size`` sequences run at once (more wait in a queue); ``max_model_len`` bounds prompt
    plus output (default: the model's ``seq_length``). The KV cache grows with the longest running
    sequence up to that bound; ``kv_cache_int8`` stores it as int8 (default: the model config's
    ``use_cache_quantization``).

    ``compile`` runs the decode step through ``torch.compile`` (with CUDA graphs on a GPU, where
    launching each small kernel from Python costs more than the kernel). Its shapes are kept to a
    few: the batch is padded to a power of two and attention spans a power-of-two number of keys.

    ``overlap`` queues each decode step before reading the previous one's tokens (for CUDA, where the GPU
    otherwise waits for the host between steps; see the module docstring). Off by default until it has run
    on a GPU (``bench/gpu_check.sh``); the CPU tests run it both ways.
    ``decode_attention`` the SDPA kernels a decode step may use (default: ``DECODE_ATTENTION`` for the
    eager step, PyTorch's choice for the compiled one).

    ``prefix_cache_bytes`` bounds the prefix cache (default ``PREFIX_CACHE_BYTES``; 0 turns it off);
    ``prefill_chunk`` is the most prompt tokens one step prefills (default ``PREFILL_CHUNK``), between which
    running sequences decode a token. Smaller chunks keep streams smoother while a long prompt is read, but a
    burst of prompts then takes more steps (chunks of 512 made 8 prompts of 200 tokens 1.3x slower on a CPU).

    ``draft`` decodes speculatively (``qwen.speculative``): each step checks up to ``num_speculative_tokens``
    guessed tokens per sequence in one forward and keeps those the model would have chosen. ``"ngram"`` guesses
    from n-grams of the prompt and reply (prompt lookup); a ``QWenLMHeadModel`` with the same vocabulary (smaller:
    Qwen-1.8B for 7B/14B/72B) guesses greedily. Not with window attention or the int8 KV cache (their stored keys
    depend on the forward's chunk), nor with ``overlap``.
    """

    def __init__(
        self,
        model: QWenLMHeadModel,
        tokenizer,
        max_batch_size: int = 8,
        max_model_len: int | None = None,
        kv_cache_int8: bool | None = None,
        compile: bool = False,
        overlap: bool = False,
        decode_attention: tuple[SDPBackend, ...] | None = None,
        prefix_cache_bytes: int | None = None,
        prefill_chunk: int | None = None,
        draft: str | QWenLMHeadModel | None = None,
        num_speculative_tokens: int = SPECULATIVE_TOKENS,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = model.config
        self.config = config
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len or config.seq_length
        self.device = model.device
        dtype = model.transformer.wte.weight.dtype
        self.cache = SlotKVCache(
            config.num_hidden_layers, max_batch_size, config.num_attention_heads, config.head_dim,
            self.max_model_len, dtype, self.device,
            quantized=config.use_cache_quantization if kv_cache_int8 is None else kv_cache_int8,
            windows=config.layer_windows(),
            static=compile,
        )
        self.stats = TokenStats(max_batch_size, config.vocab_size, self.device)
        self.alpha = torch.ones(max_batch_size, dtype=torch.float64, device=self.device)
        self.next_tokens = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self.running: list[Sequence] = []  # running[i] occupies slot i
        self.prefilling: list[Sequence] = []  # admitted, prompt not all computed yet; in slots above the running
        self.waiting: deque[Sequence] = deque()
        # Ring (window) layers and int8 scales depend on more than the tokens: such a cache is neither
        # shared nor prefilled in chunks (int8 scales span each forward's chunk, as in the original).
        whole = self.cache.quantized or any(self.cache.windows)
        budget = PREFIX_CACHE_BYTES if prefix_cache_bytes is None else prefix_cache_bytes
        self.prefix_cache = PrefixCache(budget) if budget > 0 and not whole else None
        self.prefill_chunk = None if whole else prefill_chunk or PREFILL_CHUNK
        if isinstance(draft, str) and draft != "ngram":
            raise ValueError(f'draft must be "ngram" or a draft model, got {draft!r}')
        if draft is not None and whole:
            raise ValueError("speculative decoding (--speculative, draft=) does not work with window attention or the "
                             "int8 KV cache (--window-attn, --kv-cache-int8, use_cache_quantization): leave one out")
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {num_speculative_tokens}")
        self.num_speculative_tokens = num_speculative_tokens
        self.proposer: Proposer | None = None
        if draft == "ngram":
            self.proposer = NgramProposer()
        elif draft is not None:
            self.proposer = DraftModel(draft, model, max_batch_size, self.max_model_len)
        self.speculated = SpeculationCounts()
        overlap = overlap and draft is None  # a guess needs the host to know every token so far
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()  # not the step's lock: building takes a second
        self.compiled = compile
        self.overlap = overlap
        self._launched: _Launched | None = None
        self.on_finish: Callable[[Sequence], None] | None = None  # called (engine thread) as each sequence ends
        self.decode_attention = decode_attention
        self._decode_logits = self._decode_step
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            # isolate_recompiles: each engine's graphs in a cache of their own. Dynamo keys its cache by code
            # object, which every engine's decode step shares, so the graphs of earlier engines in the process
            # counted against its limit of 8, and a later engine failed (fullgraph) once they added up: the test
            # suite hit it.
            self._decode_logits = torch.compile(self._decode_step, mode=mode, fullgraph=True, isolate_recompiles=True)

    def warm_up(self) -> None:
        """Compile the decode step now rather than in the first requests: short runs at batch 1
        and 2 and at the initial and the next key length cover the graphs it will need. Does
        nothing without ``compile``."""
        if not self.compiled:
            return
        for length in sorted({1, min(self.cache.initial, self.max_model_len - 2)}):
            for batch in (1, 2):
                self.generate([[0] * length] * batch, SamplingParams(max_new_tokens=2, do_sample=False))

    # ----- submitting -----------------------------------------------------------------------------
    def submit(
        self, prompt_ids: list[int], params: SamplingParams, on_event: Callable | None = None,
        adapter: LoraAdapter | None = None,
    ) -> Sequence:
        """Queue a request; ``on_event(seq, new_text, finished)`` is called from the engine thread. ``adapter``
        (one ``qwen.lora.load_lora`` loaded onto this engine's model) runs it with that LoRA adapter."""
        params.validate(self.config.vocab_size)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.config.vocab_size:
            raise ValueError(f"the prompt has token ids outside [0, {self.config.vocab_size})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context is {self.max_model_len}; "
                "shorten it or start the engine with a larger max_model_len"
            )
        seq = Sequence(list(prompt_ids), params, on_event, adapter=adapter)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        if params.grammar is not None:
            seq.matcher = self.grammars.matcher(params.grammar)
        with self._lock:
            self.waiting.append(seq)
            self._lock.notify()
        return seq

    @property
    def grammars(self) -> Grammars:
        """The grammar matchers for this tokenizer, built on first use: llguidance is an optional
        dependency, and reading the vocabulary takes about a second."""
        with self._grammars_lock:
            if self._grammars is None:
                from .grammar import Grammars

                self._grammars = Grammars(self.tokenizer, self.config.vocab_size)
            return self._grammars

    def cancel(self, seq: Sequence) -> None:
        """Stop a request; its slot is freed before the next step."""
        seq.cancelled = True
        with self._lock:
            self._lock.notify()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 adapters: LoraAdapter | list[LoraAdapter | None] | None = None) -> list[Sequence]:
        """Run prompts to completion in this thread (the engine must not be started); ``params`` and
        ``adapters`` are one for all prompts or one per prompt."""
        if self._thread is not None:
            raise RuntimeError("the engine runs in its own thread; use submit() or stream()")
        settings = params if isinstance(params, list) else [params] * len(prompts)
        loras = adapters if isinstance(adapters, list) else [adapters] * len(prompts)
        seqs = [self.submit(p, s, adapter=a) for p, s, a in zip(prompts, settings, loras, strict=True)]
        while self.step():
            pass
        return seqs

    async def stream(self, prompt_ids: list[int], params: SamplingParams,
                     adapter: LoraAdapter | None = None) -> AsyncIterator[tuple[Sequence, str]]:
        """Async iterator of (sequence, new text) for a started engine; leaving it early cancels."""
        async for _, seq, text, _ in self.stream_many([(prompt_ids, params)], adapter):
            yield seq, text

    async def stream_many(
        self, requests: list[tuple[list[int], SamplingParams]], adapter: LoraAdapter | None = None
    ) -> AsyncIterator[tuple[int, Sequence, str, bool]]:
        """Run several requests at once on a started engine (all with ``adapter``, if one); yields (index,
        sequence, new text, finished) as they progress. Leaving the iterator early cancels the unfinished ones."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seqs: list[Sequence] = []
        try:
            for index, (prompt_ids, params) in enumerate(requests):

                def on_event(seq: Sequence, text: str, finished: bool, index: int = index) -> None:
                    if not loop.is_closed():  # the consumer may have left with its loop
                        loop.call_soon_threadsafe(queue.put_nowait, (index, seq, text, finished))

                seqs.append(self.submit(prompt_ids, params, on_event, adapter))
            remaining = len(seqs)
            while remaining:
                event = await queue.get()
                remaining -= event[3]
                yield event
        finally:
            for seq in seqs:
                if not seq.done:
                    self.cancel(seq)

    # ----- background thread ----------------------------------------------------------------------
    def start(self) -> Engine:
        """Run steps in a daemon thread whenever there is work."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="qwen-engine", daemon=True)
            self._thread.start()
        return self

    def unfinished(self) -> list[Sequence]:
        """The sequences not finished yet: running, being prefilled, waiting."""
        with self._lock:
            return [s for s in [*self.running, *self.prefilling, *self.waiting] if not s.done]

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self.waiting or self.prefilling or self.running or self._launched):
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # a broken step fails its requests, never the engine
                for seq in self.running + self.prefilling + list(self.waiting):
                    self._finish(seq, f"error: {exc}")
                self.running, self.prefilling, self.waiting, self._launched = [], [], deque(), None

    # ----- one scheduler iteration ----------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> bool:
        """Free, admit and prefill, decode. Returns whether work remains."""
        if self._launched is not None and (self.waiting or self.prefilling
                                           or not all(overlap_safe(s.params) for s in self.running)):
            self._collect()  # admissions, prefills and penalties need every token read first
        self._release([s for s in self.running if s.cancelled or s.done])
        for seq in [s for s in self.prefilling if s.cancelled]:
            self.prefilling.remove(seq)
            self._remember(seq)
            self._finish(seq, "cancelled")
        with self._lock:
            for seq in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(seq)
                self._finish(seq, "cancelled")
            admitted = []
            while self.waiting and len(self.running) + len(self.prefilling) + len(admitted) < self.max_batch_size:
                seq = min(self.waiting, key=lambda s: s.params.priority)  # the first of the most urgent
                self.waiting.remove(seq)
                admitted.append(seq)
        for seq in admitted:
            self._admit(seq)
        if self.prefilling:
            self._prefill()
            self._release([s for s in self.running if s.done])
        if self.running:
            self._decode()
        elif self._launched is not None:
            self._collect()
        self._release([s for s in self.running if s.done])
        return bool(self.running or self.prefilling or self.waiting or self._launched)

    def _release(self, leaving: list[Sequence]) -> None:
        """Remove sequences (their keys and values go to the prefix cache) and move the last running ones
        into their slots."""
        for seq in leaving:
            if not seq.done:
                self._finish(seq, "cancelled")
            self._remember(seq)
            last = self.running.pop()
            if last is not seq:
                self._relocate(last, seq.slot)
                self.running[last.slot] = last

    def _relocate(self, seq: Sequence, slot: int) -> None:
        """Move ``seq``'s slot state (cache, token stats, alpha, next token) to ``slot``, swapping with an
        admitted sequence that holds it."""
        if seq.slot == slot:
            return
        holder = next((s for s in self.prefilling if s.slot == slot), None)
        if holder is None:
            self.cache.move(seq.slot, slot)
            if self.proposer is not None:
                self.proposer.move(seq.slot, slot)
            self.stats.move(seq.slot, slot)
            self.alpha[slot] = self.alpha[seq.slot]
            self.next_tokens[slot] = self.next_tokens[seq.slot]
        else:
            pair = [seq.slot, slot]
            self.cache.swap(*pair)
            if self.proposer is not None:
                self.proposer.swap(*pair)
            self.stats.swap(*pair)
            self.alpha[pair] = self.alpha[pair[::-1]]
            self.next_tokens[pair] = self.next_tokens[pair[::-1]]
            holder.slot = seq.slot
        seq.slot = slot

    def _admit(self, seq: Sequence) -> None:
        """Give ``seq`` the lowest free slot (above the running ones: admitted prompts, completed in order,
        then mostly land where they are) and its NTK alpha."""
        taken = {s.slot for s in self.running} | {s.slot for s in self.prefilling}
        seq.slot = min(set(range(self.max_batch_size)) - taken)
        self.prefilling.append(seq)
        self.stats.reset(seq.slot, seq.prompt_ids)
        if self.config.use_dynamic_ntk:
            seq.alpha = ntk_alpha(torch.tensor([len(seq.prompt_ids)]), self.config.seq_length).item()
            self.alpha[seq.slot] = seq.alpha
        # A scored prompt needs every position's hidden state: none may come from the prefix cache.
        seq.looked_up = self.prefix_cache is None or seq.params.prompt_logprobs is not None

    def _look_up(self, seq: Sequence) -> None:
        """Copy the longest cached prefix of ``seq``'s prompt into its slot. At least the last prompt token
        is computed: its logits give the first output token."""
        seq.cached_tokens, pieces = self.prefix_cache.lookup(seq.prompt_ids, self._salt(seq),
                                                             limit=len(seq.prompt_ids) - 1)
        for start, kv in pieces:
            self.cache.write(seq.slot, start, kv)
        seq.computed, seq.looked_up = seq.cached_tokens, True

    def _waits_for(self, seq: Sequence, earlier: list[Sequence]) -> bool:
        """Whether ``seq`` should wait for an earlier admitted prompt that holds at least half of its own
        (the n copies of one prompt, one tools or few-shot prompt before different questions): once that
        one is prefilled and cached, ``seq`` computes only what differs."""
        need = max(self.prefix_cache.block, (len(seq.prompt_ids) - 1) // 2)
        if len(seq.prompt_ids) - 1 < need:  # not one whole block to reuse
            return False
        for other in earlier:
            if self._salt(other) == self._salt(seq) and other.prompt_ids[:need] == seq.prompt_ids[:need]:
                return True
        return False

    @staticmethod
    def _salt(seq: Sequence) -> bytes:
        """What besides the tokens made a sequence's keys: the dynamic-NTK alpha they were rotated with, and the
        LoRA adapter that computed them."""
        return struct.pack("<d", seq.alpha) + (seq.adapter.key if seq.adapter is not None else b"")

    def _remember(self, seq: Sequence) -> None:
        """Keep the keys and values in ``seq``'s slot in the prefix cache (positions it has computed)."""
        if self.prefix_cache is None or (seq.finish_reason or "").startswith("error"):
            return
        tokens = (seq.prompt_ids + seq.output_ids)[: seq.computed]
        self.prefix_cache.store(tokens, self._salt(seq), lambda start, end: self.cache.read(seq.slot, start, end))

    def _prefill(self) -> None:
        """Prefill up to ``prefill_chunk`` prompt tokens of the admitted sequences, oldest first, in one
        right-padded batch; those whose prompt is complete move into the running slots and get their first
        token."""
        budget = self.prefill_chunk or sum(len(s.prompt_ids) for s in self.prefilling)
        batch, counts = [], []
        for i, seq in enumerate(self.prefilling):
            if budget <= 0:
                break
            if not seq.looked_up:
                if self._waits_for(seq, self.prefilling[:i]):
                    continue
                self._look_up(seq)
            batch.append(seq)
            counts.append(min(len(seq.prompt_ids) - seq.computed, budget))
            budget -= counts[-1]
        offsets = [s.computed for s in batch]
        # A quantized layer takes one column per sequence for a decode step; a prompt's tokens must take the
        # prefill path whatever else is in the chunk (qwen.quantization.one_token_each): pad a lone column
        # (not for a ring layer, whose prefill attends its own chunk).
        slots = [s.slot for s in batch]
        ids, positions, mask = self.cache.begin_chunks(
            slots, offsets, [s.prompt_ids[o : o + n] for s, o, n in zip(batch, offsets, counts, strict=True)],
            width=1 if any(self.cache.windows) else 2)
        with use_lora(row_groups([s.adapter for s in batch], self.device)):
            hidden = self._hidden(ids, positions, mask, self.alpha[device_tensor(slots, self.device)])
        for row, (seq, n) in enumerate(zip(batch, counts, strict=True)):
            if seq.params.prompt_logprobs is not None:
                self._score_prompt(seq, hidden[row, :n])
            seq.computed += n
        if self.proposer is not None:  # a draft model reads the prompt too (its chunk, or all a prefix cache gave)
            self.proposer.prefilled([seq for seq in batch if seq.params.max_new_tokens > 1], self.alpha)
        scored_only = [seq for seq in batch if seq.prefilled and seq.params.max_new_tokens == 0]
        for seq in scored_only:
            self.prefilling.remove(seq)
            self._remember(seq)
            self._finish(seq, "length")
        done = [i for i, seq in enumerate(batch) if seq.prefilled and not seq.done]
        if not done:
            return
        last = hidden[device_tensor(done, self.device), device_tensor([counts[i] - 1 for i in done], self.device)]
        with use_lora(row_groups([batch[i].adapter for i in done], self.device)):
            logits = self.model.lm_head(last)
        seqs, first = [batch[i] for i in done], len(self.running)
        for seq in seqs:  # the oldest admitted: they take slots first, first + 1, ... in order
            self.prefilling.remove(seq)
            self._relocate(seq, len(self.running))
            self.running.append(seq)
            self._remember(seq)
        self._sample(seqs, slice(first, first + len(seqs)), logits)

    def _score_prompt(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """Add the logprobs of the prompt tokens that the chunk's ``hidden`` states (from position ``seq.computed``
        on) predict, projected onto the vocabulary ``SCORE_BLOCK`` positions at a time (never [length, vocabulary]
        logits at once)."""
        start, top = seq.computed, seq.params.prompt_logprobs
        if start == 0:
            seq.prompt_logprobs.append((None, []))
        hidden = hidden[: len(seq.prompt_ids) - 1 - start]  # the last prompt token predicts the first output
        targets = torch.tensor(seq.prompt_ids[start + 1 : start + 1 + hidden.shape[0]], device=hidden.device)
        with use_lora(seq.adapter):
            for at in range(0, hidden.shape[0], SCORE_BLOCK):
                logprobs = torch.log_softmax(self.model.lm_head(hidden[at : at + SCORE_BLOCK]).float(), dim=-1)
                chosen = logprobs.gather(1, targets[at : at + SCORE_BLOCK, None])[:, 0].tolist()
                if top:
                    values, indices = logprobs.topk(top, dim=-1)
                    alts = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(),
                                                                         strict=True)]
                else:
                    alts = [[] for _ in chosen]
                seq.prompt_logprobs += zip(chosen, alts, strict=True)

    def _decode(self) -> None:
        if self.proposer is not None and self._speculate():
            return
        n = len(self.running)
        # A compiled step sees a few batch sizes only; the padding rows decode in the slots above. One that
        # holds an admitted prompt is written where its next chunk will write anyway.
        width = min(1 << (n - 1).bit_length(), self.max_batch_size) if self.compiled else n
        # A token still on its way to the host already has its place; a sequence it finishes may
        # run one step more, whose position is kept inside the cache.
        positions = [min(len(s.prompt_ids) + len(s.output_ids) + s.inflight, self.max_model_len) - 1
                     for s in self.running]
        for seq, position in zip(self.running, positions, strict=True):
            seq.computed = position + 1
        admitted = {s.slot: s.computed for s in self.prefilling}
        positions += [admitted.get(slot, 0) for slot in range(n, width)]
        kv_len = max(positions) + 1
        starts = device_tensor(positions, self.device)
        keys = self.cache.begin(slice(0, width), starts, 1, kv_len)
        mask = None
        if keys != kv_len or min(positions) != kv_len - 1:  # hide each row's unused tail
            mask = (torch.arange(keys, device=self.device)[None] <= starts[:, None])[:, None, None, :]
        ids = self.next_tokens[:width, None]
        adapters = [s.adapter for s in self.running] + [None] * (width - n)
        # A compiled step holds the base model only (qwen.lora.LoraLayer): rows with adapters decode eagerly.
        decode = self._decode_step if any(adapters) else self._decode_logits
        with use_lora(row_groups(adapters, self.device)):
            logits = decode(ids, starts[:, None], mask, self.alpha[:width])
        seqs, rows = list(self.running), slice(0, n)
        if not (self.overlap and all(overlap_safe(s.params) for s in seqs)):
            self._sample(seqs, rows, logits[:n])
            return
        launched = self._launch(seqs, rows, logits[:n])
        previous, self._launched = self._launched, launched
        if previous is not None:
            self._collect(previous)

    def _speculate(self) -> bool:
        """A speculative step (see ``qwen.speculative``), if any running sequence has a guess: one forward over
        each sequence's next token and its guess, then per position the selection a decode step would make,
        kept while it equals the guess. False (nothing done) when no sequence has one."""
        seqs = list(self.running)
        for seq in seqs:
            if seq.guess_len is None:
                seq.guess_len = self.num_speculative_tokens
            elif seq.guess_len == 0 and len(seq.output_ids) >= seq.guess_again_at:
                seq.guess_len = 1  # the pause is over: try again
        # as long as the sequence may still grow: k guesses and the model's next token
        lengths = [max(0, min(seq.guess_len, seq.params.max_new_tokens - len(seq.output_ids) - 1,
                              self.max_model_len - len(seq.prompt_ids) - len(seq.output_ids))) for seq in seqs]
        constrain = self._grammars.constrain if self._grammars is not None else None
        guesses = self.proposer.propose(seqs, lengths, self.alpha[: len(seqs)], constrain)
        if not any(guesses):
            return False
        n = len(seqs)
        offsets = [len(s.prompt_ids) + len(s.output_ids) - 1 for s in seqs]
        ids, positions, mask = self.cache.begin_chunks(list(range(n)), offsets,
                                                       [[s.output_ids[-1], *g] for s, g in zip(seqs, guesses,
                                                                                               strict=True)])
        with use_lora(row_groups([s.adapter for s in seqs], self.device)), decode_rows():
            logits = self.model.lm_head(self._hidden(ids, positions, mask, self.alpha[:n]))
        going, accepted = list(range(n)), [0] * n
        for j in range(ids.shape[1]):
            self._sample([seqs[i] for i in going], going, logits[going, j])
            going = [i for i in going if not seqs[i].done and j < len(guesses[i])
                     and seqs[i].output_ids[-1] == guesses[i][j]]
            for i in going:
                accepted[i] += 1
            if not going:
                break
        for seq, guess, offset, taken in zip(seqs, guesses, offsets, accepted, strict=True):
            seq.computed = offset + 1 + taken  # the keys of the tokens fed and kept
            seq.guess_len = adapt(seq.guess_len, len(guess), taken, self.num_speculative_tokens,
                                  self.proposer.least)
            if seq.guess_len == 0:
                seq.guess_again_at = len(seq.output_ids) + PAUSE_TOKENS
        self.proposer.kept(seqs, guesses, accepted)
        self.speculated.add(sum(map(bool, guesses)), sum(map(len, guesses)), sum(accepted))
        return True

    def _launch(self, seqs: list[Sequence], rows: slice, logits: torch.Tensor) -> _Launched:
        """Choose the step's tokens on the device and start copying them to the host."""
        tokens, logprobs = self._select(seqs, rows, logits)
        want = self._logprob_results(seqs, tokens, logprobs)
        for seq in seqs:
            seq.inflight += 1
        if tokens.is_cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            return _Launched(seqs, host, ready, want)
        return _Launched(seqs, tokens, None, want)

    def _collect(self, launched: _Launched | None = None) -> None:
        """Read a launched step's tokens (default: the pending one) and advance its sequences."""
        if launched is None:
            launched, self._launched = self._launched, None
        if launched.ready is not None:
            launched.ready.synchronize()
        for seq in launched.seqs:
            seq.inflight -= 1
        self._accept(launched.seqs, launched.tokens.tolist(), launched.logprobs, skip_done=True)

    def _decode_step(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                     alpha: torch.Tensor) -> torch.Tensor:
        # Eager steps (a compiled engine's too, when a row has a LoRA adapter) keep to DECODE_ATTENTION.
        kernels = self.decode_attention or (None if torch.compiler.is_compiling() else DECODE_ATTENTION)
        with sdpa_kernel(list(kernels)) if kernels is not None else contextlib.nullcontext():
            return self.model.lm_head(self._hidden(ids, positions, mask, alpha)[:, -1])

    def _hidden(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                alpha: torch.Tensor) -> torch.Tensor:
        """The last layer's hidden states after a forward through the engine's cache."""
        return self.model.transformer(
            input_ids=ids, position_ids=positions, attention_mask=mask, cache=self.cache, use_cache=True,
            ntk_alpha_override=alpha,
        ).last_hidden_state

    def _sample(self, seqs: list[Sequence], rows: Rows, logits: torch.Tensor) -> None:
        """Choose one token per row and hand them to their sequences now (the step's one host sync)."""
        tokens, logprobs = self._select(seqs, rows, logits)
        want = self._logprob_results(seqs, tokens, logprobs)
        token_list = tokens.tolist()
        self.stats.add(rows, token_list)
        self._accept(seqs, token_list, want)

    def _select(self, seqs: list[Sequence], rows: Rows, logits: torch.Tensor):
        params = [s.params for s in seqs]
        constrained = [(i, s.matcher) for i, s in enumerate(seqs) if s.matcher is not None]
        if constrained:
            self._grammars.constrain(logits, constrained)
        want = any(p.logprobs is not None for p in params)
        tokens, logprobs = select_tokens(logits, params, self.stats, rows, [s.generator for s in seqs], want)
        self.next_tokens[rows] = tokens
        return tokens, logprobs

    @staticmethod
    def _logprob_results(seqs: list[Sequence], tokens: torch.Tensor, logprobs: torch.Tensor | None):
        """The chosen tokens' log-probabilities and the top alternatives, still on the device."""
        if logprobs is None:
            return None
        logprobs = logprobs.clamp(min=-9999.0)  # finite, as OpenAI reports impossible tokens
        chosen = logprobs.gather(1, tokens[:, None])[:, 0]
        k = max(s.params.logprobs or 0 for s in seqs)
        return chosen, torch.topk(logprobs, k, dim=-1) if k else None

    def _accept(self, seqs: list[Sequence], tokens: list[int], logprobs, skip_done: bool = False) -> None:
        chosen = top = None
        if logprobs is not None:
            chosen, top = logprobs[0].tolist(), logprobs[1]
            if top is not None:
                top = (top.indices.tolist(), top.values.tolist())
        now = time.perf_counter()
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            if skip_done and seq.done:  # finished while this token was computed: it is dropped
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
            self._advance(seq, token, chosen[i] if chosen else 0.0, top, i)

    def _advance(self, seq: Sequence, token: int, logprob: float, top, row: int) -> None:
        params, matcher = seq.params, seq.matcher
        if matcher is not None and matcher.is_error():  # a grammar with no way on (e.g. an empty regex)
            self._grammar_dead_end(seq)
            return
        if token in params.stop_token_ids or (matcher is not None and token in self._grammars.end_ids):
            self._finish(seq, "stop")
            return
        if matcher is not None and not matcher.consume_token(token):  # every allowed token had -inf logits
            self._grammar_dead_end(seq)
            return
        seq.output_ids.append(token)
        if params.logprobs is not None:
            alts = []
            if top is not None and params.logprobs:
                alts = list(zip(top[0][row][: params.logprobs], top[1][row][: params.logprobs], strict=True))
            seq.logprobs.append((token, logprob, alts))
        text, stopped = cut_text(self.tokenizer.decode(seq.output_ids), params.stop)
        seq.text = text
        if stopped or (matcher is not None and matcher.is_stopped()):  # is_stopped: the grammar is complete
            self._finish(seq, "stop")
        elif len(seq.output_ids) >= params.max_new_tokens or len(seq.prompt_ids) + len(seq.output_ids) >= (
            self.max_model_len
        ):
            self._finish(seq, "length")
        else:
            self._emit(seq, stable_text(seq.text, params.stop), False)

    def _grammar_dead_end(self, seq: Sequence) -> None:
        logger.info("request %d: no token its grammar allows was possible (%s)", seq.id, seq.matcher.get_error())
        self._finish(seq, "grammar")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self._emit(seq, seq.text, True)
        if self.on_finish is not None:
            try:
                self.on_finish(seq)
            except Exception:  # an observer's failure (the server's metrics) never fails the batch
                logger.exception("Engine.on_finish failed")

    def _emit(self, seq: Sequence, visible: str, finished: bool) -> None:
        new = visible[seq.emitted :] if len(visible) > seq.emitted else ""
        seq.emitted = max(seq.emitted, len(visible))
        if seq.on_event is not None and (new or finished):
            try:
                seq.on_event(seq, new, finished)
            except Exception:  # a broken consumer loses its own request, never its batch mates
                seq.on_event = None
                seq.cancelled = True
