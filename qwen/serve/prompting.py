"""OpenAI messages -> a Qwen chat prompt, and Qwen's ReAct output -> tool calls.

Qwen v1 calls functions by ReAct prompting: the functions are described in an instruction put
before the last question, the model writes ``Thought:``/``Action:``/``Action Input:`` lines and
generation stops at ``Observation:``; tool results come back as ``Observation:`` lines. This module
holds those rules (the original openai_api.py's), for ``tools`` and legacy ``functions`` alike, maps
every message ordering the OpenAI API accepts onto ChatML, and forces a call for ``tool_choice`` by
writing the start of the reply (``ChatPrompt.prefill``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..chat import DEFAULT_SYSTEM
from ..grammar import JSON_OPTIONS
from .protocol import ChatCompletionRequest, ChatMessage, FunctionDefinition, NamedFunction, NamedToolChoice

TOOL_DESC = (
    "{name}: Call this tool to interact with the {human} API. What is the {human} API useful for? "
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
    """The request cannot form a Qwen chat (the server answers 400 with this message, naming ``param``)."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ChatPrompt:
    """Prompt ids for a chat request, and what the app needs to read the model's reply."""

    ids: list[int]
    functions: list[FunctionDefinition] = field(default_factory=list)  # empty: no function calling
    continuation: bool = False  # the prompt ends inside an assistant message: the reply continues it
    # The start of the reply that the server wrote at the end of ``ids`` (e.g. ``Action: X\nAction Input:``
    # to force a call, ``Thought:`` after a tool result): with functions, parse ``prefill + output``.
    prefill: str = ""


def _tool_choice(request: ChatCompletionRequest) -> str | NamedToolChoice | NamedFunction | None:
    """``tool_choice``, else the legacy ``function_call`` (None: neither is set)."""
    return request.tool_choice if request.tool_choice is not None else request.function_call


def requested_functions(request: ChatCompletionRequest) -> list[FunctionDefinition]:
    """The functions the model may call: ``tools`` (or legacy ``functions``) unless turned off; only
    the named one when ``tool_choice`` names one."""
    if request.tools and request.functions:
        raise PromptError("Give either tools or functions, not both.", "tools")
    functions = [t.function for t in request.tools] if request.tools else list(request.functions or [])
    choice = _tool_choice(request)
    if choice == "none":
        return []
    if choice == "required" and not functions:
        raise PromptError("tool_choice 'required' needs tools to call.", "tool_choice")
    name = getattr(getattr(choice, "function", choice), "name", None)
    if name is not None:
        chosen = [f for f in functions if f.name == name]
        if not chosen:
            raise PromptError(f"tool_choice names {name!r}, which is not among the given tools.", "tool_choice")
        return chosen
    return functions


def forced_call(request: ChatCompletionRequest, functions: list[FunctionDefinition]) -> str:
    """The start of a reply that has to call a tool (``tool_choice`` "required" or a named function),
    or "" when the model may answer in text.

    A ReAct reply is ``Thought: ...\nAction: NAME\nAction Input: ARGS``; starting it at ``Action:``
    leaves the model nothing to write but a tool name and its arguments, and with a single tool the
    name is written too. The Thought is skipped: a free thought may run on until max_tokens before
    any Action line, and a forced call needs no content (OpenAI's come without)."""
    if _tool_choice(request) in (None, "none", "auto"):
        return ""
    return f"Action: {functions[0].name}\nAction Input:" if len(functions) == 1 else "Action:"


def forced_call_grammar(prompt: ChatPrompt) -> str | None:
    """The output that completes a forced call's ``prefill``, as a Lark grammar in llguidance's dialect
    (for ``SamplingParams.grammar``): after ``Action:`` one of the tool names, then ``Action Input:``;
    and arguments valid under that tool's parameters schema. Without it the prefill makes a call
    likely, with it certain. None when no call is forced. JSON arguments are laid out as json.dumps writes
    them (as ``response_format``'s are); a schema keyword that cannot be enforced is ignored (OpenAI's
    non-strict function calling: best effort) unless the function says ``strict: true``, when compiling the
    grammar fails instead (``qwen.grammar.lark_grammar``: ValueError)."""
    if not prompt.prefill.startswith("Action:"):
        return None
    functions = prompt.functions
    if prompt.prefill.endswith("\nAction Input:"):  # the one function's name is in the prefill
        start = '" " args0'
    else:
        start = " | ".join(json.dumps(f" {f.name}\nAction Input: ") + f" args{k}" for k, f in enumerate(functions))
    rules = [f"start: {start}"]
    for k, f in enumerate(functions):
        schema = {**f.arguments_schema, "x-guidance": {**JSON_OPTIONS, "lenient": f.strict is not True}}
        rules.append(f"args{k}: %json {json.dumps(schema, ensure_ascii=False)}")
    return "\n".join(rules) + "\n"


def react_instruction(functions: list[FunctionDefinition]) -> str:
    tools_text = "\n\n".join(
        TOOL_DESC.format(
            name=f.name, human=f.name_for_human or f.name, description=f.description,
            parameters=json.dumps(f.parameters, ensure_ascii=False),
        )
        for f in functions
    )
    return REACT_INSTRUCTION.format(tools_text=tools_text, tools_names=", ".join(f.name for f in functions))


def _clean(text: str) -> str:
    return text.lstrip("\n").rstrip()


def _join(first: str, second: str, sep: str) -> str:
    return f"{first}{sep}{second}" if first and second else first or second


@dataclass
class _Call:
    """One tool call of an assistant message, and the tool's result once a tool message gives it."""

    id: str
    name: str
    arguments: str
    thought: str
    result: str | None = None

    def step(self) -> str:
        text = f"Thought: {self.thought}\nAction: {self.name}\nAction Input: {self.arguments}"
        return text if self.result is None else f"{text}\nObservation: {self.result}"


@dataclass
class _Block:
    """One ChatML message. ``tail`` says how an assistant text ends: "text", or a ReAct step whose
    "action" still waits for its result, or the "observation" that the model's next step follows."""

    role: str
    text: str = ""
    tail: str = "text"


def _calls(message: ChatMessage, text: str) -> list[_Call]:
    """The tool calls of an assistant message (tool_calls and legacy function_call alike); the
    message's text is the Thought of the first (the others get the default one)."""
    calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]
    if message.function_call is not None:
        calls.append(("", message.function_call.name, message.function_call.arguments))
    thought = text.removeprefix("Thought:").strip()
    return [
        _Call(id_, name, args, (thought if k == 0 else "") or f"I can use {name}.")
        for k, (id_, name, args) in enumerate(calls)
    ]


def _answer(calls: list[_Call], message: ChatMessage, text: str) -> None:
    """Attach a tool result to the call it answers: the one with its ``tool_call_id``, else the first
    call still without a result (legacy function messages carry no id)."""
    waiting = [c for c in calls if c.result is None]
    if not waiting:
        raise PromptError(f"A {message.role} message must answer a tool call of the assistant message before "
                          "it, and each call has an answer already.")
    match = next((c for c in waiting if message.tool_call_id and c.id == message.tool_call_id), waiting[0])
    match.result = text


def _conversation(messages: list[ChatMessage], react: bool) -> tuple[str, list[_Block]]:
    """The system prompt and the ChatML messages for any ordering the OpenAI API accepts.

    - system/developer messages before the first other message form the system prompt (joined);
      a later one becomes user text where it stands: Qwen v1 saw a system message only at the start,
      and what a client puts mid-conversation is an instruction for what follows, which the model
      obeys as the next user turn (it is joined to a user message right after it).
    - consecutive messages of one role are joined into one ChatML message, with a blank line
      between texts, so user and assistant alternate as Qwen v1 was trained (an assistant message
      may still come first: it is kept where it stands, with no made-up user turn before it).
    - an assistant message's tool calls become ReAct steps, each followed by the ``Observation:`` of
      the tool message that answers it, so the assistant message, its tool results and the assistant
      messages after them read as one ReAct trace.
    - with functions offered, a plain assistant text is a ReAct final answer, as in the original.
    """
    system: list[str] = []
    blocks: list[_Block] = []
    calls: list[_Call] = []  # the calls of the latest assistant message, while tool messages answer them

    def end_round_trip() -> None:
        if calls:
            block = blocks[-1]
            block.text = _join(block.text, "\n".join(c.step() for c in calls), "\n")
            block.tail = "action" if calls[-1].result is None else "observation"
            calls.clear()

    for message in messages:
        text = _clean(message.text())
        if message.role in ("tool", "function"):
            if not calls:
                raise PromptError(f"A {message.role} message must follow an assistant message that calls a tool.")
            _answer(calls, message, text)
            continue
        end_round_trip()
        if message.role in ("system", "developer") and not blocks:
            system.append(text)
        elif message.role in ("system", "developer", "user"):
            if blocks and blocks[-1].role == "user":
                blocks[-1].text = _join(blocks[-1].text, text, "\n\n")
            else:
                blocks.append(_Block("user", text))
        else:  # assistant
            if not blocks or blocks[-1].role != "assistant":
                blocks.append(_Block("assistant"))
            block = blocks[-1]
            calls = _calls(message, text)
            if calls:
                continue  # written once their results are known
            if block.tail != "text" or (react and not block.text):
                question = next((b.text for b in reversed(blocks) if b.role == "user"), text)
                text = DUMMY_THOUGHT["zh" if re.search(r"[\u4e00-\u9fff]", question) else "en"] + text
            block.text = _join(block.text, text, "\n\n" if block.tail == "text" else "\n")
            block.tail = "text"
    end_round_trip()
    return "\n\n".join(s for s in system if s) or DEFAULT_SYSTEM, blocks


def _chatml(tokenizer, system: str, blocks: list[_Block], reply: str) -> list[int]:
    """ChatML ids laid out as ``make_context`` lays them out (blocks joined by newlines, special tokens
    in contents disallowed), ending in an assistant message open at ``reply``."""
    nl = tokenizer.encode("\n")

    def block(role: str, text: str) -> list[int]:
        return [tokenizer.im_start_id] + tokenizer.encode(role) + nl + tokenizer.encode(text, allowed_special=set())

    ids = block("system", system) + [tokenizer.im_end_id]
    for b in blocks:
        ids += nl + block(b.role, b.text) + [tokenizer.im_end_id]
    return ids + nl + block("assistant", reply)


def build_chat_prompt(tokenizer, request: ChatCompletionRequest) -> ChatPrompt:
    """Turn the request's messages into prompt ids (see ``_conversation`` for how orderings map onto
    ChatML). With functions, the ReAct instruction goes before the last user message, as the original
    server put it; without a user message, it is one of its own. A last assistant message is
    continued; after a last tool result the model's next ReAct step begins. A forced call
    (``forced_call``) is written at the start of the reply."""
    functions = requested_functions(request)
    prefill = forced_call(request, functions)
    system, blocks = _conversation(list(request.messages), bool(functions))
    if functions:
        instruction = react_instruction(functions)
        users = [b for b in blocks if b.role == "user"]
        if users:
            users[-1].text = f"{instruction}\n\nQuestion: {users[-1].text}"
        else:
            blocks.insert(0, _Block("user", instruction))
    if not blocks or blocks[-1].role != "assistant":
        return ChatPrompt(_chatml(tokenizer, system, blocks, prefill), functions, prefill=prefill)
    last = blocks.pop()
    if last.tail == "observation":
        prefill = prefill or "Thought:"
        ids = _chatml(tokenizer, system, blocks, f"{last.text}\n{prefill}")
        return ChatPrompt(ids, functions, continuation=True, prefill=prefill)
    if prefill:
        raise PromptError("tool_choice asks for a tool call, but the messages end with an assistant message to "
                          "continue; end them with a user or tool message.", "tool_choice")
    return ChatPrompt(_chatml(tokenizer, system, blocks, last.text), functions, continuation=True)


@dataclass
class ParsedReply:
    content: str | None
    call: tuple[str, str] | None  # (name, JSON arguments; a cut-off call's: the partial text as written)


def json_arguments(text: str) -> str:
    """Arguments as a JSON string: the model's text if it is JSON, else that text as a JSON string."""
    text = text.strip()
    try:
        json.loads(text)
        return text
    except ValueError:
        return json.dumps(text, ensure_ascii=False)


def parse_react(text: str, cut: bool = False) -> ParsedReply:
    """The last ``Action:``/``Action Input:`` pair becomes the call (its Thought the content);
    otherwise the text after the last ``Final Answer:`` is the reply. ``cut``: the reply ended at the
    length limit, so a call's arguments are the partial text the model wrote (OpenAI reports such a call
    with finish_reason "length" and its raw arguments), not wrapped into a JSON string."""
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
            return ParsedReply(content or None, (name, args.strip() if cut else json_arguments(args)))
    for marker in ("\nFinal Answer:", "Final Answer:", "\nFinal answer:"):
        z = text.rfind(marker)
        if z >= 0:
            return ParsedReply(text[z + len(marker) :].strip(), None)
    return ParsedReply(text.strip(), None)


class ReactStream:
    """Incremental view of a ReAct reply for streaming: while generating, only the text after
    ``Final Answer:`` is released as content; a tool call is known once generation ends. A reply
    that continues the prompt's ``prefill`` is read as the prefill followed by the output."""

    MARKER = "Final Answer:"

    def __init__(self, prefill: str = "") -> None:
        self.text = prefill
        self.start: int | None = None  # where the answer begins in text
        self.released: int | None = None  # how much of text was handed out

    def feed(self, new_text: str) -> str:
        """Add generated text; return the content that can be shown now."""
        self.text += new_text
        if self.start is None:
            z = self.text.find(self.MARKER)
            if z < 0 or "\nAction:" in "\n" + self.text[:z]:
                return ""
            self.start = z + len(self.MARKER)
        out = self.text[self.released if self.released is not None else self.start :]
        if self.released is None:
            out = out.lstrip()
            if not out:
                return ""
        self.released = len(self.text)
        return out

    def finish(self, cut: bool = False) -> ParsedReply:
        """The parsed reply (``cut``: see ``parse_react``), with ``content`` reduced to what was not released yet."""
        if self.released is not None:
            return ParsedReply(self.text[self.released :].rstrip(), None)
        return parse_react(self.text, cut)
