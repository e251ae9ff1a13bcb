"""``POST /v1/responses``: OpenAI's Responses API (what the openai SDK's ``client.responses.create`` and agent
frameworks built on it send), served as the chat completion it translates to.

The request becomes a ``ChatCompletionRequest`` (``instructions`` -> a system message, ``input`` items ->
messages: ``function_call`` items -> an assistant tool call, ``function_call_output`` -> a tool message;
flat function ``tools``; ``text.format`` -> ``response_format``; ``max_output_tokens``), which runs through
``routes.chat``; its answer, or its stream of chunks, becomes a ``response`` object with ``message`` and
``function_call`` output items, or the Responses stream events (``response.created`` ...
``response.output_text.delta`` ... ``response.completed``). A reply cut by ``max_output_tokens`` is
``status: "incomplete"``. Responses are stored (unless ``store: false``) in a bounded in-memory store
(``response_store``): ``previous_response_id`` continues one (its conversation, not its ``instructions``, as OpenAI
does), ``GET`` and ``DELETE /v1/responses/{id}`` read and remove one.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse

from ..errors import APIError
from ..protocol import ChatCompletionRequest, ResponsesRequest
from ..state import State, require_auth
from .chat import chat_completions

router = APIRouter(dependencies=[Depends(require_auth)])


def _text(content: Any) -> str:
    """An input item's content: a string, or its text parts (input_text, output_text) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"Input content of type {kind!r} is not supported: this model reads text only.",
                               param="input")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise APIError(400, "An input message needs content: a string or a list of input_text parts.", param="input")


def _input_items(body: ResponsesRequest) -> list[dict]:
    """The request's input as items (a text input is one user message)."""
    return [{"type": "message", "role": "user", "content": body.input}] if isinstance(body.input, str) else body.input


def _messages(instructions: str | None, items: list[dict]) -> list[dict]:
    messages = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role", "user"), "content": _text(item.get("content"))})
        elif kind == "function_call":
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": item.get("call_id", ""), "type": "function",
                 "function": {"name": item.get("name", ""), "arguments": item.get("arguments", "")}}]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id", ""),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind != "reasoning":  # a reasoning item of an earlier turn: the model does not read it back
            raise APIError(400, f"Input items of type {kind!r} are not supported (message, function_call and "
                                "function_call_output are).", param="input")
    return messages


def _tools(body: ResponsesRequest) -> list[dict] | None:
    if not body.tools:
        return None
    tools = []
    for tool in body.tools:
        if tool.get("type") != "function":
            raise APIError(400, f"Tools of type {tool.get('type')!r} are not supported: only function tools, whose "
                                "calls your code runs.", param="tools")
        fields = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        tools.append({"type": "function", "function": fields})
    return tools


def _tool_choice(choice: str | dict | None) -> str | dict | None:
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not choice.get("name"):
            raise APIError(400, "tool_choice takes 'auto', 'none', 'required' or {'type': 'function', 'name': ...}.",
                           param="tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format")
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    return fmt


def chat_request(body: ResponsesRequest, items: list[dict]) -> ChatCompletionRequest:
    """The chat completion a Responses request asks for, ``items`` being its conversation (earlier turns' items,
    then its input); 400 for what it cannot express."""
    unknown = sorted(body.model_extra or {})
    if unknown:
        raise APIError(400, f"Unsupported field(s): {', '.join(unknown)}. This server does not implement them; "
                            "remove them from the request.", param=unknown[0])
    if body.include:
        raise APIError(400, f"include {body.include} is not supported: this server adds no extra output data.",
                       param="include")
    fields = {"model": body.model, "messages": _messages(body.instructions, items), "tools": _tools(body),
              "tool_choice": _tool_choice(body.tool_choice), "response_format": _response_format(body.text),
              "max_completion_tokens": body.max_output_tokens, "temperature": body.temperature,
              "top_p": body.top_p, "stream": body.stream, "stream_options": {"include_usage": True}}
    try:
        return ChatCompletionRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise APIError(400, f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}", param="input") from None


class _Builder:
    """The response object, and its output items as they stream in."""

    def __init__(self, body: ResponsesRequest, stored: bool) -> None:
        self.body, self.stored, self.output, self.usage = body, stored, [], None
        self.id, self.created = f"resp_{uuid.uuid4().hex}", int(time.time())
        self.status, self.incomplete = "in_progress", None

    def finish(self, reason: str | None) -> None:
        self.status = "incomplete" if reason == "length" else "completed"
        self.incomplete = {"reason": "max_output_tokens"} if reason == "length" else None

    def set_usage(self, chat_usage: dict | None) -> None:
        if chat_usage:
            cached = chat_usage["prompt_tokens_details"]["cached_tokens"]
            self.usage = {"input_tokens": chat_usage["prompt_tokens"], "output_tokens": chat_usage["completion_tokens"],
                          "total_tokens": chat_usage["total_tokens"], "input_tokens_details": {"cached_tokens": cached},
                          "output_tokens_details": {"reasoning_tokens": 0}}

    def response(self) -> dict:
        body = self.body
        return {"id": self.id, "object": "response", "created_at": self.created, "status": self.status,
                "model": body.model, "output": self.output, "usage": self.usage, "error": None,
                "incomplete_details": self.incomplete, "instructions": body.instructions,
                "max_output_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p,
                "tools": body.tools or [], "tool_choice": body.tool_choice or "auto",
                "parallel_tool_calls": bool(body.parallel_tool_calls), "metadata": body.metadata or {},
                "text": body.text or {"format": {"type": "text"}}, "store": self.stored,
                "previous_response_id": body.previous_response_id}


def message_item(text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}


def call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


@router.post("/v1/responses", response_model=None)
async def responses(body: ResponsesRequest, request: Request, state: State) -> dict | EventSourceResponse:
    history: list[dict] = []
    if body.previous_response_id:
        entry = state.responses.get(body.previous_response_id)
        if entry is None:
            raise APIError(400, f"Previous response with id '{body.previous_response_id}' not found. This server "
                                f"keeps the last {state.responses.max_entries} responses stored without store: false, "
                                "in memory until it restarts; send the conversation in input instead.",
                           param="previous_response_id", code="previous_response_not_found")
        history = entry[1]
    items = history + _input_items(body)
    chat_body = chat_request(body, items)
    built = _Builder(body, stored=body.store is not False and state.responses.max_entries > 0)

    def done() -> None:  # the response is complete: keep it for GET and previous_response_id
        if built.stored:
            state.responses.put(built.response(), items + built.output)

    answer = await chat_completions(chat_body, request, state)
    if not body.stream:
        choice = answer["choices"][0]
        message = choice["message"]
        if message.get("content"):
            built.output.append(message_item(message["content"]))
        for call in message.get("tool_calls") or []:
            built.output.append(call_item(call["id"], call["function"]["name"], call["function"]["arguments"]))
        built.finish(choice["finish_reason"])
        built.set_usage(answer["usage"])
        done()
        return built.response()
    return EventSourceResponse(_events(built, answer.body_iterator, done), ping=15)


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, state: State) -> dict:
    entry = state.responses.get(response_id)
    if entry is None:
        raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id", code="not_found")
    return entry[0]


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, state: State) -> dict:
    if not state.responses.delete(response_id):
        raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id", code="not_found")
    return {"id": response_id, "object": "response.deleted", "deleted": True}


async def _events(built: _Builder, chunks: AsyncIterator[str], done: Callable[[], None]) -> AsyncIterator[dict]:
    """The chat stream's chunks as the Responses API's events."""
    number = 0

    def event(kind: str, **fields: Any) -> dict:
        nonlocal number
        number += 1
        return {"event": kind, "data": json.dumps({"type": kind, "sequence_number": number - 1, **fields},
                                                  ensure_ascii=False)}

    yield event("response.created", response=built.response())
    yield event("response.in_progress", response=built.response())
    text, item, reason = "", None, None  # the open output item, and the text of an open message

    def close() -> list[dict]:
        nonlocal item, text
        if item is None:
            return []
        index = len(built.output) - 1
        if item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            item.update(status="completed", content=[part])
            done = [event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                          text=text),
                    event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                          part=part)]
        else:
            item["status"] = "completed"
            done = [event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                          arguments=item["arguments"])]
        item, text = None, ""
        return [*done, event("response.output_item.done", output_index=index, item=built.output[index])]

    async for raw in chunks:
        if raw == "[DONE]":
            break
        chunk = json.loads(raw)
        if "error" in chunk:
            yield event("error", code=chunk["error"].get("code"), message=chunk["error"]["message"], param=None)
            return
        built.set_usage(chunk.get("usage"))
        for choice in chunk["choices"]:
            delta, reason = choice["delta"], choice["finish_reason"] or reason
            if delta.get("content"):
                if item is None or item["type"] != "message":
                    for e in close():
                        yield e
                    item = message_item("", status="in_progress")
                    built.output.append(item)
                    index = len(built.output) - 1
                    yield event("response.output_item.added", output_index=index, item=item)
                    yield event("response.content_part.added", item_id=item["id"], output_index=index,
                                content_index=0, part={"type": "output_text", "text": "", "annotations": []})
                text += delta["content"]
                yield event("response.output_text.delta", item_id=item["id"], output_index=len(built.output) - 1,
                            content_index=0, delta=delta["content"])
            for call in delta.get("tool_calls") or []:
                if call.get("id"):  # a new call
                    for e in close():
                        yield e
                    item = call_item(call["id"], call["function"]["name"], "", status="in_progress")
                    built.output.append(item)
                    yield event("response.output_item.added", output_index=len(built.output) - 1, item=dict(item))
                piece = call["function"].get("arguments") or ""
                if piece:
                    item["arguments"] += piece
                    yield event("response.function_call_arguments.delta", item_id=item["id"],
                                output_index=len(built.output) - 1, delta=piece)
    for e in close():
        yield e
    built.finish(reason)
    done()
    yield event("response.incomplete" if built.status == "incomplete" else "response.completed",
                response=built.response())
