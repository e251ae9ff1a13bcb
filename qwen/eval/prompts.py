"""Prompt texts of the original evaluation scripts, character for character.

The published scores depend on these exact strings (full-width colons in the Chinese format, the
MMLU header, where a newline does or does not end the prompt), so each builder is tested by string
equality. Items are dicts with "question", "A".."D" and "answer" (see ``qwen.eval.data``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

LETTERS = ("A", "B", "C", "D")
DATA_DIR = Path(__file__).parent / "prompts"
GSM8K_PROMPT_FILE = DATA_DIR / "gsm8k_prompt.txt"
CHAT_GSM8K_FEWSHOT_FILE = DATA_DIR / "chat_gsm8k_fewshot.txt"


# ----- base models: few-shot multiple choice, scored on the next token ---------------------------------


def multiple_choice_block(item: dict[str, str], chinese: bool, include_answer: bool) -> str:
    """One question as the few-shot prompts show it; the query block ends right after the colon."""
    question, answer = ("问题：", "答案：") if chinese else ("Question: ", "Answer:")
    text = question + item["question"] + "".join(f"\n{letter}. {item[letter]}" for letter in LETTERS)
    text += "\n" + answer
    if include_answer:
        # The English format puts a space before the letter, the Chinese one does not.
        text += ("" if chinese else " ") + item["answer"] + "\n\n"
    return text


def ceval_prompt(shots: Sequence[dict[str, str]], item: dict[str, str]) -> str:
    """C-Eval and CMMLU: the dev rows, then the query; no header line."""
    return "".join(multiple_choice_block(s, True, True) for s in shots) + multiple_choice_block(item, True, False)


def mmlu_prompt(subject: str, shots: Sequence[dict[str, str]], item: dict[str, str]) -> str:
    """MMLU: a header naming the subject, the dev rows, then the query."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(multiple_choice_block(s, False, True) for s in shots) + multiple_choice_block(
        item, False, False
    )


# ----- chat models: zero-shot questions, answers extracted from the reply --------------------------------


def _options(item: dict[str, str]) -> str:
    return "".join(f"{letter}. {item[letter]}\n" for letter in LETTERS)


def chat_ceval_prompt(item: dict[str, str]) -> str:
    """The C-Eval chat question: the question, a blank line, one line per option, no instruction."""
    return f"{item['question']}\n\n" + _options(item)


def chat_mmlu_prompt(item: dict[str, str]) -> str:
    return (
        "The following is a multiple-choice question. Please choose the most suitable one among A, B, C and D as "
        f"the answer to this question.\n\n{item['question']}\n" + _options(item)
    )


# ----- GSM8K ---------------------------------------------------------------------------------------------


def read_prompt_file(path: str | Path | None, default: Path) -> str:
    """A few-shot text file, read as is (the original's gsm8k_prompt.txt is accepted unchanged)."""
    from . import EvalError

    path = Path(path) if path else default
    if not path.is_file():
        raise EvalError(f"prompt file not found: {path} (pass --prompt-file with an existing file)")
    return path.read_text(encoding="utf-8")


def gsm8k_prompt(fewshot: str, question: str) -> str:
    """Base GSM8K: the 8-shot text, then the question in the exemplars' format."""
    return fewshot + f"\nQuestion: {question}\nLet's think step by step\n"


def chat_gsm8k_prompt(question: str, fewshot: str | None = None) -> str:
    """Chat GSM8K: the raw question (zero-shot), or one message holding the exemplars and the question
    (``--use-fewshot``), which ends without a newline."""
    if fewshot is None:
        return question
    return fewshot + f"Question: {question}\nLet's think step by step"


# ----- HumanEval -----------------------------------------------------------------------------------------


def chat_humaneval_prompt(problem: dict[str, str]) -> str:
    """The chat HumanEval instruction (HumanEvalPack style): the signature, the first docstring of the
    prompt with each line stripped (the text as a whole is not: its first and last lines may be empty),
    then the original prompt."""
    prompt = problem["prompt"]
    signature = re.search(rf"def\s+({re.escape(problem['entry_point'])}.*?):\s*\n", prompt).group(1)
    docstring = re.search(r"(?:\"\"\"|''')(.*?)(?:\"\"\"|''')", prompt, re.DOTALL).group(1)
    description = "\n".join(line.strip() for line in docstring.split("\n"))
    return f"Write a Python function `{signature}` to solve the following problem:\n{description}\n{prompt}"
