"""OpenAI messages -> a Qwen chat prompt, and Qwen's ReAct output -> tool calls.

Qwen v1 calls functions by ReAct prompting: the functions are described in an instruction put
before the last question, the model writes ``Thought:``/``Action:``/``Action Input:`` lines and
generation stops at ``Observation:``; tool results come back as ``Observation:`` lines. This module
holds those rules (the original openai_api.py's), for ``tools`` and legacy ``functions`` alike.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..chat import DEFAULT_SYSTEM, make_context
from .protocol import ChatCompletionRequest, FunctionDefinition

TOOL_DESC = (
    "{name}: Call this tool to interact with the {name} API. What is the {name} API useful for? "
    "{description} Parameters: {parameters}"
)
REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_names}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""
OBSERVATION_STOP = "Observation:"
# Put before a plain assistant reply in a conversation with functions (the original's wording).
DUMMY_THOUGHT = {
    "en": "Thought: I now know the final answer.\nFinal answer: ",
    "zh": "Thought: 我会作答了。\nFinal answer: ",
}


class PromptError(ValueError):
    """The messages cannot form a Qwen chat (the server answers 400 with this message)."""


@dataclass
class ChatPrompt:
    ids: list[int]
    functions: list[FunctionDefinition] = field(default_factory=list)  # empty: no function calling
    continuation: bool = False  # the last message was the assistant's: continue its text


def requested_functions(request: ChatCompletionRequest) -> list[FunctionDefinition]:
    """The functions the model may call: ``tools`` (or legacy ``functions``) unless turned off."""
    if request.tools and request.functions:
        raise PromptError("Give either tools or functions, not both.")
    if request.tools:
        functions = [t.function for t in request.tools]
        choice = request.tool_choice
    else:
        functions = list(request.functions or [])
        choice = request.function_call
    if choice == "none":
        return []
    name = getattr(getattr(choice, "function", choice), "name", None)
    if name is not None:
        chosen = [f for f in functions if f.name == name]
        if not chosen:
            raise PromptError(f"tool_choice names {name!r}, which is not among the given tools.")
        return chosen
    return functions


def react_instruction(functions: list[FunctionDefinition]) -> str:
    tools_text = "\n\n".join(
        TOOL_DESC.format(
            name=f.name, description=f.description, parameters=json.dumps(f.parameters, ensure_ascii=False)
        )
        for f in functions
    )
    return REACT_INSTRUCTION.format(tools_text=tools_text, tools_names=", ".join(f.name for f in functions))


def _clean(text: str) -> str:
    return text.lstrip("\n").rstrip()


def build_chat_prompt(tokenizer, request: ChatCompletionRequest) -> ChatPrompt:
    """Turn the request's messages into prompt ids, following the original server's rules:
    the system message may only come first; user and assistant alternate; tool/function results
    follow the assistant turn that called them; a last assistant message is continued."""
    functions = requested_functions(request)
    messages = list(request.messages)
    system = DEFAULT_SYSTEM
    if messages[0].role == "system":
        system = _clean(messages.pop(0).text()) or DEFAULT_SYSTEM
    if not messages:
        raise PromptError("The messages hold only a system message; add a user message.")
    turns: list[list[str]] = []  # [[user, assistant], ...]; the last may lack its assistant part
    for i, m in enumerate(messages):
        text = _clean(m.text())
        if m.role == "system":
            raise PromptError("A system message may only be the first message.")
        if m.role == "user":
            if turns and len(turns[-1]) == 1:
                raise PromptError("Two user messages in a row: user and assistant messages must alternate.")
            turns.append([text])
        elif m.role == "assistant":
            if not turns or len(turns[-1]) != 1:
                raise PromptError("An assistant message must follow a user message.")
            calls = [(c.function.name, c.function.arguments) for c in m.tool_calls or []]
            if m.function_call is not None:
                calls.append((m.function_call.name, m.function_call.arguments))
            if calls:
                thought = text or f"Thought: I can use {calls[0][0]}."
                text = thought + "".join(f"\nAction: {name}\nAction Input: {args}" for name, args in calls)
            elif functions:
                lang = "zh" if re.search(r"[\u4e00-\u9fff]", turns[-1][0]) else "en"
                text = DUMMY_THOUGHT[lang] + text
            turns[-1].append(text)
        else:  # tool / function result
            if not turns or len(turns[-1]) != 2 or "\nAction Input:" not in turns[-1][1]:
                raise PromptError(f"A {m.role} message must follow an assistant message that calls a tool.")
            turns[-1][1] += f"\nObservation: {text}"
            if i == len(messages) - 1:
                turns[-1][1] += "\nThought:"
    continuation = len(turns[-1]) == 2
    if functions:  # the instruction goes before the last question only
        turns[-1][0] = f"{react_instruction(functions)}\n\nQuestion: {turns[-1][0]}"
    history = [(t[0], t[1]) for t in turns[:-1]]
    _, ids = make_context(tokenizer, turns[-1][0], history, system, max_window_size=1 << 30)
    if continuation:
        ids += tokenizer.encode(turns[-1][1], allowed_special=set())
    return ChatPrompt(ids, functions, continuation)


@dataclass
class ParsedReply:
    content: str | None
    call: tuple[str, str] | None  # (name, JSON arguments)


def json_arguments(text: str) -> str:
    """Arguments as a JSON string: the model's text if it is JSON, else that text as a JSON string."""
    text = text.strip()
    try:
        json.loads(text)
        return text
    except ValueError:
        return json.dumps(text, ensure_ascii=False)


def parse_react(text: str) -> ParsedReply:
    """The last ``Action:``/``Action Input:`` pair becomes the call (its Thought the content);
    otherwise the text after the last ``Final Answer:`` is the reply."""
    i, j = text.rfind("\nAction:"), text.rfind("\nAction Input:")
    if text.startswith("Action:") and i < 0:
        text, i, j = "\n" + text, 0, text.rfind("\nAction Input:") + 1
    if 0 <= i < j:
        name = text[i + len("\nAction:") : j].strip()
        args = text[j + len("\nAction Input:") :]
        k = args.find("\nObservation:")
        args = args[:k] if k >= 0 else args
        if name:
            thought = text[:i]
            t = thought.find("Thought:")
            content = thought[t + len("Thought:") :].strip() if t >= 0 else thought.strip()
            return ParsedReply(content or None, (name, json_arguments(args)))
    for marker in ("\nFinal Answer:", "Final Answer:", "\nFinal answer:"):
        z = text.rfind(marker)
        if z >= 0:
            return ParsedReply(text[z + len(marker) :].strip(), None)
    return ParsedReply(text.strip(), None)


class ReactStream:
    """Incremental view of a ReAct reply for streaming: while generating, only the text after
    ``Final Answer:`` is released as content; a tool call is known once generation ends."""

    MARKER = "Final Answer:"

    def __init__(self) -> None:
        self.text = ""
        self.start: int | None = None  # where the answer begins in text
        self.released: int | None = None  # how much of text was handed out

    def feed(self, new_text: str) -> str:
        """Add generated text; return the content that can be shown now."""
        self.text += new_text
        if self.start is None:
            z = self.text.find(self.MARKER)
            if z < 0 or "\nAction:" in self.text[:z]:
                return ""
            self.start = z + len(self.MARKER)
        out = self.text[self.released if self.released is not None else self.start :]
        if self.released is None:
            out = out.lstrip()
            if not out:
                return ""
        self.released = len(self.text)
        return out

    def finish(self) -> ParsedReply:
        """The parsed reply, with ``content`` reduced to what was not released yet."""
        if self.released is not None:
            return ParsedReply(self.text[self.released :].rstrip(), None)
        return parse_react(self.text)
