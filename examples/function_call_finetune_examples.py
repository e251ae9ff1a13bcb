"""Write fine-tuning samples that teach a Qwen chat model to call functions (ReAct), in the format
that ``finetune/finetune.py`` reads.

    python examples/function_call_finetune_examples.py [OUTPUT.json]   # default: example_func_call_train_samples.json
    python finetune/finetune.py --model_name_or_path Qwen-7B-Chat --data_path example_func_call_train_samples.json ...

Qwen v1 calls functions through plain text. A ReAct instruction lists the tools, and the model answers
with ``Thought:``, ``Action:`` and ``Action Input:`` lines. Each tool's result follows as an
``Observation:`` line, and a ``Final Answer:`` line ends the reply. The fine-tuning format has only user
and assistant turns, so everything goes into those turns:

* The first question of a sample is preceded by the ReAct instruction, in ``"{instruction}\\n\\nQuestion:
  {question}"`` form. The instruction is built by ``qwen.serve.prompting.react_instruction``, the
  function the API server (``openai_api.py``) uses for ``functions``/``tools``, so training and serving
  see the same text. The server puts the instruction before the latest question. A multi-turn sample
  puts it before the first question instead, so that every trained reply comes after it.
* An assistant turn holds the whole ReAct trace: every Action, the Observation that came back and the
  Final Answer. Observations are therefore trained too, as in the original recipe. Replace them with
  real tool outputs when you write your own data.
* A reply that needs no tool still follows the format: ``Thought: ...`` and then ``Final Answer: ...``.

Sample 1 is one question whose reply calls two tools in a row. Sample 2 is a 4-round dialogue with
answers that need no tool.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qwen.serve.prompting import react_instruction
from qwen.serve.protocol import FunctionDefinition

DEFAULT_OUTPUT = "example_func_call_train_samples.json"

# Tools as an OpenAI client would send them (JSON-schema parameters).
FUNCTIONS = [
    FunctionDefinition(
        name="web_search",
        description="Search the web for recent facts and news. Returns the top results as text.",
        parameters={
            "type": "object",
            "properties": {"query": {"type": "string", "description": "the keywords to search for"}},
            "required": ["query"],
        },
    ),
    FunctionDefinition(
        name="image_gen",
        description="Draw a picture from an English description. Returns the URL of the image.",
        parameters={
            "type": "object",
            "properties": {"prompt": {"type": "string", "description": "what to draw, in English"}},
            "required": ["prompt"],
        },
    ),
]


def question(text: str) -> str:
    """A first question: the ReAct instruction, then the question, as the server writes them."""
    return f"{react_instruction(FUNCTIONS)}\n\nQuestion: {text}"


def call(thought: str, name: str, arguments: dict, observation: str) -> str:
    """One Thought/Action/Action Input/Observation step of a ReAct trace."""
    return (
        f"Thought: {thought}\nAction: {name}\nAction Input: {json.dumps(arguments, ensure_ascii=False)}\n"
        f"Observation: {observation}\n"
    )


def answer(text: str, thought: str = "I now know the final answer") -> str:
    return f"Thought: {thought}\nFinal Answer: {text}"


def conversation(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [m for user, bot in turns for m in ({"from": "user", "value": user}, {"from": "assistant", "value": bot})]


def build_samples() -> list[dict]:
    two_calls = conversation((
        question("Who won the 2022 FIFA World Cup? Then draw their captain lifting the trophy."),
        call("I need to find out who won the 2022 World Cup.", "web_search", {"query": "2022 FIFA World Cup winner"},
             "Argentina won the 2022 FIFA World Cup, beating France on penalties; Lionel Messi was captain.")
        + call("Argentina won and Messi was captain. Now I can draw the picture.", "image_gen",
               {"prompt": "Lionel Messi lifting the World Cup trophy, Argentina team celebrating"},
               '{"image_url": "https://example.com/images/messi-trophy.png"}')
        + answer("Argentina won the 2022 World Cup. Here is Messi lifting the trophy: "
                 "![](https://example.com/images/messi-trophy.png)"),
    ))
    dialogue = conversation(
        (question("你好"),
         answer("你好！我可以帮你搜索网络信息或者画图，请问有什么需要？", "这个问题不需要使用工具。")),
        ("帮我查一下杭州今天的天气。",
         call("我需要搜索杭州今天的天气。", "web_search", {"query": "杭州 今天 天气"},
              "杭州今天多云转小雨，气温 18 到 24 摄氏度，东风 2 级。")
         + answer("杭州今天多云转小雨，气温 18 到 24 摄氏度，出门记得带伞。")),
        ("根据这个天气，画一幅西湖的画。",
         call("我应该按照下雨的天气画西湖，描述要用英文。", "image_gen",
              {"prompt": "West Lake in Hangzhou on a cloudy, lightly rainy day, traditional Chinese painting"},
              '{"image_url": "https://example.com/images/west-lake-rain.png"}')
         + answer("画好了：![](https://example.com/images/west-lake-rain.png)")),
        ("谢谢！一句话总结一下我们聊了什么。",
         answer("我们查了杭州今天多云转小雨的天气，并画了一幅雨中的西湖。", "这个问题不需要使用工具。")),
    )
    return [{"id": "function_call_two_actions", "conversations": two_calls},
            {"id": "function_call_dialogue", "conversations": dialogue}]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", nargs="?", default=DEFAULT_OUTPUT, help=f"where to write (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    samples = build_samples()
    Path(args.output).write_text(json.dumps(samples, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(samples)} samples to {args.output}")


if __name__ == "__main__":
    main()
