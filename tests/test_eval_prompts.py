"""The evaluation's pure parts: prompt texts, letter tokens, cut/extraction rules, aggregation."""

from __future__ import annotations

import pytest
import torch

from qwen.eval import extract, prompts, scoring

ITEM = {"question": "1+1=?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"}
SHOT = {"question": "2+2=?", "A": "4", "B": "5", "C": "6", "D": "7", "answer": "A"}


def test_ceval_prompt_exact_text():
    assert prompts.ceval_prompt([SHOT], ITEM) == (
        "问题：2+2=?\nA. 4\nB. 5\nC. 6\nD. 7\n答案：A\n\n"
        "问题：1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
    )
    assert "\uff1a" in prompts.ceval_prompt([], ITEM)  # full-width colons, never ASCII ones
    assert ":" not in prompts.ceval_prompt([SHOT], ITEM)


def test_mmlu_prompt_exact_text():
    assert prompts.mmlu_prompt("high_school_physics", [SHOT], ITEM) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "Question: 2+2=?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer: A\n\n"
        "Question: 1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )


def test_chat_prompts_exact_text():
    assert prompts.chat_ceval_prompt(ITEM) == "1+1=?\n\nA. 1\nB. 2\nC. 3\nD. 4\n"
    assert prompts.chat_mmlu_prompt(ITEM) == (
        "The following is a multiple-choice question. Please choose the most suitable one among A, B, C and D "
        "as the answer to this question.\n\n1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n"
    )


def test_gsm8k_prompts():
    fewshot = prompts.read_prompt_file(None, prompts.GSM8K_PROMPT_FILE)
    # The shipped 8-shot file has the original's format: 8 exemplars, blank-line separated, one final "\n".
    assert fewshot.count("Question: ") == 8 and fewshot.count("\nThe answer is ") == 8
    assert fewshot.endswith("\n") and not fewshot.endswith("\n\n")
    assert prompts.gsm8k_prompt(fewshot, "Q?") == fewshot + "\nQuestion: Q?\nLet's think step by step\n"
    chat = prompts.read_prompt_file(None, prompts.CHAT_GSM8K_FEWSHOT_FILE)
    assert chat.count("Question: ") == 4 and chat.endswith("\n\n")
    assert prompts.chat_gsm8k_prompt("Q?") == "Q?"
    assert prompts.chat_gsm8k_prompt("Q?", chat) == chat + "Question: Q?\nLet's think step by step"
    # Each shipped exemplar's worked answer is right by the original extraction rule.
    for block in fewshot.strip().split("\n\n"):
        assert extract.gsm8k_base_answer(block) == int(block.rsplit(" ", 1)[1])


def test_missing_prompt_file_is_a_clear_error(tmp_path):
    from qwen.eval import EvalError

    with pytest.raises(EvalError, match="prompt file not found"):
        prompts.read_prompt_file(tmp_path / "nope.txt", prompts.GSM8K_PROMPT_FILE)


HUMANEVAL_PROBLEM = {
    "task_id": "HumanEval/x",
    "entry_point": "add",
    "prompt": 'from typing import List\n\n\ndef add(xs: List[int], k: int) -> List[int]:\n'
              '    """ Add k to every element.\n    >>> add([1], 2)\n    [3]\n    """\n',
}


def test_chat_humaneval_prompt_exact_text():
    assert prompts.chat_humaneval_prompt(HUMANEVAL_PROBLEM) == (
        "Write a Python function `add(xs: List[int], k: int) -> List[int]` to solve the following problem:\n"
        "Add k to every element.\n>>> add([1], 2)\n[3]\n\n" + HUMANEVAL_PROBLEM["prompt"]
    )


def test_letter_token_ids(tokenizer):
    # The ids the original scripts score (spec: "A"=32 .. "D"=35, " A"=362, " B"=425, " C"=356, " D"=422).
    assert scoring.letter_ids(tokenizer, spaced=False) == [32, 33, 34, 35]
    assert scoring.letter_ids(tokenizer, spaced=True) == [362, 425, 356, 422]
    assert tokenizer.encode("答案：") == [102349, 5122]
    assert tokenizer.encode("Answer:") == [16141, 25]


def test_choice_probs_are_the_double_softmax_and_padding_free(tiny_model, tokenizer):
    ids = [tokenizer.encode("问题：1+1=?\n答案："), tokenizer.encode("Question: a much longer prompt here?\nAnswer:")]
    choices = scoring.letter_ids(tokenizer, spaced=False)
    pad = tokenizer.special_tokens["<|extra_0|>"]
    batched = scoring.choice_probs(tiny_model, ids, choices, pad)
    for row, prompt in enumerate(ids):
        with torch.no_grad():
            logits = tiny_model(torch.tensor([prompt])).logits[0, -1].float()
        expected = torch.softmax(torch.softmax(logits, -1)[choices], -1)
        torch.testing.assert_close(batched[row], expected, rtol=1e-4, atol=1e-6)
        assert scoring.argmax_letter(batched[row].tolist()) == "ABCD"[int(logits[choices].argmax())]


def test_batches_by_prefix_cover_every_index_once_and_group_alike_prompts():
    prompts = [[5, 1], [1, 2, 3], [5, 0, 9], [1, 2], [9]]
    assert list(scoring.batches_by_prefix(prompts, 2)) == [[3, 1], [2, 0], [4]]
    assert scoring.shared_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 1  # each keeps its last token
    assert scoring.shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2


def test_few_shot_examples_are_computed_once_per_batch(tiny_model, tokenizer):
    """Prompts that share their few-shot examples (over SHARED_MIN tokens): the examples go through the model
    once, and every row's probabilities are those of its own whole prompt."""
    shots = tokenizer.encode("".join(f"问题：{i}+{i}=?\n答案：{2 * i}\n\n" for i in range(12)))
    assert len(shots) > scoring.SHARED_MIN
    ids = [shots + tokenizer.encode(f"问题：{q}\n答案：") for q in ("1+2=?", "a longer question, 3+4=?", "5+5=?")]
    choices = scoring.letter_ids(tokenizer, spaced=False)
    pad = tokenizer.special_tokens["<|extra_0|>"]
    seen: list[int] = []
    hook = tiny_model.transformer.wte.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        batched = scoring.choice_probs(tiny_model, ids, choices, pad)
    finally:
        hook.remove()
    shared = scoring.shared_prefix(ids)  # the examples and the "问题：" that starts every question
    assert len(shots) <= shared < min(len(p) for p in ids)
    assert seen == [shared, len(ids) * max(len(p) - shared for p in ids)]  # shared once, then each row's own
    for row, prompt in enumerate(ids):
        with torch.no_grad():
            logits = tiny_model(torch.tensor([prompt])).logits[0, -1].float()
        expected = torch.softmax(torch.softmax(logits, -1)[choices], -1)
        torch.testing.assert_close(batched[row], expected, rtol=1e-4, atol=1e-6)
    # --prefix-cache-gb 0: one left-padded forward over whole prompts, the same probabilities
    seen.clear()
    hook = tiny_model.transformer.wte.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        unshared = scoring.choice_probs(tiny_model, ids, choices, pad, share_prefix=False)
    finally:
        hook.remove()
    assert seen == [len(ids) * max(len(p) for p in ids)]
    torch.testing.assert_close(unshared, batched, rtol=1e-4, atol=1e-6)


def test_argmax_letter_takes_the_first_of_ties():
    assert scoring.argmax_letter([0.1, 0.4, 0.4, 0.1]) == "B"


def test_gsm8k_extractors_and_quirks():
    assert extract.gsm8k_gold("so 5 + 3 = 8\n#### 1,080") == 1080
    assert extract.gsm8k_gold("#### -3") == -3
    # The original base rule: the last run of digits; sign, decimals and thousands separators are lost.
    assert extract.gsm8k_base_answer("The answer is 42") == 42
    assert extract.gsm8k_base_answer("The answer is -3") == 3
    assert extract.gsm8k_base_answer("The answer is 20,800") == 800
    assert extract.gsm8k_base_answer("The answer is 2.5") == 5
    assert extract.gsm8k_base_answer("no digits") == extract.INVALID
    assert extract.gsm8k_base_answer("it is 007") == extract.INVALID  # eval("007") is a SyntaxError
    assert extract.gsm8k_base_answer("it is 00") == 0
    assert not extract.gsm8k_correct(extract.gsm8k_base_answer("The answer is 20,800"), 20800, "original")
    # The corrected rule (and the chat script's): the last number as written.
    assert extract.gsm8k_number_answer("The answer is 20,800.") == 20800
    assert extract.gsm8k_number_answer("it went down by -3 degrees") == -3
    assert extract.gsm8k_number_answer("pay $2.50 then +4") == 4
    assert extract.gsm8k_number_answer("none") == extract.INVALID
    assert extract.gsm8k_correct(extract.gsm8k_number_answer("The answer is 20,800"), 20800, "number")
    assert extract.gsm8k_correct(extract.gsm8k_number_answer("so 7.00001"), 7, "number")
    assert not extract.gsm8k_correct(extract.gsm8k_number_answer("so 7.1"), 7, "number")
    assert extract.last_number("#### 1,234") == "1234"


def test_cut_rules():
    text = "x = 1\nQuestion: next\n\nmore"
    assert extract.cut(text, extract.GSM8K_CUT) == "x = 1\n"
    assert extract.cut("a<|endoftext|>b\n\nc", extract.GSM8K_CUT) == "a"
    body = "    y = 1\n\n    return y\n\ndef other():\n"
    # The original HumanEval cut stops at the blank line inside the body (the documented quirk) ...
    assert extract.cut(body, extract.HUMANEVAL_CUT["original"]) == "    y = 1"
    assert extract.cut("    def helper():\n        return 1\n", extract.HUMANEVAL_CUT["original"]) == "    "
    # ... the codex rule keeps the whole body and stops at the next top-level statement.
    assert extract.cut(body, extract.HUMANEVAL_CUT["codex"]) == "    y = 1\n\n    return y\n"
    assert extract.cut("    return 1\nif __name__ == '__main__':\n", extract.HUMANEVAL_CUT["codex"]) == "    return 1"


def test_chat_humaneval_body_cascade():
    fenced = "Here:\n```python\nfrom x import y\ndef add(xs, k):\n    return [x + k for x in xs]\n```\nDone."
    assert extract.chat_humaneval_body(fenced, "add") == "    return [x + k for x in xs]\n"
    bare = "def add(xs, k):\n    out = []\n\n    return out\nprint(add([1], 2))"
    assert extract.chat_humaneval_body(bare, "add") == "    out = []\n\n    return out\n"
    other = "def helper(a):\n    return a\n"
    assert extract.chat_humaneval_body(other, "add") == "    return a\n"
    assert extract.chat_humaneval_body("return 1", "add") == "    return 1"


def test_aggregation_macro_and_micro():
    correct = {"s1": [True, False], "s2": [True, True, True, True], "s3": [False]}
    categories = {"X": ["s1", "s2"], "Y": ["s3"], "Empty": ["s9"]}
    macro = scoring.macro_average(correct, categories)
    assert macro == {"X": 75.0, "Y": 0.0, "Average": 50.0}
    micro = scoring.micro_average(correct, categories)
    assert micro["X"] == pytest.approx(500 / 6) and micro["Y"] == 0.0
    assert micro["Average"] == pytest.approx(500 / 7) and "Empty" not in micro
