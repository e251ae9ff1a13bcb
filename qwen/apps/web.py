"""Browser chat with a Qwen checkpoint (``python web_demo.py -c FOLDER``), built with gradio 6.

Each browser session has its own history; replies stream; Stop cancels the generation; model
output is shown as sanitized Markdown, so HTML or script in a reply never runs in the page.
"""

import argparse
import copy
import sys
import threading
from collections.abc import Iterator

from ..entry_points import program_name
from ..loading import (
    add_lora_arg,
    add_model_args,
    engine_settings,
    front_end_checkpoint,
    load_lora_arg,
    load_model,
)
from ..ports import WEB_PORT, port_number, port_problem
from . import sampling_settings

DEFAULT_SYSTEM = "You are a helpful assistant."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=program_name("web_demo.py"),
                                description="Chat with a Qwen v1 checkpoint in the browser")
    p.add_argument("-c", "--checkpoint-path", help="original Qwen checkpoint folder")
    p.add_argument("--share", action="store_true", help="create a public gradio link")
    p.add_argument("--inbrowser", action="store_true", help="open a browser tab")
    p.add_argument("--server-port", type=port_number, default=WEB_PORT,
                   help="port to listen on (default: %(default)s; the API server's is 8000)")
    p.add_argument("--server-name", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--demo", action="store_true", help="use a tiny random checkpoint (replies are random text)")
    add_model_args(p)
    add_lora_arg(p)
    return p.parse_args(argv)


def to_messages(history: list[tuple[str, str]]) -> list[dict]:
    return [m for q, r in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": r})]


class _Run:
    """One reply being generated for one browser session: ``stop`` asks it to end, ``done`` says it has."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.done = threading.Event()


def build_ui(model, tokenizer, title: str = "Qwen", adapter=None, **engine_kw):
    """The gradio Blocks app around a loaded model.

    Stop and Clear end a running reply through a per-session flag that the generator checks between
    tokens, so the reply ends like a finished one. Gradio's own ``cancels`` kills the event's task
    instead, and the page then sometimes shows "Error" for the stopped stream (gradio issues 10648,
    10342)."""
    import gradio as gr

    from .session import EngineChat

    runs: dict[str, _Run] = {}
    # the users' turns share its batches
    chat = EngineChat(model, tokenizer, max_batch_size=4, adapter=adapter, **engine_kw)

    def generate(query: str, history: list, system: str, temperature: float, top_p: float, max_new_tokens: int,
                 request: gr.Request) -> Iterator[tuple[list[dict], list, str]]:
        query = (query or "").strip()
        if not query:
            gr.Warning("Type a message first.")
            yield to_messages(history), history, ""
            return
        config = copy.deepcopy(model.generation_config)
        config.update(max_new_tokens=int(max_new_tokens), **sampling_settings(temperature, top_p=float(top_p)))
        run = runs[request.session_hash] = _Run()
        turn = history + [(query, "")]
        replies = chat.stream(query, history, system or DEFAULT_SYSTEM, config)
        try:
            for reply in replies:
                if run.stop.is_set():
                    return  # the screen already shows the last yielded turn
                # The state follows the screen at every step, so a stopped reply stays in the conversation.
                turn = history + [(query, reply)]
                yield to_messages(turn), turn, ""
            if not run.stop.is_set():
                yield to_messages(turn), turn, ""
        finally:
            replies.close()  # ends the generation thread at once
            if runs.get(request.session_hash) is run:
                del runs[request.session_hash]
            run.done.set()

    def stop_generation(request: gr.Request) -> None:
        """End this session's running reply and wait until it has ended, so a Clear that follows wins."""
        if (run := runs.get(request.session_hash)) is not None:
            run.stop.set()
            run.done.wait(timeout=60)

    def stop_and_clear(request: gr.Request) -> tuple[list, list]:
        stop_generation(request)
        return [], []

    def regenerate(history: list, system: str, temperature: float, top_p: float, max_new_tokens: int,
                   request: gr.Request) -> Iterator[tuple[list[dict], list, str]]:
        if not history:
            yield [], history, ""
            return
        *earlier, (query, _) = history
        yield from generate(query, list(earlier), system, temperature, top_p, max_new_tokens, request)

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}")
        history = gr.State([])
        chatbot = gr.Chatbot(elem_id="chatbot", height=480, sanitize_html=True, render_markdown=True)
        msg = gr.Textbox(elem_id="msg", placeholder="Type a message and press Enter", submit_btn=True,
                         show_label=False)
        with gr.Row():
            stop = gr.Button("Stop", elem_id="stop")
            regen = gr.Button("Regenerate", elem_id="regenerate")
            clear = gr.Button("Clear History", elem_id="clear")
        with gr.Accordion("Settings", open=False):
            system = gr.Textbox(DEFAULT_SYSTEM, label="System prompt", elem_id="system")
            temperature = gr.Slider(0, 2, value=1.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=float(getattr(model.generation_config, "top_p", None) or 1.0),
                              step=0.05, label="top_p")
            max_new = gr.Slider(1, 2048, value=int(model.generation_config.max_new_tokens or 512), step=1,
                                label="Max new tokens")
        inputs = [system, temperature, top_p, max_new]
        msg.submit(generate, [msg, history, *inputs], [chatbot, history, msg])
        regen.click(regenerate, [history, *inputs], [chatbot, history, msg])
        stop.click(stop_generation, None, None, queue=False)
        for clearing in (clear.click, chatbot.clear):  # our button and the Chatbot's own trash can
            clearing(stop_and_clear, None, [chatbot, history], queue=False)
    return demo


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if problem := port_problem(args.server_name, args.server_port):
        sys.exit(problem)  # before the model loads, which can take minutes
    with front_end_checkpoint(args) as (path, is_demo):
        title = "Qwen demo (tiny random model: replies are random text)" if is_demo else "Qwen"
        if is_demo:
            print(title)
        try:
            model, tokenizer = load_model(path, args)
        except (OSError, ValueError) as exc:
            sys.exit(f"error: cannot load {path}: {exc}")
        adapter = load_lora_arg(model, args)
        if adapter is not None:
            title += f" + LoRA adapter {adapter.name}"
        try:
            demo = build_ui(model, tokenizer, title, adapter, **engine_settings(args))
        except ValueError as exc:  # settings the engine refuses
            sys.exit(f"error: {exc}")
        try:
            demo.queue(default_concurrency_limit=4).launch(
                server_name=args.server_name, server_port=args.server_port, share=args.share, inbrowser=args.inbrowser
            )
        except OSError as exc:  # the port was taken while the model loaded: gradio's message names its own knobs
            sys.exit(port_problem(args.server_name, args.server_port) or f"error: the web server did not start: {exc}")
