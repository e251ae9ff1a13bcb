"""The parts of a chat or text completion response made from the engine's finished sequences: finish reasons,
usage (and what the access log says of it), logprobs, tool calls; and running requests to their end for a
response that is not streamed."""

from __future__ import annotations

import asyncio
import codecs
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

from fastapi import Request

from ..engine import Engine, Sequence
from ..lora import LoraAdapter
from ..sampling import SamplingParams
from .access_log import record
from .errors import APIError
from .prompting import ParsedReply

if TYPE_CHECKING:
    from ..tokenizer import QWenTokenizer


async def run_to_completion(engine: Engine, requests: list[tuple[list[int], SamplingParams]], client: Request,
                            adapter: LoraAdapter | None) -> list[Sequence]:
    """Run requests to completion on the engine (with ``adapter``); if the client goes away first, cancel them."""
    seqs: dict[int, Sequence] = {}

    async def collect() -> None:
        async for i, seq, _, _ in engine.stream_many(requests, adapter):
            seqs[i] = seq

    task = asyncio.ensure_future(collect())
    while not task.done():
        await asyncio.wait([task], timeout=0.25)
        if not task.done() and await client.is_disconnected():
            task.cancel()  # stream_many's cleanup cancels the sequences
            raise APIError(499, "The client closed the request.")
    task.result()
    return [seqs[i] for i in range(len(requests))]


GRAMMAR_DEAD_END = ("The reply cannot go on in the required format (response_format's schema, or a forced tool "
                    "call's arguments): no token the format allows next was possible (the model gives them all "
                    "-inf logits, or the format has no way on). Loosen the schema, or ask without it.")


def check_errors(seqs: list[Sequence]) -> None:
    """A 400 if one of ``seqs`` could not follow its grammar (the request asked for the impossible), a 500 if the
    engine failed to generate one."""
    for seq in seqs:
        if seq.finish_reason == "grammar":
            raise APIError(400, GRAMMAR_DEAD_END)
        if seq.finish_reason and seq.finish_reason.startswith("error"):
            raise APIError(500, f"Generation failed: {seq.finish_reason[7:]}", "server_error")


def finish_reason(seq: Sequence) -> str:
    """OpenAI's finish reason; "abort" (vLLM's) for a request the server stopped (shutting down)."""
    return {"length": "length", "cancelled": "abort"}.get(seq.finish_reason, "stop")


def usage(request: Request, prompt_len: int, seqs: list[Sequence], copies: int) -> dict:
    """OpenAI's usage of ``seqs`` in request order, ``copies`` (n or best_of) per prompt: the prompt
    tokens counted once per prompt, and of those the ones the prefix cache supplied. Also what the request's
    access-log line says of them."""
    completion = sum(len(s.output_ids) for s in seqs)
    firsts = [s.first_token_time for s in seqs if s.first_token_time is not None]
    record(request.state, prompt_tokens=prompt_len, completion_tokens=completion,
           first_token=min(firsts, default=None))
    cached = sum(max(s.cached_tokens for s in seqs[i : i + copies]) for i in range(0, len(seqs), copies))
    return {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


# ----- logprobs -------------------------------------------------------------------------------------------


def text_offsets(pieces: list[bytes], start: int = 0) -> list[int]:
    """Character offset where each token's text begins in the decoded text (UTF-8 decoded across token
    boundaries: a character split over two tokens counts at the token that completes it)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, position = [], start
    for piece in pieces:
        offsets.append(position)
        position += len(decoder.decode(piece))
    return offsets


def token_text(tokenizer: QWenTokenizer, token_id: int) -> bytes:
    """A token's bytes (special tokens as their text; ids without a token as nothing)."""
    raw = tokenizer.decoder.get(token_id, b"")
    return raw.encode() if isinstance(raw, str) else raw


def logprob_entries(tokenizer: QWenTokenizer, seq: Sequence) -> list[dict]:
    """The chat API's logprobs ``content``: an entry per generated token, with its top alternatives."""

    def entry(token_id: int, logprob: float) -> dict:
        raw = token_text(tokenizer, token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return [
        {**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]} for t, lp, alts in seq.logprobs
    ]


def legacy_logprobs(tokenizer: QWenTokenizer,
                    entries: list[tuple[int, float | None, list[tuple[int, float]] | None]], start: int) -> dict:
    """The completions API's logprobs object; offsets count characters from ``start``."""

    def text(token_id: int) -> str:
        return token_text(tokenizer, token_id).decode("utf-8", errors="replace")

    pieces = [token_text(tokenizer, t) for t, _, _ in entries]
    return {"tokens": [p.decode("utf-8", errors="replace") for p in pieces],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if alts is None else {text(a): alp for a, alp in alts} for _, _, alts in entries],
            "text_offset": text_offsets(pieces, start)}


# ----- tool calls ---------------------------------------------------------------------------------------
def tool_call_message(call: tuple[str, str], legacy: bool) -> dict:
    """The fields of a non-streamed assistant message that calls a tool (``function_call`` if ``legacy``)."""
    name, arguments = call
    if legacy:
        return {"function_call": {"name": name, "arguments": arguments}}
    return {"tool_calls": [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                            "function": {"name": name, "arguments": arguments}}]}


def call_deltas(parsed: ParsedReply, legacy: bool) -> Iterator[dict]:
    """Stream one tool call the way OpenAI does: id/type/name first, then the arguments in pieces. The ReAct
    Thought before the call goes first, as ``reasoning_content`` (vLLM's name for it): agent frameworks that
    stream take the first ``content`` as the final answer and would never run the tool. The non-streamed
    message puts it in the same field."""
    name, arguments = parsed.call
    pieces = [arguments[i : i + 16] for i in range(0, len(arguments), 16)] or [""]
    if parsed.content:
        yield {"reasoning_content": parsed.content}
    if legacy:
        yield {"function_call": {"name": name, "arguments": ""}}
        for piece in pieces:
            yield {"function_call": {"arguments": piece}}
        return
    yield {"tool_calls": [{"index": 0, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                           "function": {"name": name, "arguments": ""}}]}
    for piece in pieces:
        yield {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
