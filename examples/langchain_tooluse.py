"""A LangChain agent with local tools, its model served by openai_api.py.

    pip install -e ".[examples]"                         # langchain, langchain-openai
    python openai_api.py -c Qwen-7B-Chat                 # in one terminal
    python examples/langchain_tooluse.py                 # in another (--api-base for another address)

``ChatOpenAI`` talks to the server like to any OpenAI endpoint: LangChain sends the tools as JSON
schema, the server has the model pick one in Qwen's ReAct format and returns a tool call, LangChain
runs the tool and sends its result back as a ``tool`` message, until the model answers. The tools
are the ReAct demo's local ones (react_demo.py): a calculator and a search over a few notes.

Each question starts a new conversation here; ``result["messages"]`` plus a new user message would
carry one on.
"""

from __future__ import annotations

import argparse
import json

from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.errors import GraphRecursionError
from openai import OpenAI
from react_demo import TOOLS, run_tool


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly, e.g. (3 + 4) * 12 - 2 ** 5."""
    return run_tool(TOOLS, "calculator", json.dumps({"expression": expression}))


@tool
def search_notes(query: str) -> str:
    """Search a small local collection of notes about Qwen, ChatML and ReAct."""
    return run_tool(TOOLS, "search_notes", json.dumps({"query": query}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-base", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", help="model id (default: the one the server serves)")
    parser.add_argument("--max-tokens", type=int, help="per model call (default: the checkpoint's max_new_tokens)")
    parser.add_argument("--max-steps", type=int, default=5, help="model calls per question")
    parser.add_argument("questions", nargs="*",
                        default=["What is (3 + 4) * 12 - 2 ** 5?", "What do the notes say about stop words?"])
    args = parser.parse_args()
    model = args.model or OpenAI(base_url=args.api_base, api_key=args.api_key).models.list().data[0].id
    llm = ChatOpenAI(model=model, base_url=args.api_base, api_key=args.api_key, temperature=0,
                     max_tokens=args.max_tokens)
    agent = create_agent(llm, tools=[calculator, search_notes], system_prompt="You are a helpful assistant.")
    for question in args.questions:
        print(f"\n=== Question: {question}")
        try:
            # Each model call and each tool run is one graph step.
            result = agent.invoke({"messages": [{"role": "user", "content": question}]},
                                  {"recursion_limit": 2 * args.max_steps})
        except GraphRecursionError:
            print(f"=== No answer within {args.max_steps} model calls")
            continue
        for message in result["messages"][1:]:
            if isinstance(message, AIMessage) and message.tool_calls:
                for call in message.tool_calls:
                    print(f"tool call: {call['name']}({json.dumps(call['args'], ensure_ascii=False)})")
            elif isinstance(message, ToolMessage):
                print(f"tool result: {message.content}")
            else:
                print(f"=== Answer: {message.content}")


if __name__ == "__main__":
    main()
