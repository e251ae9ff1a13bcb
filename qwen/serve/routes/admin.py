"""``GET /health`` (no credentials: a load balancer's probe) and ``GET /metrics`` (Prometheus; the API keys
unless the server was started with ``metrics_public``)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..errors import APIError
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..state import State, require_auth

router = APIRouter()


async def require_metrics_auth(request: Request, state: State) -> None:
    """The API keys, unless ``/metrics`` is public (for a scraper inside a trusted network)."""
    if not state.metrics_public:
        await require_auth(request, state)


@router.get("/metrics", dependencies=[Depends(require_metrics_auth)], include_in_schema=False)
async def prometheus_metrics(state: State) -> Response:
    return Response(state.metrics.exposition(), media_type=METRICS_CONTENT_TYPE)


@router.get("/health")
async def health(request: Request, state: State) -> dict:
    if request.app.state.draining:  # a load balancer stops sending requests here
        raise APIError(503, "The server is shutting down.", "server_error", "shutting_down")
    engine = state.engine
    cache = engine.prefix_cache
    return {"status": "ok", "running": len(engine.running), "prefilling": len(engine.prefilling),
            "waiting": len(engine.waiting), "prefix_cache": asdict(cache.stats) if cache is not None else None}
