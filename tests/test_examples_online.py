"""The examples in examples/ that run a model, executed as a user would: scripts as subprocesses against a
tiny checkpoint or a real server on one, Markdown snippets extracted and run.

A random tiny model never calls a tool, so the server here is the real app and engine in this process
with the model's output layer swapped for a script: a function of the prompt text decides the reply of
each request (the way a tool-using model would, e.g. answering with the observation it was given), and
prompts it does not script get the random model's own reply. Examples that need the `examples` extra
(langchain, smolagents) are skipped without it.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from qwen.chat import DEFAULT_SYSTEM, make_context
from qwen.engine import Engine
from qwen.serve.process import free_port
from qwen.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MAX_NEW_TOKENS = 48  # the checkpoint's default reply length: long enough for every scripted reply

Script = Callable[[str], "str | None"]


# ----- a server whose replies a test can script ---------------------------------------------------


class ScriptedHead(nn.Module):
    """Stands in for ``lm_head``: with a script loaded, each call (one per engine step) forces the
    script's next token, then ``<|im_end|>``; with none, the real head decides."""

    def __init__(self, real: nn.Linear, end_id: int) -> None:
        super().__init__()
        self.real, self.end_id = real, end_id
        self.script: list[int] | None = None
        self.calls = 0

    def load(self, ids: list[int] | None) -> None:
        self.script, self.calls = ids, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.script is None:
            return self.real(hidden)
        token = self.script[self.calls] if self.calls < len(self.script) else self.end_id
        self.calls += 1
        logits = torch.zeros(hidden.shape[0], self.real.out_features, dtype=torch.float32, device=hidden.device)
        logits[:, token] = 100.0
        return logits


class ScriptedEngine(Engine):
    """The engine, with each request's reply chosen by ``script(prompt text)`` (None: the model's own).
    The examples send one request at a time, so the head holds one script at a time."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.script: Script | None = None
        self.prompts: list[str] = []  # every request's prompt text, in order

    def submit(self, prompt_ids, params, on_event=None, adapter=None):
        prompt = self.tokenizer.decode(prompt_ids)
        self.prompts.append(prompt)
        reply = None if self.script is None else self.script(prompt)
        for prefill in ("Action Input:", "Action:"):  # a forced call (tool_choice) has its start in the prompt
            if reply is not None and prompt.endswith(prefill) and prefill in reply:
                reply = reply.split(prefill, 1)[1]
                break
        self.model.lm_head.load(None if reply is None else self.tokenizer.encode(reply))
        return super().submit(prompt_ids, params, on_event, adapter)


class Server:
    def __init__(self, url: str, engine: ScriptedEngine) -> None:
        self.url, self.engine = url, engine

    def script(self, script: Script | None) -> None:
        self.engine.script = script
        self.engine.prompts = []


@pytest.fixture(scope="module")
def tiny_short(tmp_path_factory) -> Path:
    """``tiny_chat``'s weights (same seed) with a longer default reply: a random model never ends a reply
    early, and the examples use the default."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("examples") / "tiny-chat", max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def _server(tiny_short):
    import uvicorn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen.serve.app import create_app

    tokenizer = AutoTokenizer.from_pretrained(tiny_short)
    model = AutoModelForCausalLM.from_pretrained(tiny_short).eval()
    model.lm_head = ScriptedHead(model.lm_head, tokenizer.im_end_id)
    engine = ScriptedEngine(model, tokenizer, max_batch_size=4)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny-chat"), host="127.0.0.1", port=port,
                                       log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "in-process server did not start"
        time.sleep(0.05)
    yield Server(f"http://127.0.0.1:{port}/v1", engine)
    uv.should_exit = True
    thread.join(10)


@pytest.fixture
def server(_server) -> Server:
    _server.script(None)
    return _server


def current_question(prompt: str) -> str:
    """The prompt from the ReAct instruction's last ``Question:`` on: this request's question and the
    assistant's steps so far."""
    return prompt.rsplit("Question:", 1)[-1]


def tool_user(choose: Callable[[str], tuple[str, dict] | None], finish: Callable[[str], str]) -> Script:
    """A tool-using model: with no observation yet in the current question, call the tool ``choose(prompt)``
    names, in ReAct form; after one, reply ``finish(last observation)``. Prompts without a ReAct
    instruction get None (the random model's reply)."""

    def reply(prompt: str) -> str | None:
        if "Call this tool to interact with" not in prompt:
            return None
        question = current_question(prompt)
        observations = re.findall(r"Observation:\s*(.*?)(?:<\|im_end\|>|\n|$)", question)
        if observations:
            return finish(observations[-1])
        chosen = choose(prompt)
        if chosen is None:
            return None
        name, args = chosen
        return f"Thought: I will use {name}.\nAction: {name}\nAction Input: {json.dumps(args)}"

    return reply


def final_answer(observation: str) -> str:
    return f" I now know the final answer.\nFinal Answer: the tool said {observation}"


EXPRESSION = "(3 + 4) * 12 - 2 ** 5"


def calculator_call(prompt: str) -> tuple[str, dict]:
    return "calculator", {"expression": EXPRESSION}


# ----- running examples ---------------------------------------------------------------------------


def run_example(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def python_blocks(markdown: Path) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", markdown.read_text(), re.S))


# ----- ReAct --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def react_demo():
    return load_example("react_demo")


def test_react_prompt_md_shows_the_demos_prompt(react_demo, tokenizer):
    """The walkthrough's full prompt is what the demo builds, which is what the server builds for the
    same tools as a ``tools`` request; its stop-word ids are the tokenizer's."""
    from qwen.serve.prompting import build_chat_prompt
    from qwen.serve.protocol import ChatCompletionRequest

    md = (EXAMPLES / "react_prompt.md").read_text()
    question = "What is (3 + 4) * 12 - 2 ** 5?"
    text, ids = make_context(tokenizer, react_demo.react_prompt(react_demo.TOOLS, question), [], DEFAULT_SYSTEM)
    assert f"```\n{text}```" in md
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                               "parameters": t.parameters}} for t in react_demo.TOOLS]
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": question}], tools=tools)
    assert build_chat_prompt(tokenizer, request).ids == ids
    assert tokenizer.encode("Observation:") == [37763, 367, 25] and "`[37763, 367, 25]`" in md
    assert tokenizer.encode("Observation:\n") == [37763, 367, 510] and "`[37763, 367, 510]`" in md


def test_react_demo_tools(react_demo):
    assert react_demo.calculate(EXPRESSION) == 52
    assert react_demo.calculate("-7 // 2 + 2.5 * 4 % 3") == -3
    assert react_demo.calculator({"expression": "1 / 3"}) == "0.333333333333"
    assert react_demo.calculator("2 ** 10") == "1024"  # a bare value instead of a JSON object
    for bad in ["__import__('os').system('true')", "x + 1", "(1).real", "[1, 2]", "'a' * 3", "9 ** 9 ** 9",
                "1" * 201]:
        with pytest.raises(ValueError):
            react_demo.calculate(bad)
    tools = react_demo.TOOLS
    assert react_demo.run_tool(tools, "calculator", '{"expression": "1 / 0"}') == "Error: division by zero"
    assert react_demo.run_tool(tools, "browser", "{}").startswith("Error: there is no tool 'browser'")
    assert react_demo.run_tool(tools, "search_notes", '"ChatML roles"').startswith("ChatML: ")
    assert react_demo.run_tool(tools, "search_notes", '{"query": "zzz"}') == "No note matches the query."


def test_react_demo_runs_tools_over_two_turns(server, react_demo):
    """Through the server: each question's scripted call runs the right local tool, its result comes
    back as the observation, and the second question's prompt holds the first turn's transcript."""

    def choose(prompt: str) -> tuple[str, dict]:
        if "2 ** 5" in current_question(prompt):
            return calculator_call(prompt)
        return "search_notes", {"query": "ChatML"}

    server.script(tool_user(choose, final_answer))
    out = run_example("react_demo.py", "--api-base", server.url, "--max-new-tokens", "80",
                      "What is (3 + 4) * 12 - 2 ** 5?", "What do the notes say about ChatML?").stdout
    assert f'Action: calculator\nAction Input: {{"expression": "{EXPRESSION}"}}\nObservation: 52\nThought:' in out
    assert "=== Final Answer: the tool said 52\n" in out
    chatml = react_demo.DOCUMENTS["ChatML"]
    assert f"Observation: ChatML: {chatml}" in out
    assert f"=== Final Answer: the tool said ChatML: {chatml}" in out
    last = server.engine.prompts[-1]
    assert "Observation: 52\nThought: I now know the final answer.\nFinal Answer: the tool said 52<|im_end|>" in last
    assert last.count("You have access to the following APIs") == 1  # the instruction is before the last question
    assert len(server.engine.prompts) == 4


def test_react_demo_local_checkpoint(tiny_short):
    """Completion mode on a model in the process: the loop runs to its end on the random model's text."""
    out = run_example("react_demo.py", "-c", str(tiny_short), "--max-new-tokens", "8", "--max-steps", "2",
                      "What is 1 + 1?").stdout
    assert "=== Question: What is 1 + 1?" in out
    assert "\n\n=== Final Answer: " in out or out.endswith("\n\n=== No final answer within 2 steps\n")


# ----- the OpenAI client ---------------------------------------------------------------------------


def test_function_call_examples(server):
    calls = {"get_current_time": {"timezone": "Asia/Shanghai"}, "get_current_weather": {"location": "Paris",
                                                                                          "unit": "celsius"}}

    def choose(prompt: str) -> tuple[str, dict] | None:
        return next(((name, args) for name, args in calls.items() if f"\n{name}: Call" in prompt), None)

    server.script(tool_user(choose, final_answer))
    out = run_example("function_call_examples.py", "--api-base", server.url).stdout
    chat = re.search(r"== 1\. multi-turn chat\nuser: Hello! Who are you\?\nassistant: (.*)\nuser: Give me", out, re.S)
    assert chat and chat.group(1).strip()
    assert 'function call: get_current_time({"timezone": "Asia/Shanghai"})' in out
    time_now = re.search(r"function result: (\d{4}-\d\d-\d\d \d\d:\d\d)\n", out).group(1)
    assert f"final answer: the tool said {time_now}\n" in out
    assert 'tool call: get_current_weather({"location": "Paris", "unit": "celsius"})' in out
    weather = json.dumps({"location": "Paris", "temperature": 18, "unit": "celsius", "sky": "cloudy"})
    assert f"tool result: {weather}\nfinal answer: the tool said {weather}\n" in out
    chunks = int(re.search(r"\((\d+) chunks with text\)", out).group(1))
    assert chunks > 5
    # The function and tool results reached the model as observations after the calls.
    assert any(f'Action Input: {{"timezone": "Asia/Shanghai"}}\nObservation: {time_now}' in p
               for p in server.engine.prompts)


def test_langchain_agent(server):
    pytest.importorskip("langchain_openai")
    pytest.importorskip("langchain")
    server.script(tool_user(calculator_call, final_answer))
    out = run_example("langchain_tooluse.py", "--api-base", server.url, EXPRESSION).stdout
    assert f'tool call: calculator({{"expression": "{EXPRESSION}"}})\ntool result: 52\n' in out
    assert "=== Answer: the tool said 52" in out


def test_agent_framework_smolagents(server):
    pytest.importorskip("smolagents")

    def finish(observation: str) -> str:  # smolagents ends by calling its final_answer tool
        return f"Thought: done.\nAction: final_answer\nAction Input: {json.dumps({'answer': observation})}"

    server.script(tool_user(calculator_call, finish))
    out = run_example("agent_framework.py", "--api-base", server.url, "--max-steps", "3", EXPRESSION).stdout
    assert "Calling tool: 'calculator'" in out
    assert out.rstrip().endswith("=== Answer: 52")


def test_openai_agents_sdk_runs_a_tool_over_the_responses_api(server):
    """The OpenAI Agents SDK (openai-agents) with its Responses API model against our server: the scripted model
    calls the agent's function tool, the SDK runs it and sends the result back, the model answers with it."""
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    calls = []

    @agents.function_tool
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression."""
        calls.append(expression)
        return "52"

    server.script(tool_user(calculator_call, final_answer))
    agents.set_tracing_disabled(True)
    model = agents.OpenAIResponsesModel(model="tiny-chat", openai_client=AsyncOpenAI(base_url=server.url, api_key="x"))
    agent = agents.Agent(name="calc", instructions="Use the calculator for arithmetic.", tools=[calculator],
                         model=model)
    result = agents.Runner.run_sync(agent, EXPRESSION)
    assert calls == [EXPRESSION]
    assert result.final_output == "the tool said 52"


# ----- system prompts, batches, vLLM ---------------------------------------------------------------


def test_system_prompt_md_snippets(server, tmp_path):
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny-terse", max_new_tokens=8)  # the snippets chat 8 times
    code = python_blocks(EXAMPLES / "system_prompt.md")
    for placeholder, value in [('path = "Qwen-1_8B-Chat"', f"path = {str(checkpoint)!r}"),
                               ("http://127.0.0.1:8000/v1", server.url)]:
        assert code.count(placeholder) == 1, placeholder
        code = code.replace(placeholder, value)
    script = tmp_path / "system_prompt.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user\nHi!" in proc.stdout
    assert "Good morning! -> " in proc.stdout and "[请用文言文回答。]" in proc.stdout
    assert "You are a patient maths teacher" in server.engine.prompts[-1]


def test_batch_inference(tiny_short, tiny_model, tokenizer):
    """Greedy replies from both batch paths equal ``model.chat``'s for each conversation alone."""
    batch = load_example("batch_inference")
    n = 12
    out = run_example("batch_inference.py", "-c", str(tiny_short), "--max-new-tokens", str(n)).stdout
    engine_part, chat_part = out.split("== batch_chat\n")
    engine_lines = re.findall(r"^    -> (.*) \((?:stop|length)\)$", engine_part, re.M)
    expected = [tiny_model.chat(tokenizer, q, do_sample=False, repetition_penalty=1.0, max_new_tokens=n)[0]
                for q in batch.QUERIES]
    assert [ast.literal_eval(reply) for reply in engine_lines] == expected  # the example prints repr()
    chat_lines = [ast.literal_eval(r) for r in re.findall(r"^    -> (.*)$", chat_part, re.M)]
    replies = [r for _, r in batch.batch_chat_replies(tiny_model, tokenizer, n)]
    assert chat_lines == replies and len(replies) == 3
    assert replies[1] == tiny_model.chat(tokenizer, "Translate 'good morning' for me.",
                                         system="You translate everything the user says into French.",
                                         do_sample=False, max_new_tokens=n)[0]
    assert replies[0] == tiny_model.chat(tokenizer, "What is my name?", [("Hi, I am Ann.", "Nice to meet you, Ann!")],
                                         do_sample=False, max_new_tokens=n)[0]


def test_vllm_wrapper_prompt_and_sampling(tiny_short, tokenizer, tmp_path):
    vw = load_example("vllm_wrapper")
    config = vw.load_generation_config(tiny_short)
    history = [("Hi", "Hello!")]
    assert vw.prompt_ids(tokenizer, config, "How are you?", history, "Be brief.") == make_context(
        tokenizer, "How are you?", history, "Be brief.", 6144)[1]
    config.max_window_size = 30  # the oldest turns that do not fit are dropped, as in model.chat
    long_history = [("one " * 10, "two " * 10), ("three", "four")]
    assert vw.prompt_ids(tokenizer, config, "q", long_history, "s") == make_context(
        tokenizer, "q", long_history[1:], "s")[1]
    stops = [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]
    assert stops == [151645, 151644, 151643]
    assert vw.sampling_kwargs(config, tokenizer) == {
        "max_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "top_p": 0.8, "top_k": -1, "repetition_penalty": 1.1,
        "stop_token_ids": stops, "detokenize": False}
    config.update(top_k=20, temperature=0.7)
    assert vw.sampling_kwargs(config, tokenizer)["top_k"] == 20
    assert vw.sampling_kwargs(config, tokenizer)["temperature"] == 0.7
    config.update(do_sample=False)
    greedy = vw.sampling_kwargs(config, tokenizer)
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"]) == (0.0, 1.0, -1)
    reply = tokenizer.encode(" Hello there. ") + [tokenizer.im_end_id] + tokenizer.encode("junk")
    assert vw.decode_reply(tokenizer, reply) == "Hello there."
    defaults = vw.load_generation_config(tmp_path)  # a folder without generation_config.json
    assert (defaults.top_p, defaults.max_new_tokens, defaults.chat_format) == (0.8, 512, "chatml")


def test_vllm_wrapper_without_vllm_says_so(tiny_short, monkeypatch):
    """The script's command line, run in this process (it stops before loading anything)."""
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    vw = load_example("vllm_wrapper")
    with pytest.raises(ImportError, match=r"^VLLMWrapper needs vLLM.*pip install vllm"):
        vw.VLLMWrapper(tiny_short)
    monkeypatch.setattr(sys, "argv", ["vllm_wrapper.py", "-c", str(tiny_short), "Hello"])
    with pytest.raises(SystemExit) as exit_:
        vw.main()
    assert exit_.value.code.startswith("error: VLLMWrapper needs vLLM")
