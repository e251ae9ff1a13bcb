"""From a generation request (chat or text completion) to what the engine runs: the adapter its ``model``
names, the checks that it can be served now, and its fields as one ``SamplingParams`` per choice."""

from __future__ import annotations

import logging

from fastapi import Request

from ..grammar import response_format_grammar
from ..lora import LoraAdapter
from ..sampling import SamplingParams
from .access_log import record
from .errors import APIError
from .protocol import SamplingFields
from .state import ServerState

logger = logging.getLogger("qwen.serve")

def check_model(state: ServerState, name: str) -> LoraAdapter | None:
    """The adapter a model name picks (None: the base model); an unknown name is OpenAI's 404."""
    if name == state.model_name:
        return None
    adapters = state.adapters
    if adapters is not None and (adapter := adapters.get(name)) is not None:
        return adapter
    served = [state.model_name] + [a.name for a in (adapters.loaded() if adapters else [])]
    raise APIError(404, f"The model {name!r} does not exist; this server serves "
                        f"{', '.join(repr(n) for n in served)}.", code="model_not_found", param="model")


def check_request(state: ServerState, body: SamplingFields, request: Request, kind: str) -> LoraAdapter | None:
    """The model exists (returns its adapter, if it is one), every field set is one this server honours (or
    harmlessly ignores), and there is room in the queue; with ``--log-requests`` the body of the ``kind``
    ("chat", "completion") of request is logged once it passed."""
    adapter = check_model(state, body.model)
    record(request.state, model=body.model)
    if request.app.state.draining:
        raise APIError(503, "The server is shutting down; send the request to another instance or retry later.",
                       "server_error", "shutting_down")
    unknown = sorted(body.model_extra or {})
    if unknown:
        raise APIError(400, f"Unsupported field(s): {', '.join(unknown)}. This server does not implement "
                            "them; remove them from the request.", param=unknown[0])
    engine = state.engine
    if state.max_queue is not None and len(engine.waiting) >= state.max_queue:
        raise APIError(503, f"The server is busy: {len(engine.waiting)} requests are waiting. Retry shortly.",
                       "server_error", "overloaded")
    if state.log_requests:
        logger.info("%s request: %s", kind, body.model_dump_json(exclude_none=True))
    return adapter


def sampling(state: ServerState, body: SamplingFields, prompt_len: int, max_tokens: int | None, stops: list[str],
             logprobs: int | None) -> list[SamplingParams]:
    """The ``SamplingParams`` of each of the request's ``n`` choices for a prompt of ``prompt_len`` tokens (the
    request's fields, else the checkpoint's generation config); 400 if the context has no room for them."""
    engine, generation = state.engine, state.generation
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
        stop_token_ids=state.stop_token_ids,
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
