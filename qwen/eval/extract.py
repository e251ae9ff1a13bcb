"""Turning generated text into answers: the original cut and extraction rules, quirks included.

Two original rules lower scores for reasons unrelated to the model; they stay the default so numbers
remain comparable with the published ones, and each has a corrected variant behind a flag:

- base GSM8K takes the last run of *digits*, so "-3", "2.5" and "20,800" (read as 800) are lost;
  the ``number`` rule reads the last signed/decimal/comma-grouped number as chat GSM8K does.
- base HumanEval cuts the completion at the first blank line or ``def ``, which truncates bodies
  with a blank line or a nested helper (the canonical solutions then pass only 77.4%); the
  ``codex`` rule cuts where a new top-level statement starts, as the Codex paper's stop list does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

INVALID = "[invalid]"

# Cut markers of the generative scripts, applied in this order (each keeps the text before it).
GSM8K_CUT = ("<|endoftext|>", "\n\n\n", "\n\n", "Question:")
HUMANEVAL_CUT = {
    "original": ("<|endoftext|>", "\n\n\n", "\n\n", "def "),
    "codex": ("<|endoftext|>", "\nclass", "\ndef", "\n#", "\nif", "\nprint"),
}


def cut(text: str, markers: Sequence[str]) -> str:
    """Keep what comes before each marker in turn: the text before the earliest marker. So a generation
    may stop at the first marker it writes without changing the result."""
    for marker in markers:
        text = text.split(marker)[0]
    return text


# ----- GSM8K -----------------------------------------------------------------------------------------

_GOLD = re.compile(r"#### (-?[0-9.,]+)")
# A number as people write it: optional sign, digits (optionally grouped by thousands), decimals.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def _as_number(text: str) -> int | float | None:
    """What Python's ``eval`` makes of a plain number literal (the originals eval'd them), or None where
    eval fails: ints stay ints, "007" is an error but "00" is 0."""
    if re.fullmatch(r"0\d+", text) and text.strip("0"):
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return None


def gsm8k_gold(answer: str) -> int | float:
    """The reference value after ``####`` (commas removed)."""
    match = _GOLD.search(answer)
    value = _as_number(match.group(1).strip().replace(",", "")) if match else None
    if value is None:
        raise ValueError(f"no '#### <number>' answer in the reference solution: {answer[-80:]!r}")
    return value


def gsm8k_base_answer(completion: str) -> int | float | str:
    """The original base rule: the last run of digits, or "[invalid]"."""
    digits = re.findall(r"\d+", completion)
    value = _as_number(digits[-1]) if digits else None
    return INVALID if value is None else value


def last_number(text: str) -> str | None:
    """The chat GSM8K rule: the last number-like token, with "," and "+" removed."""
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "").replace("+", "") if numbers else None


def gsm8k_number_answer(completion: str) -> float | str:
    """The corrected rule (also the chat scripts'): the last number, signs and decimals kept."""
    number = last_number(completion)
    return INVALID if number is None else float(number)


def gsm8k_correct(prediction: int | float | str, gold: int | float, rule: str) -> bool:
    """``original``: exact equality, as the base script compares; ``number``: equal within 1e-4,
    as the chat script compares."""
    if prediction == INVALID:
        return False
    if rule == "original":
        return prediction == gold
    return math.isclose(float(prediction), float(gold), rel_tol=0, abs_tol=1e-4)


# ----- HumanEval (chat) ------------------------------------------------------------------------------


def _body_after_def(text: str, name_pattern: str) -> str | None:
    """The lines after ``def <name>...:`` up to the first line that is neither indented nor blank."""
    match = re.search(rf"^[ \t]*def\s+{name_pattern}.*?:[ \t]*(?:#[^\n]*)?\n", text, re.MULTILINE)
    if match is None:
        return None
    lines = []
    for line in text[match.end():].split("\n"):
        if line.strip() and not line[0].isspace():
            break
        lines.append(line)
    return "\n".join(lines).rstrip() + "\n"


def chat_humaneval_body(response: str, entry_point: str) -> str:
    """The function body to append to the prompt, from a chat reply, by the first rule that applies:
    a fenced code block holding ``def <entry_point>``; the body after ``def <entry_point>`` anywhere;
    the body after any ``def``; else the whole reply indented by four spaces."""
    name = re.escape(entry_point)
    for block in re.findall(r"```[^\n]*\n(.*?)(?:```|$)", response, re.DOTALL):
        match = re.search(rf"^[ \t]*def\s+{name}.*?:[ \t]*(?:#[^\n]*)?\n", block, re.MULTILINE)
        if match:
            return block[match.end():]
    for pattern in (name, r"\w+"):
        body = _body_after_def(response, pattern)
        if body is not None:
            return body
    return "\n".join("    " + line for line in response.split("\n"))
