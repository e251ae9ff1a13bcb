"""Request ids and the access log: one line per HTTP request, written when its response has been sent.

Every response carries ``X-Request-Id``: the client's own (a proxy's or a tracing library's) when it sent one,
else a new random id, so a user's report and the server's log meet on one id. The line says the id, method,
path, status, the model, prompt and completion tokens, time to first token and duration (for a stream: until
its last event was sent, or the client left); never prompt or reply text (``--log-requests`` logs bodies).
``--log-format json`` writes each line as one JSON object, for log collectors.

A route records what only it knows (model, tokens, first-token time) with :func:`record` in the request's
state, which Starlette keeps in the ASGI scope this middleware shares.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("qwen.access")
HEADER = b"x-request-id"
_ACCEPTED_ID = re.compile(r"[\w.:/+=@-]{1,128}")  # a client's id is echoed only if it is this tame


def log_to_stderr(json_format: bool) -> None:
    """Write the access log to stderr, a JSON object per line as it is (for collectors), else after a timestamp."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if json_format else "%(asctime)s access %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def record(state: Any, **fields: Any) -> None:
    """Add fields (``model``, ``prompt_tokens``, ``completion_tokens``, ``first_token``: a ``time.perf_counter()``
    reading) to the request's access-log line."""
    state.access = {**getattr(state, "access", {}), **fields}


class AccessLog:
    """ASGI middleware: the request id (``request.state.request_id``, the ``X-Request-Id`` response header) and
    the access-log line of every HTTP request; ``on_response(route, status)`` is told of each response (the route's
    path template, "unmatched" for a URL no route serves: a bounded set of labels for the metrics)."""

    def __init__(self, app, json_format: bool = False, on_response: Callable[[str, int], None] | None = None) -> None:
        self.app, self.json_format, self.on_response = app, json_format, on_response

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(HEADER, b"").decode("latin-1")
        request_id = given if _ACCEPTED_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status, logged = 500, False

        async def send_with_id(message) -> None:
            nonlocal status, logged
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (HEADER, request_id.encode())]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not logged:
                logged = True
                self._log(scope, state, status, started)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if not logged:  # the client left before the last byte, or the app failed
                self._log(scope, state, status, started, complete=False)

    def _log(self, scope, state: dict, status: int, started: float, complete: bool = True) -> None:
        if self.on_response is not None:
            route = scope.get("route")
            self.on_response(getattr(route, "path", "unmatched"), status)
        access = state.get("access", {})
        first = access.pop("first_token", None)
        fields = {"request_id": state["request_id"], "method": scope["method"], "path": scope["path"],
                  "status": status, **access,
                  "ttft_ms": round((first - started) * 1000, 1) if first is not None else None,
                  "duration_ms": round((time.perf_counter() - started) * 1000, 1)}
        if not complete:
            fields["complete"] = False
        fields = {k: v for k, v in fields.items() if v is not None}
        if self.json_format:
            logger.info(json.dumps(fields, ensure_ascii=False))
        else:
            logger.info(" ".join(f"{k}={v}" for k, v in fields.items()))
