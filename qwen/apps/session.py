"""Chat turns of the terminal and web apps, through the engine: a turn prefills only what the prefix cache
does not hold (in a chat, the new message), and several web users share each decode step.

``EngineChat.stream`` takes the arguments of ``model.chat_stream`` that the apps use (query, history, system,
a generation config, a seed) and yields the growing reply the same way; greedy replies are the same tokens.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator

from transformers import GenerationConfig

from ..chat import make_context
from ..engine import Engine
from ..lora import LoraAdapter
from ..sampling import SamplingParams


def sampling_from_config(config: GenerationConfig, stop_token_ids: list[int], room: int,
                         seed: int | None) -> SamplingParams:
    """The engine's settings for a Qwen generation config (a -Chat folder's, or one changed with ``:conf``):
    at most ``room`` new tokens, the rest of the context."""
    return SamplingParams(
        max_new_tokens=min(config.max_new_tokens or room, room),
        do_sample=bool(config.do_sample),
        temperature=config.temperature or 1.0,
        top_p=config.top_p if config.top_p is not None else 1.0,
        top_k=config.top_k or 0,
        repetition_penalty=config.repetition_penalty or 1.0,
        stop_token_ids=stop_token_ids,
        seed=seed,
    )


class EngineChat:
    """One engine, started in its own thread, serving the chat turns of every user of an app (with the LoRA
    ``adapter``, if one; ``engine_kw`` go to ``Engine``, e.g. the flags' ``qwen.loading.engine_settings``)."""

    def __init__(self, model, tokenizer, max_batch_size: int = 4, adapter: LoraAdapter | None = None,
                 **engine_kw) -> None:
        self.tokenizer, self.adapter = tokenizer, adapter
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size, **engine_kw).start()
        self.stop_token_ids = [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]

    def stream(self, query: str, history: list[tuple[str, str]], system: str, config: GenerationConfig,
               seed: int | None = None) -> Iterator[str]:
        """Yield the growing reply; closing the iterator early cancels the turn. Bad settings raise ValueError
        before anything is generated; a failed generation raises RuntimeError."""
        window = getattr(config, "max_window_size", None) or 6144
        _, prompt = make_context(self.tokenizer, query, history, system, window)
        room = self.engine.max_model_len - len(prompt)
        if room < 1:
            raise ValueError(f"the conversation fills the model's context of {self.engine.max_model_len} tokens: "
                             "clear the history")
        events: queue.Queue[tuple[str, bool]] = queue.Queue()
        seq = self.engine.submit(prompt, sampling_from_config(config, self.stop_token_ids, room, seed),
                                 lambda _, text, finished: events.put((text, finished)), self.adapter)
        reply = ""
        try:
            finished = False
            while not finished:
                text, finished = events.get()
                reply += text
                if text:
                    yield reply
            if seq.finish_reason.startswith("error"):
                raise RuntimeError(seq.finish_reason.removeprefix("error: "))
        finally:
            if not seq.done:
                self.engine.cancel(seq)

    def close(self) -> None:
        self.engine.stop()
