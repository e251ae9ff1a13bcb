"""The server's state, which every route reads through a FastAPI dependency, and the API-key check.

``create_app`` builds one :class:`ServerState` per app and keeps it at ``app.state.server``; a route takes it
as a parameter typed :data:`State`. Draining (``qwen.serve.shutdown``) stays a flag on the app itself,
``app.state.draining``, which routes read from their request.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from ..engine import Engine
from ..lora import AdapterRegistry
from .errors import APIError
from .metrics import Metrics
from .response_store import MAX_STORED_RESPONSES, ResponseStore

if TYPE_CHECKING:
    from transformers import GenerationConfig

    from ..tokenizer import QWenTokenizer


@dataclass
class ServerState:
    """The engine and the model name it serves, the LoRA adapters a request's ``model`` may name (None: the
    base model only), and ``create_app``'s settings; the tokenizer, generation defaults and stop tokens are the
    engine's."""

    engine: Engine
    model_name: str
    metrics: Metrics
    adapters: AdapterRegistry | None = None
    max_queue: int | None = None
    log_requests: bool = False
    api_keys: set[str] = field(default_factory=set)
    basic_auth: str | None = None
    metrics_public: bool = False
    responses: ResponseStore = field(default_factory=lambda: ResponseStore(MAX_STORED_RESPONSES))
    created_at: int = field(default_factory=lambda: int(time.time()))
    tokenizer: QWenTokenizer = field(init=False)
    generation: GenerationConfig = field(init=False)
    stop_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.tokenizer = self.engine.tokenizer
        self.generation = self.engine.model.generation_config
        self.stop_token_ids = [self.tokenizer.im_end_id, self.tokenizer.im_start_id, self.tokenizer.eod_id]


def get_state(request: Request) -> ServerState:
    """The state of the app serving ``request`` (a FastAPI dependency)."""
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]


async def require_auth(request: Request, state: State) -> None:
    """Let the request through if no credentials are configured, or it sends one of the API keys as a Bearer
    token or the HTTP Basic user:password; else 401 (a FastAPI dependency)."""
    if not state.api_keys and not state.basic_auth:
        return
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    given = value.encode("utf-8", "surrogateescape")  # compare bytes: any header text is safe
    if scheme.lower() == "bearer" and any(secrets.compare_digest(given, k.encode()) for k in state.api_keys):
        return
    if scheme.lower() == "basic" and state.basic_auth:
        try:
            decoded = base64.b64decode(given, validate=True)
        except binascii.Error:
            decoded = b""
        if secrets.compare_digest(decoded, state.basic_auth.encode()):
            return
    raise APIError(401, "Missing or wrong credentials: send 'Authorization: Bearer <key>' (or HTTP Basic).",
                   "authentication_error", "invalid_api_key")
