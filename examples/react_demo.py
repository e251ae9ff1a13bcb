"""Multi-turn ReAct tool use in completion mode, with local tools that need no API key.

    python examples/react_demo.py -c Qwen-7B-Chat                         # the model in this process
    python examples/react_demo.py --api-base http://127.0.0.1:8000/v1     # a running openai_api.py
    python examples/react_demo.py -c Qwen-7B-Chat "What is 17 * 23?" "And that minus 91?"

Each question becomes a ReAct prompt (the tool descriptions and format instruction before it); the
model continues the assistant text until it writes "Observation:", the demo runs the tool the model
named and appends the result as the observation, and the model continues again, until it writes
"Final Answer:" or the step limit is reached. Later questions see the earlier transcripts. See
react_prompt.md for the walkthrough. The prompt and parsing rules are the server's own
(``qwen.serve.prompting``), so this loop does by hand what ``openai_api.py`` does for ``tools``.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qwen.chat import DEFAULT_SYSTEM, make_context
from qwen.serve.prompting import OBSERVATION_STOP, parse_react, react_instruction
from qwen.serve.protocol import FunctionDefinition

History = list[tuple[str, str]]

# ----- local tools ---------------------------------------------------------------------------------


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments
    run: Callable[[Any], str]  # parsed arguments (a dict, or a string if the model wrote no JSON) -> text


def argument(args: Any, key: str) -> str:
    """The ``key`` argument; a model that wrote a bare value instead of a JSON object is taken at its word."""
    if isinstance(args, dict):
        return str(args.get(key, next(iter(args.values()), "")))
    return str(args)


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_BITS = 4096  # bounds the size of a power, so a model cannot make the demo compute 9**9**9


def calculate(expression: str) -> int | float:
    """Arithmetic on numbers with + - * / // % ** and parentheses. The expression comes from the model,
    so it is parsed into a syntax tree and only those operations are evaluated; never ``eval``."""
    if len(expression) > 200:
        raise ValueError("the expression is longer than 200 characters")

    def value(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(left) > 1 and abs(right) * math.log2(abs(left)) > MAX_BITS:
                raise ValueError("the power is too large")
            return _BINARY[type(node.op)](left, right)
        raise ValueError(f"only numbers and + - * / // % ** are allowed, not {ast.unparse(node)!r}")

    return value(ast.parse(expression.strip(), mode="eval").body)


def calculator(args: Any) -> str:
    result = calculate(argument(args, "expression"))
    return format(result, ".12g") if isinstance(result, float) else str(result)


# A few built-in notes stand in for a document store.
DOCUMENTS = {
    "Qwen models": "Qwen v1 comes in 1.8B, 7B, 14B and 72B sizes, each as a base model and a -Chat model. "
                   "The chat models were trained for tool use with ReAct prompting.",
    "ChatML": "Qwen chat models read ChatML: each turn is a start token, the role (system, user or assistant), "
              "a newline, the text and an end token.",
    "ReAct": "ReAct interleaves reasoning and acting: the model writes Thought, Action and Action Input lines, "
             "the program runs the action and appends an Observation, and the model continues.",
    "Stop words": "Generation stops at 'Observation:' so that the program, not the model, writes the tool result.",
}


def search_documents(args: Any) -> str:
    """The notes sharing the most words with the query (case-insensitive), best first."""
    words = set(re.findall(r"\w+", argument(args, "query").lower()))
    scored = [(len(words & set(re.findall(r"\w+", f"{title} {text}".lower()))), title, text)
              for title, text in DOCUMENTS.items()]
    hits = sorted((s for s in scored if s[0] > 0), key=lambda s: -s[0])[:2]
    return "\n".join(f"{title}: {text}" for _, title, text in hits) or "No note matches the query."


TOOLS = [
    Tool("calculator", "Evaluate an arithmetic expression exactly.",
         {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. (3 + 4) * 12"}},
          "required": ["expression"]}, calculator),
    Tool("search_notes", "Search a small local collection of notes about Qwen, ChatML and ReAct.",
         {"type": "object", "properties": {"query": {"type": "string", "description": "keywords to look for"}},
          "required": ["query"]}, search_documents),
]

# ----- plug in a web search here -------------------------------------------------------------------
# The original demo searched the web through SerpAPI. To do the same, write a function that takes the
# parsed arguments and returns the result as text (e.g. a call to your search provider, with the API key
# read from the environment), and add it to TOOLS:
#
#     def web_search(args) -> str:
#         return my_provider.search(argument(args, "query"))
#
#     TOOLS.append(Tool("web_search", "Search the web for recent facts.",
#                       {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
#                       web_search))
# ---------------------------------------------------------------------------------------------------


def run_tool(tools: list[Tool], name: str, arguments: str) -> str:
    """The observation for a call: the tool's result, or an error the model can read and recover from."""
    tool = next((t for t in tools if t.name == name), None)
    if tool is None:
        return f"Error: there is no tool {name!r}; use one of {', '.join(t.name for t in tools)}."
    try:
        return tool.run(json.loads(arguments))
    except Exception as exc:  # a tool failing is an observation, not the end of the conversation
        return f"Error: {exc}"


# ----- the ReAct loop ------------------------------------------------------------------------------


def react_prompt(tools: list[Tool], question: str) -> str:
    """The user message: the ReAct instruction the server builds for ``tools`` requests, then the question."""
    functions = [FunctionDefinition(name=t.name, description=t.description, parameters=t.parameters) for t in tools]
    return f"{react_instruction(functions)}\n\nQuestion: {question}"


# complete(user message, history, assistant text so far) -> the model's continuation, cut before "Observation:"
Complete = Callable[[str, History, str], str]


def react_turn(complete: Complete, tools: list[Tool], question: str, history: History, max_steps: int,
               show: Callable[[str], None] = print) -> tuple[str | None, History]:
    """Answer one question: continue, run the latest call, append its observation, repeat. Returns the
    final answer (None if the step limit came first) and the history with this turn's transcript."""
    user = react_prompt(tools, question)
    transcript = ""
    answer = None
    for _ in range(max_steps):
        output = complete(user, history, transcript)
        show(output)
        parsed = parse_react(output)
        if parsed.call is None:
            transcript += output
            answer = parsed.content
            break
        observation = run_tool(tools, *parsed.call)
        step = f"\n{OBSERVATION_STOP} {observation}\nThought:"
        show(step)
        transcript += output.rstrip() + step
    return answer, history + [(question, transcript)]


def local_completer(checkpoint: str, max_new_tokens: int, system: str) -> Complete:
    """Completion mode on a model loaded here: the ChatML prompt with an open assistant turn, the text
    so far appended as plain text, greedy decoding on qwen's engine until "Observation:" or a turn end."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qwen  # noqa: F401  (registers the Qwen classes)
    from qwen.engine import Engine
    from qwen.sampling import SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map="auto").eval()
    engine = Engine(model, tokenizer, max_batch_size=1)
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=False, stop=[OBSERVATION_STOP],
                            stop_token_ids=[tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id])

    def complete(user: str, history: History, transcript: str) -> str:
        _, ids = make_context(tokenizer, user, history, system, max_window_size=model.config.seq_length)
        ids += tokenizer.encode(transcript, allowed_special=set())
        return engine.generate([ids], params)[0].text

    return complete


def server_completer(api_base: str, api_key: str, model: str | None, max_tokens: int, system: str) -> Complete:
    """Completion mode through the server: a last assistant message is continued, not answered."""
    from openai import OpenAI

    client = OpenAI(base_url=api_base, api_key=api_key)
    model = model or client.models.list().data[0].id

    def complete(user: str, history: History, transcript: str) -> str:
        messages = [{"role": "system", "content": system}]
        for query, reply in history:
            messages += [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": user})
        if transcript:
            messages.append({"role": "assistant", "content": transcript})
        reply = client.chat.completions.create(model=model, messages=messages, stop=[OBSERVATION_STOP],
                                               temperature=0, max_tokens=max_tokens)
        return reply.choices[0].message.content or ""

    return complete


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--checkpoint", help="a Qwen -Chat checkpoint folder, run in this process")
    where.add_argument("--api-base", help="an openai_api.py server, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", help="model id on the server (default: the one it serves)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="per model call")
    parser.add_argument("--max-steps", type=int, default=5, help="model calls per question")
    parser.add_argument("--system", default=DEFAULT_SYSTEM)
    parser.add_argument("questions", nargs="*",
                        default=["What is (3 + 4) * 12 - 2 ** 5?", "What do the notes say about ChatML?"])
    args = parser.parse_args()
    if args.checkpoint:
        complete = local_completer(args.checkpoint, args.max_new_tokens, args.system)
    else:
        complete = server_completer(args.api_base, args.api_key, args.model, args.max_new_tokens, args.system)
    history: History = []
    for question in args.questions:
        print(f"\n=== Question: {question}\n")
        answer, history = react_turn(complete, TOOLS, question, history, args.max_steps,
                                     show=lambda text: print(text, end="", flush=True))
        print(f"\n\n=== Final Answer: {answer}" if answer is not None else
              f"\n\n=== No final answer within {args.max_steps} steps")


if __name__ == "__main__":
    main()
