"""The tokenizer endpoints (vLLM's), so clients such as lm-eval need no local tokenizer: ``GET /tokenizer_info``,
``POST /tokenize``, ``POST /detokenize``."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..errors import APIError
from ..prompting import PromptError, build_chat_prompt
from ..protocol import ChatCompletionRequest, DetokenizeRequest, TokenizeRequest
from ..state import State, require_auth

router = APIRouter(dependencies=[Depends(require_auth)])


@router.get("/tokenizer_info")
async def tokenizer_info(state: State) -> dict:
    return {"tokenizer_class": type(state.tokenizer).__name__, "eos_token": "<|endoftext|>", "bos_token": None,
            "pad_token": "<|endoftext|>", "model_max_length": state.engine.max_model_len,
            "chat_template": getattr(state.tokenizer, "chat_template", None)}


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, state: State) -> dict:
    """Text is encoded as the completions endpoint encodes a prompt (special-token look-alikes are
    text); messages as the chat endpoint builds its prompt."""
    if body.messages is not None:
        try:
            ids = build_chat_prompt(state.tokenizer, ChatCompletionRequest(model=state.model_name,
                                                                           messages=body.messages)).ids
        except PromptError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
    elif body.prompt is not None:
        ids = state.tokenizer.encode(body.prompt, allowed_special=set())
    else:
        raise APIError(400, "Send a prompt (text) or messages to tokenize.", param="prompt")
    return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: State) -> dict:
    vocab_size = state.engine.config.vocab_size
    if any(not 0 <= t < vocab_size for t in body.tokens):
        raise APIError(400, f"Token ids must be in [0, {vocab_size}).", param="tokens")
    return {"prompt": state.tokenizer.decode(body.tokens)}
