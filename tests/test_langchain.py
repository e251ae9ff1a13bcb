"""LangChain's ``ChatOpenAI`` against a real ``openai_api.py``: invoke, stream, tools bound (and forced),
an agent history with a tool round trip followed by a new user turn, and structured output from a JSON
schema. The model is random, so forced tool calls and schemas are what make its output checkable."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest

langchain_openai = pytest.importorskip("langchain_openai")

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_core.utils.function_calling import convert_to_openai_tool  # noqa: E402

MODEL = "tiny"


@pytest.fixture(scope="module")
def llm(api_server):
    return langchain_openai.ChatOpenAI(model=MODEL, base_url=f"{api_server.url}/v1", api_key="none", temperature=0,
                                       max_tokens=24, max_retries=0)


@tool
def get_weather(city: Literal["Paris", "Rome", "Tokyo"], unit: Literal["C", "F"] = "C") -> str:
    """The weather in a city."""
    return f"sunny in {city}, 25 {unit}"


def test_invoke_and_stream(llm):
    reply = llm.invoke("Hello!")
    assert isinstance(reply, AIMessage) and reply.response_metadata["finish_reason"] in ("stop", "length")
    chunks = list(llm.stream("Hello!"))
    assert len(chunks) > 2 and "".join(c.content for c in chunks) == reply.content  # greedy: the same reply


def test_bound_tools_forced_call_and_agent_history(llm):
    forced = llm.bind_tools([get_weather], tool_choice="get_weather", strict=True)  # no extra arguments
    reply = forced.invoke([SystemMessage("Be brief."), HumanMessage("Weather in Paris?")])
    [call] = reply.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Rome", "Tokyo")
    result = get_weather.invoke(call["args"])
    # The loop goes on: the tool's result, the model's answer, then a new user turn (once a 400).
    history = [SystemMessage("Be brief."), HumanMessage("Weather in Paris?"), reply,
               ToolMessage(result, tool_call_id=call["id"])]
    answer = llm.bind_tools([get_weather]).invoke(history)
    follow_up = llm.bind_tools([get_weather]).invoke(
        [*history, AIMessage(answer.content or "It is sunny."), HumanMessage("And in Rome?")])
    # What the model was given and what came back: the same history sent in OpenAI's own format gets the same
    # prompt length and the server's own greedy reply.
    client = openai.OpenAI(base_url=llm.openai_api_base, api_key="none")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": reply.content or None, "tool_calls": [
                    {"id": call["id"], "type": "function",
                     "function": {"name": call["name"], "arguments": json.dumps(call["args"])}}]},
                {"role": "tool", "tool_call_id": call["id"], "content": result}]
    tools = [convert_to_openai_tool(get_weather)]
    for got, sent in ((answer, messages), (follow_up, [*messages, {"role": "assistant", "content": answer.content
                                                                   or "It is sunny."},
                                                       {"role": "user", "content": "And in Rome?"}])):
        own = client.chat.completions.create(model=MODEL, messages=sent, tools=tools, temperature=0, max_tokens=24)
        assert got.usage_metadata["input_tokens"] == own.usage.prompt_tokens
        assert got.content == (own.choices[0].message.content or "")


def test_structured_output_from_a_json_schema(llm):
    schema = {"title": "City", "description": "A city and its country.", "type": "object",
              "properties": {"city": {"type": "string", "maxLength": 20},
                             "country": {"type": "string", "maxLength": 20},
                             "population": {"type": "integer", "minimum": 0, "maximum": 10**8}},
              "required": ["city", "country", "population"], "additionalProperties": False}
    structured = llm.model_copy(update={"max_tokens": 80}).with_structured_output(schema, method="json_schema",
                                                                                 strict=True)
    out = structured.invoke("Name a large city.")
    assert set(out) == {"city", "country", "population"} and isinstance(out["population"], int)
