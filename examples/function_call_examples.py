"""Chat and function calling through the OpenAI-compatible server, with the official ``openai`` client.

    python openai_api.py -c Qwen-7B-Chat                 # in one terminal
    python examples/function_call_examples.py            # in another (--api-base for another address)

1. plain multi-turn chat;
2. legacy ``functions`` with ``function_call`` and a ``function`` message carrying the result (described
   with OpenAI's name/description/parameters; the original example's Qwen-style fields, name_for_model,
   name_for_human, description_for_model and a list of parameters, are accepted too);
3. ``tools`` described by JSON schema: the model's tool call;
4. the tool result sent back as a ``tool`` message, and the model's answer;
5. streaming.

The server turns the functions into Qwen's ReAct prompt and the model's ``Action:`` lines back into
calls (see react_prompt.md), so any OpenAI client or framework can use them. The functions here
run locally and need no API key: the time in a time zone, and a small table of canned weather.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from zoneinfo import ZoneInfo

from openai import OpenAI


def get_current_time(timezone: str) -> str:
    return datetime.now(ZoneInfo(timezone)).strftime("%Y-%m-%d %H:%M")


# Canned data: a real application would call a weather service here.
WEATHER = {"paris": (18, "cloudy"), "beijing": (25, "sunny"), "london": (14, "rainy")}


def get_current_weather(location: str, unit: str = "celsius") -> str:
    celsius, sky = WEATHER.get(location.split(",")[0].strip().lower(), (20, "clear"))
    degrees = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    return json.dumps({"location": location, "temperature": degrees, "unit": unit, "sky": sky})


LOCAL_FUNCTIONS = {"get_current_time": get_current_time, "get_current_weather": get_current_weather}

TIME_FUNCTION = {
    "name": "get_current_time",
    "description": "The current local date and time in a time zone.",
    "parameters": {"type": "object", "properties": {
        "timezone": {"type": "string", "description": "an IANA time zone such as Asia/Shanghai"}},
        "required": ["timezone"]},
}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_current_weather",
    "description": "Get the current weather in a given location.",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "the city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location"]},
}}


def call_local(name: str, arguments: str) -> str:
    """Run the function the model asked for; a bad call becomes an error the model can read."""
    try:
        args = json.loads(arguments)
        return LOCAL_FUNCTIONS[name](**args) if isinstance(args, dict) else "Error: the arguments must be a JSON object"
    except Exception as exc:
        return f"Error: {exc!r}"


def plain_chat(client: OpenAI, model: str, **kw) -> None:
    messages = [{"role": "user", "content": "Hello! Who are you?"}]
    for follow_up in ("Give me a one-line tip for writing clear code.", None):
        reply = client.chat.completions.create(model=model, messages=messages, **kw).choices[0].message.content
        print(f"user: {messages[-1]['content']}\nassistant: {reply}")
        if follow_up is None:
            break
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": follow_up}]


def legacy_functions(client: OpenAI, model: str, **kw) -> None:
    messages = [{"role": "user", "content": "What time is it in Shanghai right now?"}]
    message = client.chat.completions.create(model=model, messages=messages, functions=[TIME_FUNCTION],
                                             function_call="auto", **kw).choices[0].message
    call = message.function_call
    if call is None:
        print(f"no function call; the model answered: {message.content}")
        return
    print(f"function call: {call.name}({call.arguments})")
    result = call_local(call.name, call.arguments)
    print(f"function result: {result}")
    messages += [{"role": "assistant", "content": message.content, "function_call": {
                     "name": call.name, "arguments": call.arguments}},
                 {"role": "function", "name": call.name, "content": result}]
    final = client.chat.completions.create(model=model, messages=messages, functions=[TIME_FUNCTION], **kw)
    print(f"final answer: {final.choices[0].message.content}")


def tool_call(client: OpenAI, model: str, messages: list[dict], **kw):
    message = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL], **kw)
    message = message.choices[0].message
    for call in message.tool_calls or []:
        print(f"tool call: {call.function.name}({call.function.arguments})")
    if not message.tool_calls:
        print(f"no tool call; the model answered: {message.content}")
    return message


def tool_round_trip(client: OpenAI, model: str, messages: list[dict], message, **kw) -> None:
    """Send each call's result back as a ``tool`` message after the assistant message that made it."""
    messages = messages + [message.model_dump(exclude_none=True)]
    for call in message.tool_calls:
        result = call_local(call.function.name, call.function.arguments)
        print(f"tool result: {result}")
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    final = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL], **kw)
    print(f"final answer: {final.choices[0].message.content}")


def streaming(client: OpenAI, model: str, **kw) -> None:
    stream = client.chat.completions.create(model=model, stream=True, **kw,
                                            messages=[{"role": "user", "content": "Tell me a short story."}])
    chunks = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            print(chunk.choices[0].delta.content, end="", flush=True)
    print(f"\n({chunks} chunks with text)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-base", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="one of the server's --api-keys, if it has any")
    parser.add_argument("--model", help="model id (default: the one the server serves)")
    parser.add_argument("--max-tokens", type=int, help="per reply (default: the checkpoint's max_new_tokens)")
    args = parser.parse_args()
    client = OpenAI(base_url=args.api_base, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    kw = {"max_tokens": args.max_tokens} if args.max_tokens else {}

    print("== 1. multi-turn chat")
    plain_chat(client, model, **kw)
    print("\n== 2. functions (legacy API)")
    legacy_functions(client, model, **kw)
    print("\n== 3. tools")
    messages = [{"role": "user", "content": "What's the weather like in Paris?"}]
    message = tool_call(client, model, messages, **kw)
    if message.tool_calls:
        print("\n== 4. tool result round trip")
        tool_round_trip(client, model, messages, message, **kw)
    print("\n== 5. streaming")
    streaming(client, model, **kw)


if __name__ == "__main__":
    main()
