"""POST /v1/responses (OpenAI's Responses API) driven by the openai SDK's ``client.responses.create``: text, streamed
events, instructions, max_output_tokens, JSON schema output, function tools (a scripted model decides to call one)
and their round trip, and clear 400s for what it does not serve."""

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
    ({"previous_response_id": "resp_1"}, "stores no responses"),
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
