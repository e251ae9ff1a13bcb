"""The OpenAI-compatible HTTP app: routes, auth, errors, streaming; generation is the engine's.

Request path of a chat completion: validate the body (``protocol``) -> check the model id (the base
model's name, or a LoRA adapter's: ``qwen.lora.AdapterRegistry``) -> build prompt ids from the messages
(``prompting``) -> turn the request fields into per-choice ``SamplingParams`` -> ``Engine.stream_many``
(continuous batching with every other request, each row with its own adapter or none) -> collect into one
response, or forward as SSE chunks. Client mistakes are 4xx with an OpenAI-style ``{"error": {...}}`` body; a
client that disconnects mid-stream has its generation cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sse_starlette.sse import EventSourceResponse

from ..engine import Engine, Sequence
from ..grammar import lark_grammar, response_format_grammar
from ..lora import AdapterError, AdapterRegistry, LoraAdapter
from ..sampling import SamplingParams
from .access_log import AccessLog, record
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .prompt_logprobs import prompt_logprobs, text_offsets
from .prompting import OBSERVATION_STOP, PromptError, ReactStream, build_chat_prompt, forced_call_grammar, parse_react
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoraRequest,
    SamplingFields,
    TokenizeRequest,
    UnloadLoraRequest,
)

logger = logging.getLogger("qwen.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _auth_dependency(api_keys: set[str], basic_auth: str | None):
    async def check(request: Request) -> None:
        if not api_keys and not basic_auth:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        given = value.encode("utf-8", "surrogateescape")  # compare bytes: any header text is safe
        if scheme.lower() == "bearer" and any(secrets.compare_digest(given, k.encode()) for k in api_keys):
            return
        if scheme.lower() == "basic" and basic_auth:
            try:
                decoded = base64.b64decode(given, validate=True)
            except binascii.Error:
                decoded = b""
            if secrets.compare_digest(decoded, basic_auth.encode()):
                return
        raise APIError(401, "Missing or wrong credentials: send 'Authorization: Bearer <key>' (or HTTP Basic).",
                       "authentication_error", "invalid_api_key")

    return check


def create_app(
    engine: Engine,
    model_name: str,
    *,
    api_keys: set[str] | None = None,
    basic_auth: str | None = None,
    cors_origins: list[str] | None = None,
    log_requests: bool = False,
    log_json: bool = False,
    metrics_public: bool = False,
    max_queue: int | None = None,
    adapters: AdapterRegistry | None = None,
) -> FastAPI:
    """Build the app around an engine (started and stopped with the app). With ``max_queue``, a request
    arriving while that many wait for a batch slot is answered 503 at once (with Retry-After), so an
    overload shows as quick refusals instead of ever-growing latency and memory. ``adapters``: the LoRA
    adapters a request's ``model`` may name (loaded and unloaded at run time; none: the base model only).
    ``log_json``: the access log's lines as JSON (see ``access_log``); ``metrics_public``: ``/metrics`` answers
    without the API keys (for a scraper inside a trusted network)."""
    tokenizer = engine.tokenizer
    generation = engine.model.generation_config
    stop_token_ids = [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="Qwen OpenAI-compatible API", lifespan=lifespan)
    app.state.draining = False  # set on SIGTERM (qwen.serve.main.DrainingServer): new requests get 503
    metrics = Metrics(engine)
    app.add_middleware(AccessLog, json_format=log_json, on_response=metrics.response)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    auth = [Depends(_auth_dependency(set(api_keys or ()), basic_auth))]

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 503:
            headers = {"Retry-After": "1"}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(APIError(400, "The request body is not valid JSON.").body(), status_code=400)
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg')}" for e in errors)
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.get("/metrics", dependencies=[] if metrics_public else auth, include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/health")
    async def health() -> dict:
        if app.state.draining:  # a load balancer stops sending requests here
            raise APIError(503, "The server is shutting down.", "server_error", "shutting_down")
        cache = engine.prefix_cache
        return {"status": "ok", "running": len(engine.running), "prefilling": len(engine.prefilling),
                "waiting": len(engine.waiting), "prefix_cache": asdict(cache.stats) if cache is not None else None}

    created_at = int(time.time())

    def model_card(adapter: LoraAdapter | None = None) -> dict:
        """An entry of /v1/models: the base model, or an adapter with its folder (root) and the base (parent)."""
        if adapter is None:
            return {"id": model_name, "object": "model", "created": created_at, "owned_by": "qwen",
                    "root": model_name, "parent": None, "max_model_len": engine.max_model_len}
        return {"id": adapter.name, "object": "model", "created": created_at, "owned_by": "qwen",
                "root": str(adapter.path), "parent": model_name, "max_model_len": engine.max_model_len}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        return {"object": "list", "data": [model_card()] + [model_card(a) for a in
                                                              (adapters.loaded() if adapters else [])]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def model(model_id: str) -> dict:
        return model_card(check_model(model_id))

    # ----- LoRA adapters at run time (vLLM's endpoints) ---------------------------------------------
    def registry() -> AdapterRegistry:
        if adapters is None:
            raise APIError(400, "This server does not load LoRA adapters; start it with --lora or --max-loras.")
        return adapters

    @app.post("/v1/load_lora_adapter", dependencies=auth)
    async def load_lora_adapter(body: LoadLoraRequest) -> PlainTextResponse:
        try:
            adapter = await asyncio.to_thread(registry().load, body.lora_name, body.lora_path)
        except AdapterError as exc:
            raise APIError(400, f"Cannot load LoRA adapter {body.lora_name!r}: {exc}", param="lora_path") from None
        logger.info("LoRA adapter %r loaded from %s (rank %d, %s, %.1f MiB)", adapter.name, adapter.path,
                    adapter.rank, "+".join(adapter.targets), adapter.nbytes / 2**20)
        return PlainTextResponse(f"Success: LoRA adapter '{adapter.name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=auth)
    async def unload_lora_adapter(body: UnloadLoraRequest) -> PlainTextResponse:
        try:
            registry().unload(body.lora_name)
        except KeyError:
            raise APIError(404, f"No LoRA adapter named {body.lora_name!r} is loaded.", code="model_not_found",
                           param="lora_name") from None
        logger.info("LoRA adapter %r unloaded", body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # ----- tokenizer endpoints (vLLM's), so clients such as lm-eval need no local tokenizer ---------
    @app.get("/tokenizer_info", dependencies=auth)
    async def tokenizer_info() -> dict:
        return {"tokenizer_class": type(tokenizer).__name__, "eos_token": "<|endoftext|>", "bos_token": None,
                "pad_token": "<|endoftext|>", "model_max_length": engine.max_model_len,
                "chat_template": getattr(tokenizer, "chat_template", None)}

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest) -> dict:
        """Text is encoded as the completions endpoint encodes a prompt (special-token look-alikes are
        text); messages as the chat endpoint builds its prompt."""
        if body.messages is not None:
            try:
                ids = build_chat_prompt(tokenizer, ChatCompletionRequest(model=model_name,
                                                                         messages=body.messages)).ids
            except PromptError as exc:
                raise APIError(400, str(exc), param=exc.param) from None
        elif body.prompt is not None:
            ids = tokenizer.encode(body.prompt, allowed_special=set())
        else:
            raise APIError(400, "Send a prompt (text) or messages to tokenize.", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest) -> dict:
        if any(not 0 <= t < engine.config.vocab_size for t in body.tokens):
            raise APIError(400, f"Token ids must be in [0, {engine.config.vocab_size}).", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    def check_request(body: SamplingFields, request: Request) -> LoraAdapter | None:
        """The model exists (returns its adapter, if it is one), every field set is one this server honours (or
        harmlessly ignores), and there is room in the queue."""
        adapter = check_model(body.model)
        record(request.state, model=body.model)
        if app.state.draining:
            raise APIError(503, "The server is shutting down; send the request to another instance or retry later.",
                           "server_error", "shutting_down")
        unknown = sorted(body.model_extra or {})
        if unknown:
            raise APIError(400, f"Unsupported field(s): {', '.join(unknown)}. This server does not implement "
                                "them; remove them from the request.", param=unknown[0])
        if max_queue is not None and len(engine.waiting) >= max_queue:
            raise APIError(503, f"The server is busy: {len(engine.waiting)} requests are waiting. Retry shortly.",
                           "server_error", "overloaded")
        return adapter

    def check_model(name: str) -> LoraAdapter | None:
        """The adapter a model name picks (None: the base model); an unknown name is OpenAI's 404."""
        if name == model_name:
            return None
        if adapters is not None and (adapter := adapters.get(name)) is not None:
            return adapter
        served = [model_name] + [a.name for a in (adapters.loaded() if adapters else [])]
        raise APIError(404, f"The model {name!r} does not exist; this server serves "
                            f"{', '.join(repr(n) for n in served)}.", code="model_not_found", param="model")

    def sampling(body: SamplingFields, prompt_len: int, max_tokens: int | None, stops: list[str],
                 logprobs: int | None) -> list[SamplingParams]:
        room = engine.max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"The prompt has {prompt_len} tokens, which fills the model's context of "
                                f"{engine.max_model_len} tokens; shorten the messages.", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"This model's context is {engine.max_model_len} tokens: the prompt takes "
                                f"{prompt_len}, so at most {room} can be generated, but max_tokens is {max_tokens}.",
                           code="context_length_exceeded", param="max_tokens")
        temperature = body.temperature if body.temperature is not None else getattr(generation, "temperature", 1.0)
        try:  # the grammar of a JSON response: max_tokens cutting it short is finish_reason "length"
            grammar = response_format_grammar(body.response_format and body.response_format.model_dump(by_alias=True))
        except ValueError as exc:
            raise APIError(400, str(exc), param="response_format") from None
        base = dict(
            max_new_tokens=max_tokens or min(room, generation.max_new_tokens or room),
            do_sample=bool(generation.do_sample) if body.temperature is None else body.temperature > 0,
            temperature=temperature or 1.0,
            top_p=body.top_p if body.top_p is not None else (generation.top_p or 1.0),
            top_k=body.top_k if body.top_k is not None else (generation.top_k or 0),
            repetition_penalty=body.repetition_penalty or generation.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            stop_token_ids=stop_token_ids,
            stop=stops,
            logprobs=logprobs,
            logit_bias={int(token): bias for token, bias in body.logit_bias.items()} if body.logit_bias else None,
            grammar=grammar,
            priority=body.priority,
        )
        # Choice i draws with seed + i; any integer a client sends maps into the generator's range.
        params = [SamplingParams(**base, seed=None if body.seed is None else (body.seed + i) % 2**63)
                  for i in range(body.n)]
        try:
            params[0].validate(engine.config.vocab_size)
        except ValueError as exc:
            raise APIError(400, str(exc), param="logit_bias" if "logit_bias" in str(exc) else None) from None
        return params

    def token_text(token_id: int) -> bytes:
        """A token's bytes (special tokens as their text; ids without a token as nothing)."""
        raw = tokenizer.decoder.get(token_id, b"")
        return raw.encode() if isinstance(raw, str) else raw

    def logprob_entries(seq: Sequence) -> list[dict]:
        def entry(token_id: int, logprob: float) -> dict:
            raw = token_text(token_id)
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

        return [
            {**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]} for t, lp, alts in seq.logprobs
        ]

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

    def finish_reason(seq: Sequence) -> str:
        """OpenAI's finish reason; "abort" (vLLM's) for a request the server stopped (shutting down)."""
        return {"length": "length", "cancelled": "abort"}.get(seq.finish_reason, "stop")

    def check_errors(seqs: list[Sequence]) -> None:
        for seq in seqs:
            if seq.finish_reason and seq.finish_reason.startswith("error"):
                raise APIError(500, f"Generation failed: {seq.finish_reason[7:]}", "server_error")

    def tool_call_message(call: tuple[str, str], legacy: bool) -> dict:
        name, arguments = call
        if legacy:
            return {"function_call": {"name": name, "arguments": arguments}}
        return {"tool_calls": [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                "function": {"name": name, "arguments": arguments}}]}

    # ----- chat completions -----------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        adapter = check_request(body, request)
        if log_requests:
            logger.info("chat request: %s", body.model_dump_json(exclude_none=True))
        try:
            prompt = build_chat_prompt(tokenizer, body)
        except PromptError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        stops = list(body.stop) + ([OBSERVATION_STOP] if prompt.functions else [])
        top = body.top_logprobs if body.logprobs else None
        if body.logprobs and top is None:
            top = 0
        params = sampling(body, len(prompt.ids), body.max_completion_tokens or body.max_tokens, stops, top)
        forced = forced_call_grammar(prompt)
        if forced is not None:  # tool_choice "required" or named: the reply is a call of an offered tool
            if body.response_format is not None and body.response_format.type != "text":
                raise APIError(400, "A forced tool call (tool_choice) cannot also follow response_format; "
                                    "send one of them.", param="response_format")
            try:
                call_grammar = lark_grammar(forced)
            except ValueError as exc:  # a strict function's schema has a keyword that cannot be enforced
                raise APIError(400, f"A forced call's arguments cannot follow the strict parameters schema: {exc}. "
                                    "Drop the keyword, or send strict: false for best effort.", param="tools") from None
            for p in params:
                p.grammar = call_grammar
        legacy = bool(body.functions) and not body.tools
        call_reason = "function_call" if legacy else "tool_calls"
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        requests = [(prompt.ids, p) for p in params]

        if not body.stream:
            seqs = await _run(engine, requests, request, adapter)
            check_errors(seqs)
            choices = []
            for i, seq in enumerate(seqs):
                message: dict[str, Any] = {"role": "assistant", "content": seq.text}
                reason = finish_reason(seq)
                if prompt.functions:
                    parsed = parse_react(prompt.prefill + seq.text, cut=reason == "length")
                    message["content"] = parsed.content
                    if parsed.call is not None:  # the call's Thought is reasoning, not an answer (see _call_deltas)
                        message.update(content=None, reasoning_content=parsed.content,
                                       **tool_call_message(parsed.call, legacy))
                        reason = call_reason if reason != "length" else reason
                choice = {"index": i, "message": message, "finish_reason": reason, "logprobs": None}
                if body.logprobs:
                    choice["logprobs"] = {"content": logprob_entries(seq)}
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
                            logprobs = {"content": logprob_entries(seq)[logged[i]:]}
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
                            for piece in _call_deltas(parsed, legacy):
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

    # ----- text completions -----------------------------------------------------------------------
    def completion_prompts(body: CompletionRequest) -> list[tuple[list[int], str]]:
        """(ids, text) of each prompt: text is encoded as plain text (special-token look-alikes too),
        token ids are taken as given."""
        raw = body.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        prompts = []
        for item in raw:
            if isinstance(item, str):
                ids = tokenizer.encode(item, allowed_special=set())
            else:
                ids = list(item)
                if any(not 0 <= t < engine.config.vocab_size for t in ids):
                    raise APIError(400, f"A prompt has token ids outside [0, {engine.config.vocab_size}).",
                                   param="prompt")
            if not ids:
                raise APIError(400, "A prompt is empty.", param="prompt")
            prompts.append((ids, item if isinstance(item, str) else tokenizer.decode(ids)))
        return prompts

    def legacy_logprobs(entries: list[tuple[int, float | None, list[tuple[int, float]] | None]],
                        start: int) -> dict:
        """The completions API's logprobs object; offsets count characters from ``start``."""
        pieces = [token_text(t) for t, _, _ in entries]
        return {"tokens": [p.decode("utf-8", errors="replace") for p in pieces],
                "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if alts is None else {token_text(a).decode("utf-8", errors="replace"): alp
                                                            for a, alp in alts} for _, _, alts in entries],
                "text_offset": text_offsets(pieces, start)}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        adapter = check_request(body, request)
        if log_requests:
            logger.info("completion request: %s", body.model_dump_json(exclude_none=True))
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
        prompts = completion_prompts(body)
        scored = body.echo and body.logprobs is not None
        generate = body.max_tokens != 0
        requests = []
        if generate:
            # best_of > n: each candidate keeps its tokens' logprobs for ranking.
            want = body.logprobs if body.logprobs is not None else (0 if best_of > body.n else None)
            body_n = body.model_copy(update={"n": best_of})
            for ids, _ in prompts:
                requests += [(ids, p) for p in sampling(body_n, len(ids), body.max_tokens, list(body.stop), want)]
        echo_logprobs = [await asyncio.to_thread(prompt_logprobs, engine.model, ids, body.logprobs, adapter)
                         for ids, _ in prompts] if scored else []
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
            return legacy_logprobs(entries, 0)

        def prefix(p: int) -> str:
            return prompts[p][1] if body.echo else ""

        if not body.stream:
            seqs = await _run(engine, requests, request, adapter) if requests else []
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
                    lead = legacy_logprobs(echoed(p), 0) if scored else None
                    yield chunk(i, prefix(p), None if generate else "length", lead)
            try:
                async for i, seq, text, finished in engine.stream_many(requests, adapter):
                    seqs[i] = seq
                    logprobs = None
                    if body.logprobs is not None and len(seq.logprobs) > logged[i]:
                        new = seq.logprobs[logged[i]:]
                        logprobs = legacy_logprobs(new, offsets[i])
                        offsets[i] += len(b"".join(token_text(t) for t, _, _ in new).decode("utf-8", "replace"))
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

    return app


async def _run(engine: Engine, requests: list[tuple[list[int], SamplingParams]], client: Request,
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


def _call_deltas(parsed, legacy: bool) -> Iterator[dict]:
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
