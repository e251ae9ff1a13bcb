"""The ReAct part of the tool-use benchmark (evaluate_plugin.py, spec 1.10): transcript parser and metrics.

A job is a dict with "prompt" (a complete ReAct prompt), "response" (the gold transcript) and "gen" (a list
holding the model's transcript). Positive jobs need a tool call, negative jobs must be answered without one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from qwen.eval import EvalError

ACTION_CALL = "\nAction: "  # a transcript "calls a tool" when it contains this


def parse_react(text: str) -> dict[str, str]:
    """Slice a ReAct transcript into its six fields by plain string search, each slice stripped.

    ====================  =======================  =================
    field                 from (after the marker)  to
    ====================  =======================  =================
    thought               the start                "Action:"
    action                "Action:"                "Action Input:"
    action_input          "Action Input:"          "Observation:"
    observation           "Observation:"           the last "Thought:"
    thought_last          the last "Thought:"      "Final Answer:"
    final_answer          "Final Answer:"          the end
    ====================  =======================  =================

    Markers are found by their first occurrence, except the last "Thought:", each in the whole text. As in the
    original, a slice whose end marker lies before its start is "" (so a transcript with several tool calls is
    misparsed the same way). Missing markers: a missing end marker makes the slice run to the end of the text;
    a missing start marker makes the slice "" (the original then slices from a meaningless offset, which
    only ever yields fragments of the text). ``action_input`` is returned raw; see ``normalize_action_input``.
    """

    def between(start: str | None, end: str | None, *, start_last: bool = False, end_last: bool = False) -> str:
        begin = 0
        if start is not None:
            at = text.rfind(start) if start_last else text.find(start)
            if at < 0:
                return ""
            begin = at + len(start)
        stop = len(text)
        if end is not None:
            at = text.rfind(end) if end_last else text.find(end)
            stop = at if at >= 0 else len(text)
        return text[begin:stop].strip()

    return {
        "thought": between(None, "Action:"),
        "action": between("Action:", "Action Input:"),
        "action_input": between("Action Input:", "Observation:"),
        "observation": between("Observation:", "Thought:", end_last=True),
        "thought_last": between("Thought:", "Final Answer:", start_last=True),
        "final_answer": between("Final Answer:", None),
    }


def normalize_action_input(text: str) -> str:
    """Canonical JSON of an action input (JSON5 accepted, keys sorted), or "" if it does not parse, so that
    key order and quoting style do not count against the model."""
    try:
        import json5
    except ImportError as exc:
        raise EvalError('the ReAct benchmark needs json5; install it with: pip install -e ".[eval]"') from exc
    try:
        return json.dumps(json5.loads(text), sort_keys=True, ensure_ascii=False)
    except Exception:  # json5 raises several types on bad input; any of them means "not a valid action input"
        return ""


def rouge_l_f1(reference_tokens: Sequence[str], candidate_tokens: Sequence[str]) -> float:
    """ROUGE-L F1 from the longest common subsequence, as rouge_score's rougeL fmeasure (0.0 if either side is
    empty or they share no token)."""
    if not reference_tokens or not candidate_tokens:
        return 0.0
    # LCS by dynamic programming, one row at a time
    previous = [0] * (len(candidate_tokens) + 1)
    for ref in reference_tokens:
        current = [0]
        for j, cand in enumerate(candidate_tokens):
            current.append(previous[j] + 1 if ref == cand else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate_tokens), lcs / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def plugin_metrics(
    positive_jobs: Sequence[dict] | None,
    negative_jobs: Sequence[dict] | None,
    tokenize: Callable[[str], list[str]],
) -> dict[str, dict[str, float]]:
    """The ReAct scores of evaluate_plugin.py; a ``None`` job list leaves its section out.

    * react_positive.action_right_rate: share of jobs whose generation calls a tool (contains "\\nAction: ")
      and names the gold action (compared stripped and lower-cased);
    * react_positive.action_input_rouge: mean over *all* positive jobs (tool called or not) of ROUGE-L F1
      between the normalised gold and generated action inputs, each turned into ``tokenize``'s token
      strings, joined by spaces and split again at whitespace (the original scores those joined strings
      with a whitespace tokenizer, so spaces inside tokens vanish);
    * react_negative.bad_rate: share of negative jobs whose generation calls a tool.
    """

    def generation(job: dict, index: int, name: str) -> str:
        gen = job.get("gen")
        if not gen:
            raise EvalError(f"{name} job {index} has no generation ('gen'); run the inference step first")
        return gen[0]

    def token_words(action_input: str) -> list[str]:
        return " ".join(tokenize(normalize_action_input(action_input))).split()

    result: dict[str, dict[str, float]] = {}
    if positive_jobs is not None:
        _require_jobs(positive_jobs, "react_positive")
        right, rouge = 0, 0.0
        for i, job in enumerate(positive_jobs):
            gen_text = generation(job, i, "react_positive")
            gen, gold = parse_react(gen_text), parse_react(job["response"])
            right += ACTION_CALL in gen_text and gen["action"].lower() == gold["action"].lower()
            rouge += rouge_l_f1(token_words(gold["action_input"]), token_words(gen["action_input"]))
        result["react_positive"] = {
            "action_right_rate": right / len(positive_jobs),
            "action_input_rouge": rouge / len(positive_jobs),
        }
    if negative_jobs is not None:
        _require_jobs(negative_jobs, "react_negative")
        bad = sum(ACTION_CALL in generation(job, i, "react_negative") for i, job in enumerate(negative_jobs))
        result["react_negative"] = {"bad_rate": bad / len(negative_jobs)}
    return result


def _require_jobs(jobs: Sequence[dict], name: str) -> None:
    if not jobs:
        raise EvalError(f"no {name} jobs to score: the data file is empty")
