"""Terminal chat with a Qwen checkpoint (``python cli_demo.py -c FOLDER``).

Replies stream as they are generated; Ctrl-C stops a reply and keeps the chat; Ctrl-D or ``:exit``
quits. Colon commands inspect and change the session (``:help`` lists them); ``:conf`` edits the
generation settings that the next reply really uses.
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import sys
import tempfile
import threading
from pathlib import Path

from ..loading import add_model_args, load_model

HELP = """Commands:
  :help / :h                 show this help
  :exit / :quit / :q         quit (Ctrl-D too)
  :clear / :cl               clear the screen
  :clear-history / :clh      forget the conversation
  :history / :his            show the conversation
  :seed                      show the random seed;  :seed N  set it
  :conf                      show generation settings;  :conf key=value ...  change them
  :reset-conf                restore the checkpoint's generation settings
Ctrl-C stops a reply in progress. Anything else is sent to the model."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cli_demo.py", description="Chat with a Qwen v1 checkpoint in the terminal")
    p.add_argument("-c", "--checkpoint-path", help="original Qwen checkpoint folder")
    p.add_argument("-s", "--seed", type=int, default=1234, help="random seed (default 1234)")
    p.add_argument("--system", default="You are a helpful assistant.", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, help="reply length limit (default: the checkpoint's)")
    p.add_argument("--demo", action="store_true", help="use a tiny random checkpoint (replies are random text)")
    add_model_args(p)
    return p.parse_args(argv)


def parse_value(text: str):
    """``0.5`` -> float, ``true`` -> bool, ``[1, 2]`` -> list; anything else stays a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class ChatSession:
    """State of one terminal chat: history, seed and the generation settings in force."""

    def __init__(self, model, tokenizer, system: str, seed: int, console) -> None:
        self.model, self.tokenizer, self.system, self.seed, self.console = model, tokenizer, system, seed, console
        self.original_config = copy.deepcopy(model.generation_config)
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
            for item in rest.split():
                key, eq, value = item.partition("=")
                if not eq or not key:
                    out(f"Cannot read {item!r}: write key=value, e.g. :conf max_new_tokens=64 top_p=0.9")
                    continue
                setattr(self.config, key, parse_value(value))
                out(f"{key} = {getattr(self.config, key)!r}")
            if not rest:
                out(json.dumps(self.config.to_diff_dict(), indent=2, ensure_ascii=False))
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
        stream = self.model.chat_stream(
            self.tokenizer, query, history=self.history, system=self.system,
            generation_config=self.config, seed=self.seed,
        )
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
        except Exception as exc:  # e.g. a :conf value that generation rejects
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
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory
    from rich.console import Console

    console = Console(highlight=False, markup=False, emoji=False, soft_wrap=True)
    path = Path(args.checkpoint_path) if args.checkpoint_path else None
    if path is not None and not (path / "config.json").is_file():
        sys.exit(f"error: {path} is not a Qwen checkpoint folder (no config.json); use --demo to try a tiny one")
    temp = None
    if path is None or args.demo:
        from qwen.tiny import make_tiny_checkpoint

        temp = tempfile.TemporaryDirectory()
        path = make_tiny_checkpoint(temp.name)
        console.print("Demo mode: a tiny checkpoint with RANDOM weights, so replies are random text. "
                      "Pass -c FOLDER to chat with a real model.")
    try:
        model, tokenizer = load_model(path, args)
    except (OSError, ValueError) as exc:
        sys.exit(f"error: cannot load {path}: {exc}")
    session = ChatSession(model, tokenizer, args.system, args.seed, console)
    if args.max_new_tokens:
        session.original_config.max_new_tokens = session.config.max_new_tokens = args.max_new_tokens
    console.print(f"Chatting with {path.name}. Type :help for commands, :exit or Ctrl-D to quit.")
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
    console.print("Bye.")
    if temp is not None:
        temp.cleanup()
