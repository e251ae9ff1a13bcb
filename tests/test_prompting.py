"""OpenAI messages -> ChatML prompt ids, and forced tool calls, with the real tokenizer.

Each ordering the OpenAI API accepts (agent histories as LangChain sends them, repeated roles, late
system/developer messages, an assistant first, parallel tool calls) is checked against the exact
ChatML text the model sees; ``tool_choice`` against the reply prefill and the parsing of a reply that
continues it.
"""

from __future__ import annotations

import pytest

from qwen.chat import DEFAULT_SYSTEM, make_context
from qwen.serve.prompting import (
    DUMMY_THOUGHT,
    ChatPrompt,
    PromptError,
    ReactStream,
    build_chat_prompt,
    forced_call_grammar,
    parse_react,
    react_instruction,
)
from qwen.serve.protocol import ChatCompletionRequest, ChatMessage, FunctionDefinition

WEATHER = {"name": "get_weather", "description": "Get the current weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CLOCK = {"name": "get_time", "description": "The local time in a city.", "parameters": {}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": CLOCK}]
INSTRUCTION = react_instruction([FunctionDefinition(**WEATHER), FunctionDefinition(**CLOCK)])
ARGS = '{"city": "Paris"}'


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str | None, *calls: tuple[str, str, str]) -> dict:
    """An assistant message; each call is (id, name, arguments), as LangChain's ChatOpenAI sends it."""
    message: dict = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                                 for i, n, a in calls]
    return message


def tool(call_id: str, text: str) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def build(tokenizer, messages: list, **body) -> ChatPrompt:
    return build_chat_prompt(tokenizer, ChatCompletionRequest(model="tiny", messages=messages, **body))


def text_of(tokenizer, messages: list, **body) -> str:
    return tokenizer.decode(build(tokenizer, messages, **body).ids)


def chatml(*blocks: tuple[str, str], system: str = DEFAULT_SYSTEM, reply: str = "") -> str:
    """The ChatML text of a conversation that ends in an assistant message open at ``reply``."""
    turns = "".join(f"\n<|im_start|>{role}\n{text}<|im_end|>" for role, text in blocks)
    return f"<|im_start|>system\n{system}<|im_end|>{turns}\n<|im_start|>assistant\n{reply}"


# ----- message orderings --------------------------------------------------------------------------


def test_alternating_conversation_gives_the_ids_of_make_context(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"), user("2+2?")]
    prompt = build(tokenizer, messages)
    assert prompt.ids == make_context(tokenizer, "2+2?", [("Hi", "Hello!")], "Be brief.")[1]
    assert (prompt.prefill, prompt.continuation, prompt.functions) == ("", False, [])


def test_user_turn_after_a_tool_round_trip(tokenizer):
    """LangChain's agent loop: the user asks again after a tool call, its result and the answer."""
    messages = [user("Weather in Paris?"), assistant(None, ("call_1", "get_weather", ARGS)),
                tool("call_1", "sunny"), assistant("Sunny."), user("And the time?")]
    step = f"Thought: I can use get_weather.\nAction: get_weather\nAction Input: {ARGS}\nObservation: sunny"
    answer = f"{step}\n{DUMMY_THOUGHT['en']}Sunny."
    assert text_of(tokenizer, messages, tools=TOOLS) == chatml(
        ("user", "Weather in Paris?"), ("assistant", answer), ("user", f"{INSTRUCTION}\n\nQuestion: And the time?"))
    # Without the final answer in between, and without tools (the history still reads as ReAct).
    messages = messages[:3] + messages[4:]
    assert text_of(tokenizer, messages) == chatml(("user", "Weather in Paris?"), ("assistant", step),
                                                  ("user", "And the time?"))


def test_consecutive_messages_of_one_role_are_joined(tokenizer):
    parts = {"role": "user", "content": [{"type": "text", "text": "Second"}, {"type": "text", "text": " part."}]}
    assert text_of(tokenizer, [user("First."), parts, user("")]) == chatml(("user", "First.\n\nSecond part."))
    messages = [user("Hi"), assistant("Hello."), assistant("How can I help?"), user("Bye")]
    assert text_of(tokenizer, messages) == chatml(("user", "Hi"), ("assistant", "Hello.\n\nHow can I help?"),
                                                  ("user", "Bye"))
    # With tools, the dummy thought opens the assistant's answer once.
    assert text_of(tokenizer, messages, tools=TOOLS) == chatml(
        ("user", "Hi"), ("assistant", f"{DUMMY_THOUGHT['en']}Hello.\n\nHow can I help?"),
        ("user", f"{INSTRUCTION}\n\nQuestion: Bye"))


def test_later_system_messages_become_user_text_where_they_stand(tokenizer):
    late = {"role": "system", "content": "Answer in French."}
    messages = [user("Hi"), assistant("Hello."), late, user("Weather?")]
    assert text_of(tokenizer, messages) == chatml(("user", "Hi"), ("assistant", "Hello."),
                                                  ("user", "Answer in French.\n\nWeather?"))
    assert text_of(tokenizer, messages[:3]) == chatml(("user", "Hi"), ("assistant", "Hello."),
                                                      ("user", "Answer in French."))
    # The instruction and "Question:" lead the last user message, the late system text included.
    assert text_of(tokenizer, messages, tools=TOOLS).endswith(
        f"<|im_start|>user\n{INSTRUCTION}\n\nQuestion: Answer in French.\n\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_developer_messages_are_system_messages(tokenizer):
    """OpenAI's newer name for system (o1 and later; LangChain sends it for those models)."""
    developer = ChatMessage.model_construct(role="developer", content="Use short words.")
    leading = [{"role": "system", "content": "Be kind."}, developer, user("Hi")]
    assert text_of(tokenizer, leading) == chatml(("user", "Hi"), system="Be kind.\n\nUse short words.")
    late = [user("Hi"), assistant("Hello."), developer, user("Bye")]
    assert text_of(tokenizer, late) == chatml(("user", "Hi"), ("assistant", "Hello."),
                                              ("user", "Use short words.\n\nBye"))


def test_conversation_may_start_with_the_assistant(tokenizer):
    messages = [assistant("Hi! I am a weather bot."), user("Weather in Paris?")]
    assert text_of(tokenizer, messages) == chatml(("assistant", "Hi! I am a weather bot."),
                                                  ("user", "Weather in Paris?"))
    system_first = [{"role": "system", "content": "Be brief."}, *messages]
    assert text_of(tokenizer, system_first) == chatml(("assistant", "Hi! I am a weather bot."),
                                                      ("user", "Weather in Paris?"), system="Be brief.")


def test_system_message_alone(tokenizer):
    messages = [{"role": "system", "content": "Write a haiku about rain."}]
    assert text_of(tokenizer, messages) == chatml(system="Write a haiku about rain.")
    # With tools and no user message, the instruction is a user message of its own.
    assert text_of(tokenizer, messages, tools=TOOLS) == chatml(("user", INSTRUCTION),
                                                               system="Write a haiku about rain.")


def test_several_tool_results_answer_one_assistant_message(tokenizer):
    """Parallel tool calls: each call is followed by its result's Observation, matched by
    tool_call_id whatever order the results come in."""
    messages = [user("Weather and time in Paris?"),
                assistant("Two lookups.", ("c1", "get_weather", ARGS), ("c2", "get_time", ARGS)),
                tool("c2", "10:00"), tool("c1", "sunny")]
    prompt = build(tokenizer, messages, tools=TOOLS)
    trace = (f"Thought: Two lookups.\nAction: get_weather\nAction Input: {ARGS}\nObservation: sunny\n"
             f"Thought: I can use get_time.\nAction: get_time\nAction Input: {ARGS}\nObservation: 10:00\nThought:")
    assert tokenizer.decode(prompt.ids) == chatml(
        ("user", f"{INSTRUCTION}\n\nQuestion: Weather and time in Paris?"), reply=trace)
    assert prompt.continuation and prompt.prefill == "Thought:"
    # Legacy function messages carry no id: they answer the calls in order.
    legacy = [messages[0], messages[1], {"role": "function", "name": "get_weather", "content": "sunny"},
              {"role": "function", "name": "get_time", "content": "10:00"}]
    assert build(tokenizer, legacy, tools=TOOLS).ids == prompt.ids


def test_assistant_thought_round_trips(tokenizer):
    """The content the server returns with a call (the Thought) comes back as that Thought."""
    for content in ("Let me check.", "Thought: Let me check."):
        messages = [user("Weather?"), assistant(content, ("c1", "get_weather", ARGS))]
        prompt = build(tokenizer, messages, tools=TOOLS)
        assert tokenizer.decode(prompt.ids).endswith(
            f"<|im_start|>assistant\nThought: Let me check.\nAction: get_weather\nAction Input: {ARGS}")
        assert prompt.continuation and prompt.prefill == ""


def test_last_assistant_message_is_continued(tokenizer):
    prompt = build(tokenizer, [user("Count to three."), assistant("One, two,")])
    assert tokenizer.decode(prompt.ids) == chatml(("user", "Count to three."), reply="One, two,")
    assert prompt.continuation and prompt.prefill == ""


@pytest.mark.parametrize("messages, body", [
    ([user("Hi"), tool("c1", "42")], {}),
    ([user("Hi"), assistant("ok"), tool("c1", "42")], {}),
    ([tool("c1", "42")], {}),
    ([user("Hi"), assistant(None, ("c1", "get_weather", ARGS)), user("?"), tool("c1", "42")], {}),
    ([user("Hi"), assistant(None, ("c1", "get_weather", ARGS)), tool("c1", "42"), tool("c1", "43")], {}),
    ([user("Hi"), assistant("The answer")], {"tools": TOOLS, "tool_choice": "required"}),
    ([user("Hi")], {"tool_choice": "required"}),
    ([user("Hi")], {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
], ids=["tool after user", "tool after a plain answer", "tool first", "tool after the round trip ended",
        "more results than calls", "forced call after an assistant message", "required without tools",
        "named tool missing"])
def test_meaningless_requests_are_refused(tokenizer, messages, body):
    with pytest.raises(PromptError) as error:
        build(tokenizer, messages, **body)
    assert error.value.param == ("tool_choice" if "tool_choice" in body else "messages")


# ----- tool_choice -------------------------------------------------------------------------------

QUESTION = [user("Weather in Paris?")]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_named_tool_choice_prefills_the_call(tokenizer):
    prompt = build(tokenizer, QUESTION, tools=TOOLS, tool_choice=NAMED)
    only = react_instruction([FunctionDefinition(**WEATHER)])
    prefill = "Action: get_weather\nAction Input:"
    assert tokenizer.decode(prompt.ids) == chatml(("user", f"{only}\n\nQuestion: Weather in Paris?"), reply=prefill)
    assert prompt.prefill == prefill and not prompt.continuation
    assert [f.name for f in prompt.functions] == ["get_weather"]
    output = f" {ARGS}\nObservation:"
    parsed = parse_react(prompt.prefill + output)
    assert parsed.call == ("get_weather", ARGS) and parsed.content is None
    stream = ReactStream(prompt.prefill)
    assert [stream.feed(piece) for piece in (" {", '"city": "Paris"}')] == ["", ""]
    assert stream.finish().call == ("get_weather", ARGS)
    # Legacy functions with function_call={"name": ...} do the same.
    legacy = build(tokenizer, QUESTION, functions=[WEATHER, CLOCK], function_call={"name": "get_weather"})
    assert legacy.ids == prompt.ids and legacy.prefill == prefill


def test_required_tool_choice_prefills_up_to_the_action(tokenizer):
    prompt = build(tokenizer, QUESTION, tools=TOOLS, tool_choice="required")
    assert tokenizer.decode(prompt.ids) == chatml(("user", f"{INSTRUCTION}\n\nQuestion: Weather in Paris?"),
                                                  reply="Action:")
    assert prompt.prefill == "Action:" and len(prompt.functions) == 2
    parsed = parse_react(prompt.prefill + " get_time\nAction Input: {}")
    assert parsed.call == ("get_time", "{}") and parsed.content is None
    stream = ReactStream(prompt.prefill)
    assert stream.feed(" get_time\nAction Input: {} Final Answer: no") == ""
    assert stream.finish().call == ("get_time", '"{} Final Answer: no"')  # not JSON: sent as a JSON string
    # With one tool, "required" names it.
    single = build(tokenizer, QUESTION, tools=TOOLS[:1], tool_choice="required")
    assert single.prefill == "Action: get_weather\nAction Input:"


def test_forced_call_after_a_tool_result(tokenizer):
    messages = QUESTION + [assistant(None, ("c1", "get_weather", ARGS)), tool("c1", "sunny")]
    prompt = build(tokenizer, messages, tools=TOOLS, tool_choice=NAMED)
    assert tokenizer.decode(prompt.ids).endswith(
        "Observation: sunny\nAction: get_weather\nAction Input:")
    assert prompt.prefill == "Action: get_weather\nAction Input:" and prompt.continuation


def test_auto_and_none(tokenizer):
    auto = build(tokenizer, QUESTION, tools=TOOLS, tool_choice="auto")
    assert auto.prefill == "" and auto.ids == build(tokenizer, QUESTION, tools=TOOLS).ids
    none = build(tokenizer, QUESTION, tools=TOOLS, tool_choice="none")
    assert none.functions == [] and none.prefill == ""
    assert tokenizer.decode(none.ids) == chatml(("user", "Weather in Paris?"))


def test_reply_after_a_tool_result_parses_with_its_prefill(tokenizer):
    messages = QUESTION + [assistant(None, ("c1", "get_weather", ARGS)), tool("c1", "sunny")]
    prompt = build(tokenizer, messages, tools=TOOLS)
    output = " I now know the final answer.\nFinal Answer: Sunny."
    assert parse_react(prompt.prefill + output).content == "Sunny."
    stream = ReactStream(prompt.prefill)
    shown = "".join(stream.feed(piece) for piece in (" I now know the final answer.\nFinal", " Answer: Sun", "ny."))
    assert shown + (stream.finish().content or "") == "Sunny."


def test_forced_call_grammar_allows_only_calls_of_the_offered_tools(tokenizer):
    llguidance = pytest.importorskip("llguidance")
    from llguidance.tiktoken import lltokenizer_from_encoding

    vocab = lltokenizer_from_encoding(tokenizer.tokenizer, n_vocab=len(tokenizer), eos_token=[tokenizer.im_end_id])

    def accepts(prompt: ChatPrompt, output: str) -> bool:
        matcher = llguidance.LLMatcher(vocab, forced_call_grammar(prompt), log_level=0)
        return matcher.consume_tokens(tokenizer.encode(output)) and matcher.is_accepting()

    required = build(tokenizer, QUESTION, tools=TOOLS, tool_choice="required")
    assert accepts(required, f" get_weather\nAction Input: {ARGS}")
    assert accepts(required, " get_time\nAction Input: {}")
    assert not accepts(required, f" get_wether\nAction Input: {ARGS}")
    assert not accepts(required, " get_weather\nAction Input: {}")  # "city" is required
    named = build(tokenizer, QUESTION, tools=TOOLS, tool_choice=NAMED)
    assert accepts(named, f" {ARGS}") and not accepts(named, ' {"town": "Paris"}')
    assert forced_call_grammar(build(tokenizer, QUESTION, tools=TOOLS)) is None


def test_original_qwen_style_functions(tokenizer):
    """The original server's function format (name_for_model, name_for_human, description_for_model, a list
    of parameters) gives the original tool line."""
    function = {"name_for_human": "Weather", "name_for_model": "get_weather", "description_for_model": "Weather.",
                "parameters": [{"name": "city", "description": "City", "required": True, "schema": {"type": "string"}}]}
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Paris?"}], functions=[function])
    text = tokenizer.decode(build_chat_prompt(tokenizer, request).ids)
    assert ("get_weather: Call this tool to interact with the Weather API. What is the Weather API useful for? "
            'Weather. Parameters: [{"name": "city", "description": "City", "required": true, "schema": '
            '{"type": "string"}}]') in text
    assert "[get_weather]" in text
