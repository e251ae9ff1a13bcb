"""``POST /v1/completions``: text completions of one or more prompts (text or token ids), with ``echo``,
``best_of`` and the legacy logprobs object; ``echo`` with ``logprobs`` and ``max_tokens`` 0 scores a prompt
(as lm-eval's loglikelihood does)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from sse_starlette.sse import EventSourceResponse

from ...engine import Sequence
from ...sampling import SamplingParams
from ..errors import APIError
from ..protocol import CompletionRequest
from ..responses import check_errors, finish_reason, legacy_logprobs, run_to_completion, token_text, usage
from ..sampling_request import check_request, sampling
from ..state import ServerState, State, require_auth

router = APIRouter(dependencies=[Depends(require_auth)])


def completion_prompts(state: ServerState, body: CompletionRequest) -> list[tuple[list[int], str]]:
    """(ids, text) of each prompt: text is encoded as plain text (special-token look-alikes too),
    token ids are taken as given."""
    tokenizer, vocab_size = state.tokenizer, state.engine.config.vocab_size
    raw = body.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    prompts = []
    for item in raw:
        if isinstance(item, str):
            ids = tokenizer.encode(item, allowed_special=set())
        else:
            ids = list(item)
            if any(not 0 <= t < vocab_size for t in ids):
                raise APIError(400, f"A prompt has token ids outside [0, {vocab_size}).", param="prompt")
        if not ids:
            raise APIError(400, "A prompt is empty.", param="prompt")
        prompts.append((ids, item if isinstance(item, str) else tokenizer.decode(ids)))
    return prompts


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, state: State) -> dict | EventSourceResponse:
    engine, tokenizer = state.engine, state.tokenizer
    adapter = check_request(state, body, request, "completion")
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported: Qwen v1 was not trained for it.",
                       param="suffix")
    best_of = body.best_of or body.n
    if best_of < body.n:
        raise APIError(400, f"best_of ({best_of}) must be at least n ({body.n}).", param="best_of")
    if best_of > body.n and body.stream:
        raise APIError(400, "best_of cannot be combined with stream.", param="best_of")
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 generates nothing; set echo=true (with logprobs) to score the prompt.",
                       param="max_tokens")
    prompts = completion_prompts(state, body)
    scored = body.echo and body.logprobs is not None
    generate = body.max_tokens != 0
    requests = []
    if generate:
        # best_of > n: each candidate keeps its tokens' logprobs for ranking.
        want = body.logprobs if body.logprobs is not None else (0 if best_of > body.n else None)
        body_n = body.model_copy(update={"n": best_of})
        for ids, _ in prompts:
            requests += [(ids, p) for p in sampling(state, body_n, len(ids), body.max_tokens, list(body.stop), want)]
    echo_logprobs = []
    if scored:  # the engine scores each prompt first (its keys then serve the generation from the prefix cache)
        score = SamplingParams(max_new_tokens=0, prompt_logprobs=body.logprobs, priority=body.priority)
        scoring = await run_to_completion(engine, [(ids, score) for ids, _ in prompts], request, adapter)
        check_errors(scoring)
        echo_logprobs = [seq.prompt_logprobs for seq in scoring]
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prompt_tokens = sum(len(ids) for ids, _ in prompts)

    def echoed(p: int) -> list:
        ids = prompts[p][0]
        return [(t, lp, None if k == 0 else alts) for k, (t, (lp, alts)) in enumerate(
            zip(ids, echo_logprobs[p], strict=True))]

    def choice_logprobs(p: int, seq: Sequence | None) -> dict | None:
        if body.logprobs is None:
            return None
        entries = (echoed(p) if body.echo else []) + (
            [(t, lp, alts) for t, lp, alts in seq.logprobs] if seq is not None else [])
        return legacy_logprobs(tokenizer, entries, 0)

    def prefix(p: int) -> str:
        return prompts[p][1] if body.echo else ""

    if not body.stream:
        seqs = await run_to_completion(engine, requests, request, adapter) if requests else []
        check_errors(seqs)
        choices = []
        for p in range(len(prompts)):
            candidates = seqs[p * best_of:(p + 1) * best_of] or [None] * body.n
            if best_of > body.n:  # the n candidates with the highest mean token logprob
                candidates = sorted(candidates, key=lambda s: -sum(lp for _, lp, _ in s.logprobs)
                                    / max(len(s.logprobs), 1))[:body.n]
            for seq in candidates:
                choices.append({"index": len(choices), "text": prefix(p) + (seq.text if seq else ""),
                                "finish_reason": finish_reason(seq) if seq else "length",
                                "logprobs": choice_logprobs(p, seq)})
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": choices, "usage": usage(request, prompt_tokens, seqs, best_of)}

    async def events() -> AsyncIterator[str]:
        def chunk(i: int, text: str, reason: str | None, logprobs: dict | None = None) -> str:
            return json.dumps({"id": rid, "object": "text_completion", "created": created, "model": body.model,
                               "choices": [{"index": i, "text": text, "finish_reason": reason,
                                            "logprobs": logprobs}]}, ensure_ascii=False)

        seqs: dict[int, Sequence] = {}
        offsets = [len(prefix(i // body.n)) for i in range(len(prompts) * body.n)]
        logged = [0] * len(offsets)
        for i in range(len(offsets)):  # the echoed prompt first, then the generated text
            p = i // body.n
            if body.echo:
                lead = legacy_logprobs(tokenizer, echoed(p), 0) if scored else None
                yield chunk(i, prefix(p), None if generate else "length", lead)
        try:
            async for i, seq, text, finished in engine.stream_many(requests, adapter):
                seqs[i] = seq
                logprobs = None
                if body.logprobs is not None and len(seq.logprobs) > logged[i]:
                    new = seq.logprobs[logged[i]:]
                    logprobs = legacy_logprobs(tokenizer, new, offsets[i])
                    offsets[i] += len(b"".join(token_text(tokenizer, t) for t, _, _ in new).decode("utf-8", "replace"))
                    logged[i] = len(seq.logprobs)
                if text or logprobs:
                    yield chunk(i, text, None, logprobs)
                if finished:
                    check_errors([seq])
                    yield chunk(i, "", finish_reason(seq))
        except APIError as exc:
            yield json.dumps(exc.body())
            return
        used = usage(request, prompt_tokens, [seqs[i] for i in sorted(seqs)], best_of)
        if body.stream_options and body.stream_options.include_usage:
            yield json.dumps({"id": rid, "object": "text_completion", "created": created, "model": body.model,
                              "choices": [], "usage": used})
        yield "[DONE]"

    return EventSourceResponse(events(), ping=15)
