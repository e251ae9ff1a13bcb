"""Terminal chat with a Qwen checkpoint (``python cli_demo.py -c FOLDER``).

Replies stream as they are generated; Ctrl-C stops a reply and keeps the chat; Ctrl-D or ``:exit``
quits. Colon commands inspect and change the session (``:help`` lists them); ``:conf`` edits the
generation settings that the next reply really uses.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..entry_points import program_name
from ..loading import (
    add_lora_arg,
    add_model_args,
    engine_settings,
    front_end_checkpoint,
    load_lora_arg,
    load_model,
)
from . import sampling_settings

if TYPE_CHECKING:
    from .session import EngineChat

HELP = """Commands:
  :help / :h                 show this help
  :exit / :quit / :q         quit (Ctrl-D too)
  :clear / :cl               clear the screen
  :clear-history / :clh      forget the conversation
  :history / :his            show the conversation
  :seed                      show the random seed;  :seed N  set it
  :conf                      show generation settings;  :conf key=value ...  change them
                             (max_new_tokens, do_sample, temperature (0 = greedy), top_p, top_k,
                             repetition_penalty, max_window_size)
  :reset-conf                restore the checkpoint's generation settings
Ctrl-C stops a reply in progress. Anything else is sent to the model."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=program_name("cli_demo.py"),
                                description="Chat with a Qwen v1 checkpoint in the terminal")
    p.add_argument("-c", "--checkpoint-path", help="original Qwen checkpoint folder")
    p.add_argument("-s", "--seed", type=int, default=1234, help="random seed (default 1234)")
    p.add_argument("--system", default="You are a helpful assistant.", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, help="reply length limit (default: the checkpoint's)")
    p.add_argument("--demo", action="store_true", help="use a tiny random checkpoint (replies are random text)")
    add_model_args(p)
    add_lora_arg(p)
    return p.parse_args(argv)


def _real(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _boolean(text: str) -> bool:
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if text.lower() not in words:
        raise ValueError(text)
    return words[text.lower()]


# The generation settings :conf changes: name -> (reader, allowed values, what to write).
SETTINGS: dict[str, tuple[Callable[[str], Any], Callable[[Any], bool], str]] = {
    "max_new_tokens": (int, lambda v: v >= 1, "a whole number >= 1"),
    "do_sample": (_boolean, lambda v: True, "true or false"),
    "temperature": (_real, lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    "top_p": (_real, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (int, lambda v: v >= 0, "a whole number >= 0 (0 = no limit)"),
    "repetition_penalty": (_real, lambda v: v > 0, "a number > 0 (1 = none)"),
    "max_window_size": (int, lambda v: v >= 1, "a whole number >= 1"),
}
CONF_USAGE = f"Usage: :conf key=value ..., e.g. :conf max_new_tokens=64 top_p=0.9; keys: {', '.join(SETTINGS)}"


def parse_settings(text: str) -> dict[str, Any]:
    """``key=value ...`` as checked generation settings; ValueError says what is wrong with which item.

    ``temperature=0`` means greedy decoding and a temperature above 0 means sampling, as on the web page."""
    settings: dict[str, Any] = {}
    for item in text.split():
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ValueError(f"Cannot read {item!r}: write key=value. {CONF_USAGE}")
        if key not in SETTINGS:
            raise ValueError(f"Unknown setting {key!r}. {CONF_USAGE}")
        read, allowed, expected = SETTINGS[key]
        try:
            value = read(raw)
            valid = allowed(value)
        except ValueError:
            valid = False
        if not valid:
            raise ValueError(f"{key} must be {expected}, not {raw!r}")
        settings.update(sampling_settings(value) if key == "temperature" else {key: value})
    return settings


class ChatSession:
    """State of one terminal chat: history, seed and the generation settings in force."""

    def __init__(self, chat: EngineChat, system: str, seed: int, console) -> None:
        self.chat, self.system, self.seed, self.console = chat, system, seed, console
        self.original_config = copy.deepcopy(chat.engine.model.generation_config)
        self.config = copy.deepcopy(self.original_config)
        self.history: list[tuple[str, str]] = []

    def command(self, line: str) -> bool:
        """Run a colon command; return False when the session should end."""
        name, _, rest = line[1:].strip().partition(" ")
        out = self.console.print
        if name in ("exit", "quit", "q"):
            return False
        if name in ("help", "h"):
            out(HELP)
        elif name in ("clear", "cl"):
            self.console.clear()
        elif name in ("clear-history", "clh"):
            self.history = []
            out("History cleared.")
        elif name in ("history", "his"):
            if not self.history:
                out("(no history yet)")
            for i, (q, r) in enumerate(self.history, 1):
                out(f"[{i}] user: {q}\n[{i}] assistant: {r}")
        elif name == "seed":
            if rest:
                try:
                    self.seed = int(rest)
                except ValueError:
                    out(f"Not a number: {rest!r}. Usage: :seed N")
                    return True
            out(f"seed = {self.seed}")
        elif name == "conf":
            if not rest:
                out(json.dumps(self.config.to_diff_dict(), indent=2, ensure_ascii=False))
                return True
            try:
                settings = parse_settings(rest)
            except ValueError as exc:
                out(f"{exc}\nNothing changed.")
                return True
            for key, value in settings.items():  # all items were valid: apply them together
                setattr(self.config, key, value)
                out(f"{key} = {value!r}")
        elif name == "reset-conf":
            self.config = copy.deepcopy(self.original_config)
            out("Generation settings reset.")
        else:
            out(f"Unknown command :{name}. Type :help for the list.")
        return True

    def reply(self, query: str) -> None:
        """Stream one reply; Ctrl-C stops it and keeps the chat (the partial reply is not kept).

        During a reply Ctrl-C only raises a flag that the loop checks after each piece of text: a
        KeyboardInterrupt could land inside the console's own printing and leave it buffering."""
        stream = self.chat.stream(query, self.history, self.system, self.config, self.seed)
        interrupted = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
        shown = ""
        self.console.print("qwen> ", end="")
        try:
            for text in stream:
                self.console.print(text[len(shown):] if text.startswith(shown) else "\n" + text, end="")
                shown = text
                if interrupted.is_set():
                    break
        except Exception as exc:  # :conf checks its values, but a failed reply must not end the chat
            self.console.print(f"\nerror: {exc}\n(change the setting with :conf, or :reset-conf)")
            return
        finally:
            stream.close()  # stops the generation if it is still running
            signal.signal(signal.SIGINT, previous)
        if interrupted.is_set():
            self.console.print("\n[reply stopped]")
            return
        self.console.print()
        self.history.append((query, shown))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from rich.console import Console

    console = Console(highlight=False, markup=False, emoji=False, soft_wrap=True)
    with front_end_checkpoint(args) as (path, is_demo):
        if is_demo:
            console.print("Demo mode: a tiny checkpoint with RANDOM weights, so replies are random text. "
                          "Pass -c FOLDER to chat with a real model.")
        try:
            model, tokenizer = load_model(path, args)
        except (OSError, ValueError) as exc:
            sys.exit(f"error: cannot load {path}: {exc}")
        adapter = load_lora_arg(model, args)
        from .session import EngineChat  # after the command line: it imports torch

        try:
            chat = EngineChat(model, tokenizer, max_batch_size=1, adapter=adapter, **engine_settings(args))
        except ValueError as exc:
            sys.exit(f"error: {exc}")
        session = ChatSession(chat, args.system, args.seed, console)
        if args.max_new_tokens:
            session.original_config.max_new_tokens = session.config.max_new_tokens = args.max_new_tokens
        with_lora = f" + LoRA adapter {adapter.name}" if adapter is not None else ""
        console.print(f"Chatting with {path.name}{with_lora}. Type :help for commands, :exit or Ctrl-D to quit.")
        chat_loop(session, console)
    console.print("Bye.")


def chat_loop(session: ChatSession, console) -> None:
    """Read lines until :exit or Ctrl-D; colon commands go to the session, anything else to the model."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory

    prompt = PromptSession(history=InMemoryHistory())
    while True:
        try:
            line = prompt.prompt("you> ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            break
        if not line.strip():
            console.print("Empty input: type a message, or :help for commands.")
            continue
        if line.startswith(":"):
            if not session.command(line):
                break
            continue
        session.reply(line)
