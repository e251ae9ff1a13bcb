"""An agent framework on top of the server: a smolagents ``ToolCallingAgent`` with local tools.

    pip install -e ".[examples]"                         # smolagents
    python openai_api.py -c Qwen-7B-Chat                 # in one terminal
    python examples/agent_framework.py                   # in another (--api-base for another address)

The original repository had a page on using Qwen as a HuggingFace ``transformers`` Agent; that API
(``transformers.tools``, later ``transformers.agents``) was removed from transformers, and its
successor is the separate ``smolagents`` library. Its ``OpenAIServerModel`` works with any
OpenAI-compatible endpoint: the agent sends the tools as JSON schema, the server turns the model's
ReAct ``Action:`` into a tool call, and the agent runs the tool and loops until the model calls
``final_answer``. The tools are the ReAct demo's local ones (react_demo.py).
"""

from __future__ import annotations

import argparse
import json

from openai import OpenAI
from react_demo import TOOLS, run_tool
from smolagents import OpenAIServerModel, ToolCallingAgent, tool


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: the expression, e.g. (3 + 4) * 12 - 2 ** 5
    """
    return run_tool(TOOLS, "calculator", json.dumps({"expression": expression}))


@tool
def search_notes(query: str) -> str:
    """Search a small local collection of notes about Qwen, ChatML and ReAct.

    Args:
        query: keywords to look for
    """
    return run_tool(TOOLS, "search_notes", json.dumps({"query": query}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-base", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", help="model id (default: the one the server serves)")
    parser.add_argument("--max-steps", type=int, default=5, help="agent steps per question")
    parser.add_argument("questions", nargs="*", default=["What is (3 + 4) * 12 - 2 ** 5?"])
    args = parser.parse_args()
    model_id = args.model or OpenAI(base_url=args.api_base, api_key=args.api_key).models.list().data[0].id
    model = OpenAIServerModel(model_id=model_id, api_base=args.api_base, api_key=args.api_key, temperature=0)
    agent = ToolCallingAgent(tools=[calculator, search_notes], model=model, max_steps=args.max_steps)
    for question in args.questions:
        answer = agent.run(question)
        print(f"=== Answer: {answer}")


if __name__ == "__main__":
    main()
