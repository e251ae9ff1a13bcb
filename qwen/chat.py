"""Chat on top of ``generate()``: ChatML contexts, stop words, response decoding, chat/stream/batch.

The names and signatures of the original ``qwen_generation_utils`` (``make_context``,
``decode_tokens``, ``get_stop_words_ids``) and of ``model.chat``/``model.chat_stream`` are kept, so
the original README's snippets run unchanged. Contents and roles are always encoded with special
tokens disallowed: a user who types ``<|im_end|>`` produces plain text, never a control token.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Sequence
from queue import Queue
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .lora import active_groups, use_lora

DEFAULT_SYSTEM = "You are a helpful assistant."
History = list[tuple[str, str]]

# generation_config.json of the original -Chat checkpoints; used when a folder has none.
CHAT_GENERATION_DEFAULTS = {
    "chat_format": "chatml",
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "max_window_size": 6144,
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.8,
    "repetition_penalty": 1.1,
}
# ... and of the original base models.
BASE_GENERATION_DEFAULTS = {
    "chat_format": "raw",
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "stop_words_ids": [[151643]],
    "max_window_size": 6144,
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.8,
}
# Flags only sampling reads, at the values transformers treats as unset. A greedy call puts the ones it did
# not pass back to these: a -Chat config's top_p 0.8 / top_k 0 would otherwise make generate() warn that
# they are ignored, and None is no way to unset them (generate() refills None from model.generation_config).
SAMPLING_ONLY_NEUTRAL = {
    "temperature": 1.0, "top_p": 1.0, "top_k": 50, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
}


# ----- contexts -----------------------------------------------------------------------------------


def make_context(
    tokenizer,
    query: str,
    history: Sequence[tuple[str, str]] | None = None,
    system: str = "",
    max_window_size: int = 6144,
    chat_format: str = "chatml",
) -> tuple[str, list[int]]:
    """Build the prompt text and ids for ``query`` after ``history``.

    ChatML: ``<|im_start|>system\\n{system}<|im_end|>``, then each kept turn as user/assistant
    blocks, then the query and an open assistant block. History is kept newest first while
    system + turn + kept turns stay strictly under ``max_window_size`` tokens (the query is not
    counted), and dropped from the first turn that does not fit. ``raw`` is the bare query.
    """
    if chat_format == "raw":
        return query, tokenizer.encode(query, allowed_special=set())
    if chat_format != "chatml":
        raise ValueError(f"Unknown chat format {chat_format!r}; use 'chatml' or 'raw'.")
    im_start, im_end, nl = [tokenizer.im_start_id], [tokenizer.im_end_id], tokenizer.encode("\n")

    def block(role: str, content: str) -> tuple[str, list[int]]:
        ids = tokenizer.encode(role, allowed_special=set()) + nl + tokenizer.encode(content, allowed_special=set())
        return f"<|im_start|>{role}\n{content}<|im_end|>", im_start + ids + im_end

    system_text, system_ids = block("system", system)
    kept_text, kept_ids = "", []
    for turn_query, turn_response in reversed(list(history or [])):
        q_text, q_ids = block("user", turn_query)
        r_text, r_ids = block("assistant", turn_response)
        turn_ids = nl + q_ids + nl + r_ids
        if len(system_ids) + len(turn_ids) + len(kept_ids) >= max_window_size:
            break
        kept_ids = turn_ids + kept_ids
        kept_text = f"\n{q_text}\n{r_text}" + kept_text
    q_text, q_ids = block("user", query)
    raw_text = f"{system_text}{kept_text}\n{q_text}\n<|im_start|>assistant\n"
    ids = system_ids + kept_ids + nl + q_ids + nl + im_start + tokenizer.encode("assistant") + nl
    return raw_text, ids


def get_stop_words_ids(chat_format: str, tokenizer) -> list[list[int]]:
    """The stop sequences a chat format always needs."""
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    if chat_format == "raw":
        return [[tokenizer.eod_id]]
    raise ValueError(f"Unknown chat format {chat_format!r}; use 'chatml' or 'raw'.")


def normalize_stop_words(stop_words: Sequence[Any] | None) -> tuple[list[list[int]], list[str]]:
    """Split user stop words into id sequences and strings (a single int is a one-token sequence)."""
    ids, texts = [], []
    for word in stop_words or []:
        if isinstance(word, str):
            texts.append(word)
        elif isinstance(word, int):
            ids.append([word])
        else:
            ids.append([int(i) for i in word])
    return ids, texts


# ----- stopping and decoding ----------------------------------------------------------------------


def find_stop(tokens: Sequence[int], stop_ids: Sequence[Sequence[int]]) -> int | None:
    """Index where the first complete stop sequence starts in ``tokens``, or None."""
    tokens = list(tokens)
    starts = [
        i
        for seq in stop_ids
        if seq
        for i in (j for j, t in enumerate(tokens) if t == seq[0] and tokens[j : j + len(seq)] == list(seq))
    ]
    return min(starts) if starts else None


def cut_text(text: str, stop_texts: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` before the first stop string; say whether one was found."""
    hits = [i for i in (text.find(s) for s in stop_texts if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def stable_text(text: str, stop_texts: Sequence[str]) -> str:
    """The part of a growing text that is safe to show: no trailing half of a UTF-8 character and
    no trailing prefix of a stop string (it may still turn into the stop)."""
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stop_texts:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold]


def decode_response(tokenizer, generated: Sequence[int], stop_ids, stop_texts, errors: str = "replace") -> str:
    """Text of the generated ids before the first stop (id sequence or string), stripped."""
    cut = find_stop(generated, stop_ids)
    text = tokenizer.decode(list(generated[:cut] if cut is not None else generated), errors=errors)
    return cut_text(text, stop_texts)[0].strip()


def decode_tokens(
    tokens: torch.Tensor | Sequence[int],
    tokenizer,
    raw_text_len: int,
    context_length: int,
    chat_format: str,
    verbose: bool = False,
    return_end_reason: bool = False,
    errors: str = "replace",
) -> str | tuple[str, str]:
    """The original helper: the response in ``tokens`` after ``context_length`` prompt ids.

    ``raw_text_len`` is accepted for compatibility; the response is decoded from the generated ids
    directly, which does not depend on the prompt decoding back to the same length.
    """
    tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    generated = tokens[context_length:]
    stops = get_stop_words_ids(chat_format, tokenizer)
    cut = find_stop(generated, stops)
    reason = f"Gen {tokenizer.decode(generated[cut])!r}" if cut is not None else f"Gen length {len(generated)}"
    response = decode_response(tokenizer, generated, stops, [], errors)
    if verbose:
        print(f"\nEnd reason: {reason}\nResponse: {response}")
    return (response, reason) if return_end_reason else response


class StopWordsCriteria(StoppingCriteria):
    """Per-row stop on any stop id sequence or stop string in the generated part, or on cancel."""

    def __init__(self, tokenizer, prompt_len: int, stop_ids, stop_texts, cancel: threading.Event | None = None):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len
        self.stop_ids, self.stop_texts, self.cancel = stop_ids, stop_texts, cancel
        self.tail = max([len(s) for s in stop_ids] + [len(s) + 8 for s in stop_texts] + [1])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.cancel is not None and self.cancel.is_set():
            return ~done
        for row, ids in enumerate(input_ids[:, self.prompt_len :].tolist()):
            tail = ids[-self.tail :]
            if any(tail[-len(s) :] == s for s in self.stop_ids if len(tail) >= len(s)):
                done[row] = True
            elif self.stop_texts and cut_text(self.tokenizer.decode(tail), self.stop_texts)[1]:
                done[row] = True
        return done


# ----- chat ---------------------------------------------------------------------------------------


def _chat_setup(model, tokenizer, queries, histories, systems, stop_words_ids, generation_config, kwargs):
    """Shared by chat, chat_stream and batch_chat: contexts, stop words and generate() arguments."""
    config = copy.deepcopy(generation_config or model.generation_config)
    chat_format = getattr(config, "chat_format", None) or "chatml"
    if chat_format != "chatml":
        raise ValueError(
            f"chat() needs a chat model, but this generation config has chat_format {chat_format!r} (a base "
            "model). Use model.generate() for a base model, or load a -Chat checkpoint."
        )
    max_window_size = kwargs.pop("max_window_size", None) or getattr(config, "max_window_size", 6144)
    seed = kwargs.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    # Generation settings given as arguments override the config; the rest go to generate().
    greedy = not kwargs.get("do_sample", config.do_sample)
    leftover = config.update(**({**SAMPLING_ONLY_NEUTRAL, **kwargs} if greedy else kwargs))
    kwargs.clear()
    kwargs.update(leftover)
    contexts = [
        make_context(tokenizer, q, h, DEFAULT_SYSTEM if s is None else s, max_window_size, chat_format)[1]
        for q, h, s in zip(queries, histories, systems, strict=True)
    ]
    stop_ids, stop_texts = normalize_stop_words(stop_words_ids)
    stop_ids += get_stop_words_ids(chat_format, tokenizer)
    # generate() also ends a row on the config's eos (<|endoftext|>): cut the response there too.
    eos = config.eos_token_id
    stop_ids += [[e] for e in ([eos] if isinstance(eos, int) else eos or [])]
    return config, contexts, stop_ids, stop_texts


def _generate_inputs(model, tokenizer, contexts: list[list[int]]) -> dict[str, torch.Tensor]:
    """Left-pad the contexts into one batch (pad id: <|extra_0|>, never attended)."""
    pad_id = tokenizer.special_tokens["<|extra_0|>"]
    width = max(len(c) for c in contexts)
    ids = torch.tensor([[pad_id] * (width - len(c)) + c for c in contexts], device=model.device)
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=model.device)
    return {"input_ids": ids, "attention_mask": mask}


def chat(
    model,
    tokenizer,
    query: str,
    history: History | None = None,
    system: str | None = DEFAULT_SYSTEM,
    stop_words_ids: Sequence[Any] | None = None,
    generation_config: GenerationConfig | None = None,
    **kwargs: Any,
) -> tuple[str, History]:
    """One chat turn: ``(response, history + [(query, response)])``; ``history`` is not modified."""
    return batch_chat(model, tokenizer, [query], [history], [system], stop_words_ids, generation_config, **kwargs)[0]


def batch_chat(
    model,
    tokenizer,
    queries: Sequence[str],
    histories: Sequence[History | None] | None = None,
    systems: Sequence[str | None] | None = None,
    stop_words_ids: Sequence[Any] | None = None,
    generation_config: GenerationConfig | None = None,
    **kwargs: Any,
) -> list[tuple[str, History]]:
    """Many chat turns in one left-padded ``generate()``; each result equals ``chat()`` alone (greedy).

    None, for ``histories``/``systems`` or one of their items, means no history / the default system prompt."""
    histories = list(histories) if histories is not None else [None] * len(queries)
    systems = list(systems) if systems is not None else [None] * len(queries)
    config, contexts, stop_ids, stop_texts = _chat_setup(
        model, tokenizer, queries, histories, systems, stop_words_ids, generation_config, kwargs
    )
    inputs = _generate_inputs(model, tokenizer, contexts)
    width = inputs["input_ids"].shape[1]
    criteria = StoppingCriteriaList([StopWordsCriteria(tokenizer, width, stop_ids, stop_texts)])
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=config, stopping_criteria=criteria, **kwargs)
    results = []
    for row, (query, history) in enumerate(zip(queries, histories, strict=True)):
        response = decode_response(tokenizer, out[row, width:].tolist(), stop_ids, stop_texts)
        results.append((response, list(history or []) + [(query, response)]))
    return results


class _QueueStreamer(BaseStreamer):
    """Hands generated ids from generate()'s thread to the consumer."""

    def __init__(self, prompt_len: int) -> None:
        self.queue: Queue = Queue()
        self.skip = prompt_len > 0

    def put(self, value: torch.Tensor) -> None:
        if self.skip:  # the first put() is the prompt
            self.skip = False
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


def chat_stream(
    model,
    tokenizer,
    query: str,
    history: History | None = None,
    system: str | None = DEFAULT_SYSTEM,
    stop_words_ids: Sequence[Any] | None = None,
    generation_config: GenerationConfig | None = None,
    **kwargs: Any,
) -> Iterator[str]:
    """Yield the growing response text as tokens arrive; the last value equals ``chat()``'s response.

    Closing the iterator early stops the generation.
    """
    config, contexts, stop_ids, stop_texts = _chat_setup(
        model, tokenizer, [query], [history], [system], stop_words_ids, generation_config, kwargs
    )
    inputs = _generate_inputs(model, tokenizer, contexts)
    cancel = threading.Event()
    streamer = _QueueStreamer(inputs["input_ids"].shape[1])
    criteria = StoppingCriteriaList(
        [StopWordsCriteria(tokenizer, inputs["input_ids"].shape[1], stop_ids, stop_texts, cancel)]
    )
    errors: list[BaseException] = []
    adapters = active_groups()  # the caller's use_lora, for generate()'s thread

    def run() -> None:
        try:
            with torch.no_grad(), use_lora(adapters):
                model.generate(
                    **inputs, generation_config=config, stopping_criteria=criteria, streamer=streamer, **kwargs
                )
        except BaseException as exc:  # re-raised in the consumer's thread
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    generated: list[int] = []
    shown = ""
    try:
        while (ids := streamer.queue.get()) is not None:
            generated += ids
            cut = find_stop(generated, stop_ids)
            text = tokenizer.decode(generated[:cut] if cut is not None else generated)
            text, stopped = cut_text(text, stop_texts)
            visible = (text if stopped or cut is not None else stable_text(text, stop_texts)).lstrip()
            if visible != shown and len(visible) > len(shown):
                shown = visible
                yield shown
        if errors:
            raise errors[0]
        final = decode_response(tokenizer, generated, stop_ids, stop_texts)
        if final != shown:
            yield final
    finally:
        cancel.set()
        thread.join()
