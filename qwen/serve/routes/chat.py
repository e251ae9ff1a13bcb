"""``POST /v1/chat/completions``: the messages (and tools) as a ChatML prompt, generated into one response or
a stream of SSE chunks; a ReAct tool call in the reply comes back as OpenAI's ``tool_calls`` (or the legacy
``function_call``). The request path is told in ``qwen.serve.app``."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from sse_starlette.sse import EventSourceResponse

from ...engine import Sequence
from ...grammar import lark_grammar
from ..errors import APIError
from ..prompting import OBSERVATION_STOP, PromptError, ReactStream, build_chat_prompt, forced_call_grammar, parse_react
from ..protocol import ChatCompletionRequest
from ..responses import (
    call_deltas,
    check_errors,
    finish_reason,
    logprob_entries,
    run_to_completion,
    tool_call_message,
    usage,
)
from ..sampling_request import check_request, sampling
from ..state import State, require_auth

router = APIRouter(dependencies=[Depends(require_auth)])


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State) -> dict | EventSourceResponse:
    engine, tokenizer = state.engine, state.tokenizer
    adapter = check_request(state, body, request, "chat")
    try:
        prompt = build_chat_prompt(tokenizer, body)
    except PromptError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    stops = list(body.stop) + ([OBSERVATION_STOP] if prompt.functions else [])
    top = body.top_logprobs if body.logprobs else None
    if body.logprobs and top is None:
        top = 0
    params = sampling(state, body, len(prompt.ids), body.max_completion_tokens or body.max_tokens, stops, top)
    forced = forced_call_grammar(prompt)
    if forced is not None:  # tool_choice "required" or named: the reply is a call of an offered tool
        if body.response_format is not None and body.response_format.type != "text":
            raise APIError(400, "A forced tool call (tool_choice) cannot also follow response_format; "
                                "send one of them.", param="response_format")
        try:
            call_grammar = lark_grammar(forced)
        except ValueError as exc:  # an unsatisfiable schema, or a strict one with a keyword that cannot be enforced
            raise APIError(400, f"A forced call's arguments cannot follow the tool's parameters schema: {exc}. Fix "
                                "the schema (with strict: false a keyword that cannot be enforced is ignored).",
                           param="tools") from None
        for p in params:
            p.grammar = call_grammar
    legacy = bool(body.functions) and not body.tools
    call_reason = "function_call" if legacy else "tool_calls"
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    requests = [(prompt.ids, p) for p in params]

    if not body.stream:
        seqs = await run_to_completion(engine, requests, request, adapter)
        check_errors(seqs)
        choices = []
        for i, seq in enumerate(seqs):
            message: dict[str, Any] = {"role": "assistant", "content": seq.text}
            reason = finish_reason(seq)
            if prompt.functions:
                parsed = parse_react(prompt.prefill + seq.text, cut=reason == "length")
                message["content"] = parsed.content
                if parsed.call is not None:  # the call's Thought is reasoning, not an answer (see call_deltas)
                    message.update(content=None, reasoning_content=parsed.content,
                                   **tool_call_message(parsed.call, legacy))
                    reason = call_reason if reason != "length" else reason
            choice = {"index": i, "message": message, "finish_reason": reason, "logprobs": None}
            if body.logprobs:
                choice["logprobs"] = {"content": logprob_entries(tokenizer, seq)}
            choices.append(choice)
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": choices, "usage": usage(request, len(prompt.ids), seqs, body.n)}

    def chunk(index: int, delta: dict, reason: str | None = None, logprobs: Any = None) -> str:
        return json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                           "choices": [{"index": index, "delta": delta, "finish_reason": reason,
                                        "logprobs": logprobs}]}, ensure_ascii=False)

    async def events() -> AsyncIterator[str]:
        react = [ReactStream(prompt.prefill) for _ in params]
        logged = [0] * len(params)
        seqs: dict[int, Sequence] = {}
        for i in range(len(params)):
            yield chunk(i, {"role": "assistant", "content": ""})
        try:
            async for i, seq, text, finished in engine.stream_many(requests, adapter):
                seqs[i] = seq
                content = react[i].feed(text) if prompt.functions else text
                if content:
                    logprobs = None
                    if body.logprobs:
                        logprobs = {"content": logprob_entries(tokenizer, seq)[logged[i]:]}
                        logged[i] = len(seq.logprobs)
                    yield chunk(i, {"content": content}, logprobs=logprobs)
                if not finished:
                    continue
                check_errors([seq])
                reason = finish_reason(seq)
                if prompt.functions:
                    parsed = react[i].finish(cut=reason == "length")
                    if parsed.call is not None:
                        reason = call_reason if reason != "length" else reason
                        for piece in call_deltas(parsed, legacy):
                            yield chunk(i, piece)
                    elif parsed.content:
                        yield chunk(i, {"content": parsed.content})
                yield chunk(i, {}, reason)
        except APIError as exc:
            yield json.dumps(exc.body())
            return
        used = usage(request, len(prompt.ids), [seqs[i] for i in sorted(seqs)], body.n)
        if body.stream_options and body.stream_options.include_usage:
            yield json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                              "model": body.model, "choices": [], "usage": used})
        yield "[DONE]"

    return EventSourceResponse(events(), ping=15)
