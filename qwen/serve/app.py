"""The OpenAI-compatible HTTP app: routes, auth, errors, streaming; generation is the engine's.

``create_app`` builds the app: the server's state (``state``), the middlewares, the error handlers (``errors``)
and the routers (``routes``: a module per group of URLs). Request path of a chat completion
(``routes.chat``): validate the body (``protocol``) -> check the model id (the base model's name, or a LoRA
adapter's: ``qwen.lora.AdapterRegistry``) -> build prompt ids from the messages (``prompting``) -> turn the
request fields into per-choice ``SamplingParams`` (``sampling_request``) -> ``Engine.stream_many`` (continuous
batching with every other request, each row with its own adapter or none) -> collect into one response, or
forward as SSE chunks (``responses``). Client mistakes are 4xx with an OpenAI-style ``{"error": {...}}`` body
(``errors``); a client that disconnects mid-stream has its generation cancelled.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ..engine import Engine
from ..lora import AdapterRegistry
from .access_log import AccessLog
from .errors import install_error_handlers
from .metrics import Metrics
from .response_store import MAX_STORED_RESPONSES, ResponseStore
from .routes import admin, chat, completions, models, responses_api, tokenize
from .state import ServerState


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
    max_stored_responses: int = MAX_STORED_RESPONSES,
) -> FastAPI:
    """Build the app around an engine (started and stopped with the app). With ``max_queue``, a request
    arriving while that many wait for a batch slot is answered 503 at once (with Retry-After), so an
    overload shows as quick refusals instead of ever-growing latency and memory. ``adapters``: the LoRA
    adapters a request's ``model`` may name (loaded and unloaded at run time; none: the base model only).
    ``log_json``: the access log's lines as JSON (see ``access_log``); ``metrics_public``: ``/metrics`` answers
    without the API keys (for a scraper inside a trusted network); ``max_stored_responses``: how many Responses API
    responses are kept for ``previous_response_id`` (0: none)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="Qwen OpenAI-compatible API", lifespan=lifespan)
    app.state.draining = False  # set on SIGTERM (qwen.serve.shutdown.DrainingServer): new requests get 503
    metrics = Metrics(engine)
    app.state.server = ServerState(engine, model_name, metrics, adapters=adapters, max_queue=max_queue,
                                   log_requests=log_requests, api_keys=set(api_keys or ()), basic_auth=basic_auth,
                                   metrics_public=metrics_public,
                                   responses=ResponseStore(max_stored_responses))
    app.add_middleware(AccessLog, json_format=log_json, on_response=metrics.response)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    install_error_handlers(app)
    for group in (admin, models, tokenize, chat, completions, responses_api):
        app.include_router(group.router)
    return app
