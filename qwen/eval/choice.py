"""Answer extraction of the chat multiple-choice scripts (chat C-Eval and chat MMLU, spec 1.6 and 1.7).

A chat model answers in free text. The original scripts turn that text into a letter in two steps, reproduced
here rule for rule because the published chat scores depend on them:

1. normalise the response: rewrite the parts that restate the question or an option, so that an answer such as
   "关于传输层的面向连接服务的特性是既保证可靠，也保证按序交付" becomes "答案是D";
2. try the regexes (a)-(d) of ``CEVAL_CASCADE`` / ``MMLU_CASCADE`` in order, the first hit wins; if none hits,
   (e) pick the option whose text is most similar to the response (thefuzz), so a letter is always returned.

One deliberate deviation: an option whose text is empty after stripping its trailing "。"/"." is not
substituted in step 1 (the originals would then insert the letter between every character of the response).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from qwen.eval import EvalError

LETTERS = ("A", "B", "C", "D")

# --- C-Eval (Chinese) -------------------------------------------------------------------------------------
_ZH_SAYS = "[是选为：:】]"  # what links 答案/选项 to the letter: "is", "choose", "be", a colon, 【答案】
_ZH_GOOD = "(?:正确|对[的，。：]|符合)"  # "correct", "right", "fits (the question)"
_ZH_END = "(?:[)）。.，,．、：:ABCD]|$)"  # what may follow the letter: punctuation, another letter, the end

CEVAL_CASCADE: tuple[re.Pattern[str], ...] = (
    # (a) an explicit answer: 选A / 选择：A / 选定 A (only a colon or spaces between), or 答案是A / 选项为A /
    # 答案：A / 【答案】A with up to 10 non-letter characters on each side of the linking word, rejected when
    # 不/非 precedes that word (答案不是A, 选项非A); then a terminator (punctuation, another letter, the end)
    re.compile(
        r"(?:(?:选|选择|选定)[：:]?\s*"
        rf"|(?:答案|选项)(?![^ABCD]{{0,10}}?[不非][^ABCD]{{0,10}}?{_ZH_SAYS})[^ABCD]{{0,10}}?{_ZH_SAYS}[^ABCD]{{0,10}}?)"
        rf"([ABCD])(?:选项)?{_ZH_END}"
    ),
    # (b) a judged option: A正确 / A项对的 / A选项符合题意, unless 不/非 comes first (A选项不正确)
    re.compile(rf"([ABCD])(?:选?项)?(?![^ABCD]{{0,4}}?[不非][^ABCD]{{0,4}}?{_ZH_GOOD})[^ABCD]{{0,4}}?{_ZH_GOOD}"),
    # (c) a bare answer at the very start: "A。", "(B)", "（C）", "D:", or just "A"
    re.compile(r"^[(（]?([ABCD])(?:[。)）.，,．：:]|$)"),
    # (d) the first A-D with no Latin letter on either side and no "=" after it (so not "A=1" or "ABC")
    re.compile(r"(?<![a-zA-Z])([ABCD])(?![a-zA-Z=])"),
)

# --- MMLU (English) ---------------------------------------------------------------------------------------
MMLU_CASCADE: tuple[re.Pattern[str], ...] = (
    # (a) "choose B", or "answer"/"choice" [is|:|be] ... B, unless "n't"/"not" follows within 20 characters
    # ("The answer is not A"); the letter must stand alone and come within 20 non-letter characters
    re.compile(
        r"(?:[Cc]hoose|(?:[Aa]nswer|[Cc]hoice)(?![^ABCD]{0,20}?(?:n't|not))[^ABCD]{0,10}?\b(?:|is|:|be)\b)"
        r"[^ABCD]{0,20}?\b([ABCD])\b"
    ),
    # (b) "B is correct" / "B is the right one", unless negated ("A is not correct", "A isn't right")
    re.compile(r"\b([ABCD])\b(?![^ABCD]{0,8}?(?:n't|not)[^ABCD]{0,5}?(?:correct|right))[^ABCD]{0,10}?\b(?:correct|right)\b"),
    # (c) a bare answer at the very start: "A.", "B,", "C:" or just "D"
    re.compile(r"^([ABCD])(?:[.,:]|$)"),
    # (d) the first A-D with no Latin letter on either side and no "=" after it
    re.compile(r"(?<![a-zA-Z])([ABCD])(?![a-zA-Z=])"),
)


def extract_ceval_choice(response: str, question: str, options: Mapping[str, str]) -> str:
    """The letter a chat model chose for a C-Eval item; ``options`` maps "A".."D" to the option texts (an
    item dict with more keys is fine)."""
    texts = [options[letter] for letter in LETTERS]
    # Step 1. The blank "____" of the question's last sentence splits it in two; a response restating the part
    # before the blank is made to read "答案是…", the part after it is dropped (parts of <= 4 characters are
    # too common to touch). Without a blank both parts are the whole sentence.
    parts = question.rstrip("。").split("。")[-1].split("_")
    if len(parts[0].strip()) > 4:
        response = response.replace(parts[0], "答案是")
    if len(parts[-1].strip()) > 4:
        response = response.replace(parts[-1], "")
    for letter, text in _longest_first(texts):
        if text := text.rstrip("。"):
            response = response.replace(text, letter)
    return _cascade(response, CEVAL_CASCADE, texts)


def extract_mmlu_choice(response: str, options: Mapping[str, str]) -> str:
    """The letter a chat model chose for an MMLU item; ``options`` maps "A".."D" to the option texts."""
    texts = [options[letter] for letter in LETTERS]
    # Step 1: option texts (trailing "." dropped) become their letter, matched case-insensitively.
    for letter, text in _longest_first(texts):
        if text := text.rstrip("."):
            response = re.sub(re.escape(text), letter, response, flags=re.IGNORECASE)
    return _cascade(response, MMLU_CASCADE, texts)


def _longest_first(texts: list[str]) -> list[tuple[str, str]]:
    """(letter, text) longest text first, so an option that contains a shorter one is replaced first; ties keep
    A-D order (a stable sort, as in the originals)."""
    return sorted(zip(LETTERS, texts, strict=True), key=lambda pair: len(pair[1]), reverse=True)


def _cascade(text: str, patterns: tuple[re.Pattern[str], ...], texts: list[str]) -> str:
    for pattern in patterns:
        if match := pattern.search(text):
            return match.group(1)
    # (e) No letter anywhere: the option most similar to the (normalised) response, first one on a tie of texts.
    try:
        from thefuzz import process
    except ImportError as exc:
        raise EvalError('chat answer extraction needs thefuzz; install it with: pip install -e ".[eval]"') from exc
    best, _score = process.extractOne(text, texts)
    return LETTERS[texts.index(best)]
