"""``GET /v1/models`` and ``GET /v1/models/{model_id}``: the base model and the LoRA adapters loaded;
``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``: LoRA adapters at run time (vLLM's
endpoints)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from ...lora import AdapterError, AdapterRegistry, LoraAdapter
from ..errors import APIError
from ..protocol import LoadLoraRequest, UnloadLoraRequest
from ..sampling_request import check_model
from ..state import ServerState, State, require_auth

logger = logging.getLogger("qwen.serve")
router = APIRouter(dependencies=[Depends(require_auth)])


def model_card(state: ServerState, adapter: LoraAdapter | None = None) -> dict:
    """An entry of /v1/models: the base model, or an adapter with its folder (root) and the base (parent)."""
    if adapter is None:
        return {"id": state.model_name, "object": "model", "created": state.created_at, "owned_by": "qwen",
                "root": state.model_name, "parent": None, "max_model_len": state.engine.max_model_len}
    return {"id": adapter.name, "object": "model", "created": state.created_at, "owned_by": "qwen",
            "root": str(adapter.path), "parent": state.model_name, "max_model_len": state.engine.max_model_len}


@router.get("/v1/models")
async def models(state: State) -> dict:
    return {"object": "list", "data": [model_card(state)] + [model_card(state, a) for a in
                                                             (state.adapters.loaded() if state.adapters else [])]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, state: State) -> dict:
    return model_card(state, check_model(state, model_id))


def registry(state: ServerState) -> AdapterRegistry:
    """The adapters this server loads at run time; a 400 if it loads none."""
    if state.adapters is None:
        raise APIError(400, "This server does not load LoRA adapters; start it with --lora or --max-loras.")
    return state.adapters


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraRequest, state: State) -> PlainTextResponse:
    try:
        adapter = await asyncio.to_thread(registry(state).load, body.lora_name, body.lora_path)
    except AdapterError as exc:
        raise APIError(400, f"Cannot load LoRA adapter {body.lora_name!r}: {exc}", param="lora_path") from None
    return PlainTextResponse(f"Success: LoRA adapter '{adapter.name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraRequest, state: State) -> PlainTextResponse:
    try:
        registry(state).unload(body.lora_name)
    except KeyError:
        raise APIError(404, f"No LoRA adapter named {body.lora_name!r} is loaded.", code="model_not_found",
                       param="lora_name") from None
    logger.info("LoRA adapter %r unloaded", body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
