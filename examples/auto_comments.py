"""Add comments to Python files with a Qwen chat model; the code itself is never changed.

    python examples/auto_comments.py --path my_script.py -c Qwen-7B-Chat            # a local checkpoint
    python examples/auto_comments.py --path src/ --api-base http://127.0.0.1:8000/v1  # or openai_api.py

Each ``X.py`` gets a commented copy ``X_comments.py`` beside it. Copies that already exist are kept
unless ``--regenerate`` is given, and such copies are never commented themselves.

A file of more than 50 lines is sent in chunks. It is cut before each top-level ``def``, adjacent
pieces are packed back together up to 50 lines, and a piece that is still longer is cut every 50 lines.
The model is asked to return the code with comments added. Models also change, drop, reorder and
invent lines, so the reply is not used as it is. ``merge_comments`` aligns the reply with the original
lines and takes only the reply's comment lines from it. Every original line is kept, in order, and
comments are never put inside a multi-line string or after a backslash continuation. The output
therefore parses to the same program as the input.
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import re
import sys
import tokenize
import urllib.request
from collections.abc import Callable
from pathlib import Path

from qwen.loading import add_model_args, load_model, positive_int

CHUNK_LINES = 50
SUFFIX = "_comments"
PROMPT = """Add comments to the following Python code, in {language}. Reply with the whole code in a \
```python block. Add only comment lines that start with #, above the lines they explain, and keep \
every line of code exactly as it is.

```python
{code}
```"""

Ask = Callable[[str], str]  # prompt -> the model's reply


# ----- splitting -----------------------------------------------------------------------------------


def split_code(code: str, max_lines: int = CHUNK_LINES) -> list[str]:
    """Chunks of at most ``max_lines`` lines whose concatenation is ``code``: cut before top-level
    ``def`` lines, pack adjacent pieces up to ``max_lines``, cut longer pieces every ``max_lines``."""
    if len(code.splitlines()) <= max_lines:
        return [code]
    pieces: list[list[str]] = []
    for part in re.split(r"(?<=\n)(?=def )", code):
        lines = part.splitlines(keepends=True)
        pieces += [lines[i : i + max_lines] for i in range(0, len(lines), max_lines)]
    chunks: list[list[str]] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + len(piece) <= max_lines:
            chunks[-1] += piece
        else:
            chunks.append(list(piece))
    return ["".join(chunk) for chunk in chunks]


# ----- merging -------------------------------------------------------------------------------------


def _no_insert_before(lines: list[str]) -> set[int]:
    """Indices of the lines before which a comment line would change the program: lines that start
    inside a multi-line string, and lines after a backslash continuation."""
    blocked = {i for i in range(1, len(lines)) if lines[i - 1].rstrip("\r\n").endswith("\\")}
    try:
        for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
            if tok.type == tokenize.STRING:
                blocked.update(range(tok.start[0], tok.end[0]))  # rows are 1-based: lines start..end-1 follow
    except (tokenize.TokenError, SyntaxError):
        pass  # not valid Python: only the continuation rule is known
    return blocked


def _reply_key(line: str, code_lines: set[str]) -> tuple[str | None, str | None]:
    """(the original line this reply line stands for, or None for a new comment line; its trailing
    comment). ``x = 1  # one`` stands for the original line ``x = 1`` and carries the comment ``# one``."""
    text = line.strip()
    if text in code_lines:
        return text, None
    if text.startswith("#"):
        return None, None
    for match in re.finditer("#", text):
        code = text[: match.start()].rstrip()
        if code in code_lines:
            return code, text[match.start() :]
    return text, None


def merge_comments(original: str, reply: str) -> str:
    """``original`` with the comment lines of ``reply`` inserted where the reply puts them.

    The reply's lines are aligned with the original's (``difflib``, whitespace ignored). A comment
    line of the reply goes before the next original line that holds code, indented like it, and a
    trailing comment of a reply line goes above its original line. Any other reply line is ignored.
    Removing the inserted lines gives back ``original`` exactly."""
    lines = original.splitlines(keepends=True)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    keys = [line.strip() for line in lines]
    reply_lines = reply.splitlines()
    reply_keys = [_reply_key(line, set(keys)) for line in reply_lines]
    blocked = _no_insert_before(lines)
    out: list[str] = []
    pending: list[str] = []

    def keep(i: int) -> None:
        if pending and keys[i] and i not in blocked:
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            out.extend(f"{indent}{comment}{newline}" for comment in pending)
            pending.clear()
        out.append(lines[i])

    matcher = difflib.SequenceMatcher(None, keys, [key for key, _ in reply_keys], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            for i, j in zip(range(i1, i2), range(j1, j2), strict=True):
                if reply_keys[j][1]:
                    pending.append(reply_keys[j][1])
                keep(i)
            continue
        pending += [reply_lines[j].strip() for j in range(j1, j2) if reply_keys[j][0] is None]
        for i in range(i1, i2):
            keep(i)
    if pending:
        if out and not out[-1].endswith("\n"):
            out[-1] += newline
        out.extend(f"{comment}{newline}" for comment in pending)
    return "".join(out)


# ----- the model -----------------------------------------------------------------------------------


def comment_code(code: str, ask: Ask, language: str = "English") -> str:
    """``code`` with the comments the model suggests, chunk by chunk."""
    replies = [ask(PROMPT.format(language=language, code=chunk.rstrip("\n"))) for chunk in split_code(code)]
    return merge_comments(code, "\n".join(replies))


def local_model(checkpoint: str, args: argparse.Namespace) -> Ask:
    model, tokenizer = load_model(checkpoint, args)

    def ask(prompt: str) -> str:
        return model.chat(tokenizer, prompt, history=None, max_new_tokens=args.max_new_tokens)[0]

    return ask


def api_model(api_base: str, model: str | None, max_new_tokens: int) -> Ask:
    """A chat model behind an OpenAI-compatible server (such as ``openai_api.py``) at ``api_base``."""
    api_base = api_base.rstrip("/")

    def post(path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{api_base}{path}", data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.load(response)

    name = model or post("/models")["data"][0]["id"]

    def ask(prompt: str) -> str:
        body = {"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_new_tokens}
        return post("/chat/completions", body)["choices"][0]["message"]["content"] or ""

    return ask


# ----- command line --------------------------------------------------------------------------------


def output_path(file: Path) -> Path:
    return file.with_name(f"{file.stem}{SUFFIX}.py")


def python_files(path: Path) -> list[Path]:
    """The files to comment: ``path``, or the ``.py`` files under it that are not the commented copy
    of another (``auto_comments.py`` is an input, ``X_comments.py`` beside ``X.py`` is not)."""
    if not path.is_dir():
        return [path]
    files = sorted(path.rglob("*.py"))
    copies = {output_path(f) for f in files}
    return [f for f in files if f not in copies]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", required=True, type=Path, help="a Python file, or a folder of them")
    parser.add_argument("--regenerate", action="store_true", help="redo files whose _comments.py copy exists")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", "--checkpoint-path", help="a Qwen chat checkpoint folder")
    source.add_argument("--api-base", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="the model name on the server (default: the first it lists)")
    parser.add_argument("--language", default="English", help="language of the comments (default English)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=2048,
                        help="longest reply per chunk, in tokens")
    add_model_args(parser)
    args = parser.parse_args(argv)
    if not args.path.exists():
        parser.error(f"--path {args.path} does not exist")

    todo = []
    for file in python_files(args.path):
        target = output_path(file)
        if target.exists() and not args.regenerate:
            print(f"kept {target} (--regenerate redoes it)")
        else:
            todo.append((file, target))
    if not todo:
        return
    try:
        if args.checkpoint_path:
            ask = local_model(args.checkpoint_path, args)
        else:
            ask = api_model(args.api_base, args.model, args.max_new_tokens)
    except OSError as exc:  # a missing checkpoint folder, or a server that does not answer
        sys.exit(f"error: {exc}")
    for file, target in todo:
        with file.open(encoding="utf-8", newline="") as f:  # keep CRLF line endings as they are
            code = f.read()
        target.write_text(comment_code(code, ask, args.language), encoding="utf-8", newline="")
        print(f"wrote {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
