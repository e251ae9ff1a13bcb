"""POST /v1/responses (OpenAI's Responses API) driven by the openai SDK's ``client.responses.create``: text, streamed
events, instructions, max_output_tokens, JSON schema output, function tools (a scripted model decides to call one)
and their round trip, stored responses continued with previous_response_id, and clear 400s for what it does not
serve."""

from __future__ import annotations

import json

import openai
import pytest
from test_server import ACTION, ANSWER, ARGS, QUESTION, WEATHER, scripted  # noqa: F401  (scripted: a fixture)

TOOL = {"type": "function", **WEATHER}  # the Responses API's tools are flat


@pytest.fixture(scope="module")
def client(api_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_server.url}/v1", api_key="x", max_retries=0, timeout=60)


def test_text_is_the_chat_completions_reply(client):
    """The same prompt through both APIs gives the same text and token counts; instructions are the system prompt."""
    body = dict(model="tiny", temperature=0, top_p=1)
    answer = client.responses.create(input="Hello there", instructions="Be brief.", max_output_tokens=12, **body)
    chat = client.chat.completions.create(messages=[{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Hello there"}], max_tokens=12, **body)
    assert answer.object == "response" and answer.id.startswith("resp_") and answer.model == "tiny"
    assert answer.output_text == chat.choices[0].message.content
    assert answer.usage.input_tokens == chat.usage.prompt_tokens
    assert answer.usage.output_tokens == chat.usage.completion_tokens
    cut = chat.choices[0].finish_reason == "length"
    assert answer.status == ("incomplete" if cut else "completed")
    assert (answer.incomplete_details.reason == "max_output_tokens") if cut else answer.incomplete_details is None


def test_stream_events_add_up_to_the_response(client):
    body = dict(model="tiny", input="Tell me a story", max_output_tokens=16, temperature=0)
    whole = client.responses.create(**body)
    events = list(client.responses.create(**body, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == whole.output_text
    assert kinds.index("response.output_item.added") < kinds.index("response.output_text.delta")
    assert kinds.index("response.output_item.done") < len(kinds) - 1
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens


def test_json_schema_output(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    answer = client.responses.create(model="tiny", input="Where?", max_output_tokens=60, text={
        "format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}})
    assert set(json.loads(answer.output_text)) == {"city"}


def test_function_call_and_its_round_trip(scripted):  # noqa: F811
    client = scripted.client
    scripted.reply(ACTION)
    answer = client.responses.create(model="tiny", input=QUESTION[0]["content"], tools=[TOOL], temperature=0)
    [call] = answer.output
    assert call.type == "function_call" and call.name == "get_weather" and call.arguments == ARGS
    assert call.call_id.startswith("call_") and answer.status == "completed" and answer.output_text == ""

    scripted.reply(ACTION)
    events = list(client.responses.create(model="tiny", input=QUESTION[0]["content"], tools=[TOOL], temperature=0,
                                          stream=True))
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(pieces) == ARGS and not any(e.type == "response.output_text.delta" for e in events)
    assert events[-1].response.output[0].name == "get_weather"

    # The tool's result goes back as a function_call_output item; the model then answers.
    scripted.reply(ANSWER)
    final = client.responses.create(model="tiny", tools=[TOOL], temperature=0, input=[
        {"role": "user", "content": QUESTION[0]["content"]},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 25 degrees"}])
    assert final.output_text == "It is sunny in Paris, 25 degrees."


@pytest.mark.parametrize(("extra", "message"), [
    ({"previous_response_id": "resp_1"}, "Previous response with id 'resp_1' not found"),
    ({"tools": [{"type": "web_search"}]}, "Tools of type 'web_search' are not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "'input_image'"),
    ({"reasoning_effort": "high"}, "Unsupported field(s): reasoning_effort"),
])
def test_what_it_does_not_serve_is_a_400_that_says_so(client, extra, message):
    body = {"model": "tiny", "input": "hi", "max_output_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**{k: v for k, v in body.items() if k != "reasoning_effort"},
                                extra_body={k: v for k, v in body.items() if k == "reasoning_effort"})
    assert message in refused.value.message


def test_previous_response_id_continues_the_conversation(client):
    """A follow-up reads the earlier turns (their input and output, not their instructions, as OpenAI does): the same
    prompt and reply as the chat completion of that conversation. Stored responses are read back, deleted, and not
    kept with store: false."""
    body = dict(model="tiny", temperature=0, top_p=1, max_output_tokens=8)
    first = client.responses.create(input="My name is Ada.", instructions="Be brief.", **body)
    second = client.responses.create(input="What is my name?", instructions="Answer in French.",
                                     previous_response_id=first.id, **body)
    assert second.previous_response_id == first.id and second.store is True
    history = [{"role": "assistant", "content": first.output_text}] if first.output else []
    chat = client.chat.completions.create(messages=[
        {"role": "system", "content": "Answer in French."}, {"role": "user", "content": "My name is Ada."},
        *history, {"role": "user", "content": "What is my name?"}], max_tokens=8, model="tiny", temperature=0, top_p=1)
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == chat.choices[0].message.content

    got = client.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == second.output_text and got.previous_response_id == first.id
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    # Each stored response holds its whole conversation: a chain outlives its deleted (or evicted) first link.
    third = client.responses.create(input="And again?", previous_response_id=second.id, **body)
    assert third.usage.input_tokens > second.usage.input_tokens

    unstored = client.responses.create(input="Forget this.", store=False, **body)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(input="hi", previous_response_id=unstored.id, **body)
    assert refused.value.code == "previous_response_not_found"

    events = list(client.responses.create(input="Streamed.", stream=True, **body))
    streamed = events[-1].response
    assert client.responses.retrieve(streamed.id).output_text == streamed.output_text


def test_a_tool_result_continues_a_stored_call(scripted):  # noqa: F811
    """The agent loop without resending history: the call's response id, then only the tool's output."""
    client = scripted.client
    scripted.reply(ACTION)
    call_response = client.responses.create(model="tiny", input=QUESTION[0]["content"], tools=[TOOL], temperature=0)
    [call] = call_response.output
    scripted.reply(ANSWER)
    final = client.responses.create(model="tiny", tools=[TOOL], temperature=0, previous_response_id=call_response.id,
                                    input=[{"type": "function_call_output", "call_id": call.call_id,
                                            "output": "sunny, 25 degrees"}])
    assert final.output_text == "It is sunny in Paris, 25 degrees."
    scripted.reply(ANSWER)
    resent = client.responses.create(model="tiny", tools=[TOOL], temperature=0, input=[
        {"role": "user", "content": QUESTION[0]["content"]},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 25 degrees"}])
    assert final.usage.input_tokens == resent.usage.input_tokens  # the same prompt as with the history resent


def test_the_store_keeps_the_most_recently_used():
    from qwen.serve.response_store import ResponseStore

    store = ResponseStore(2)
    for name in ("a", "b"):
        store.put({"id": name}, [])
    assert store.get("a") is not None  # "a" is now the most recently used
    store.put({"id": "c"}, [])
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    assert store.delete("a") and not store.delete("a")
    nothing = ResponseStore(0)
    nothing.put({"id": "d"}, [])
    assert nothing.get("d") is None
