"""Answer extraction of the chat multiple-choice scripts: every cascade branch, the negation guards, the
normalisation of C-Eval (question blank, option texts) and of MMLU (case-insensitive option texts)."""

import sys

import pytest

from qwen.eval import EvalError
from qwen.eval.choice import CEVAL_CASCADE, MMLU_CASCADE, extract_ceval_choice, extract_mmlu_choice


def first_branch(text, cascade):
    """Which of (a)-(d) hits first, or "e" when the fuzzy fallback would be used."""
    return next(("abcd"[i] for i, pattern in enumerate(cascade) if pattern.search(text)), "e")


# The spec's example item (a C-Eval computer_network question).
NET_Q = "关于传输层的面向连接服务的特性是____。"
NET_OPTS = {
    "A": "既不保证可靠，也不保证按序交付",
    "B": "不保证可靠，但保证按序交付",
    "C": "保证可靠，但不保证按序交付",
    "D": "既保证可靠，也保证按序交付",
}
ZH_OPTS = {"A": "甲", "B": "乙", "C": "丙", "D": "丁"}


@pytest.mark.parametrize(
    ("response", "branch", "letter"),
    [
        ("答案是B。", "a", "B"),
        ("应该选C选项", "a", "C"),
        ("选择：D", "a", "D"),
        ("【答案】A", "a", "A"),
        ("答案不是A，应该选B。", "a", "B"),  # guard: 答案不是A is skipped, 选B wins
        ("C项是对的。", "b", "C"),
        ("A选项不正确，B选项正确。", "b", "B"),  # guard: A…不正确 is skipped
        ("（C）因为面向连接", "c", "C"),
        ("D", "c", "D"),
        ("令A=1，由ABC可知D最合理", "d", "D"),  # A=, ABC are not answers
    ],
)
def test_ceval_branches(response, branch, letter):
    assert first_branch(response, CEVAL_CASCADE) == branch
    assert extract_ceval_choice(response, "下面哪一项最合适？", ZH_OPTS) == letter


def test_ceval_guards_change_the_answer():
    # Without the negation guards these would read A (the first letter after 答案 / before 正确).
    assert CEVAL_CASCADE[0].search("答案不是A，应该选B。").group(1) == "B"
    assert CEVAL_CASCADE[1].search("A选项不正确，B选项正确。").group(1) == "B"
    assert CEVAL_CASCADE[0].search("答案非A。") is None


def test_ceval_restated_question_and_option_become_an_answer():
    # The spec's example: the question's stem becomes 答案是, the option text becomes its letter.
    response = "关于传输层的面向连接服务的特性是既保证可靠，也保证按序交付"
    assert extract_ceval_choice(response, NET_Q, NET_OPTS) == "D"
    assert extract_ceval_choice("我选既不保证可靠，也不保证按序交付。", NET_Q, NET_OPTS) == "A"


def test_ceval_only_the_last_sentence_is_used():
    # Only the last sentence's stem (A、B两点间的距离是) is replaced by 答案是; had the whole question been used, it
    # would not be found in the response and the first letter (A) would be read instead.
    question = "图中有A、B两点。A、B两点间的距离是____。"
    assert extract_ceval_choice("A、B两点间的距离是丙", question, ZH_OPTS) == "C"


def test_ceval_blank_parts_longer_than_4_are_rewritten():
    # A 3-character stem stays as it is: "A和B之外…是C" reads A (first letter).
    assert extract_ceval_choice("A和B之外，我认为是C", "A和B____。", ZH_OPTS) == "A"
    # A 5-character stem is replaced by 答案是, so branch (a) finds C.
    assert extract_ceval_choice("A和B两者之外，我认为是C", "A和B两者____。", ZH_OPTS) == "C"
    # The part after the blank is deleted, so its "D" no longer counts: only 微信 (A) is left.
    opts = {"A": "微信", "B": "淘宝", "C": "抖音", "D": "京东"}
    assert extract_ceval_choice("“是D公司的产品”说的是微信", "____是D公司的产品。", opts) == "A"


def test_ceval_options_replaced_longest_first():
    opts = {"A": "红色", "B": "深红色", "C": "蓝色", "D": "绿色"}
    assert extract_ceval_choice("我选深红色", "下面哪一项最合适？", opts) == "B"  # not 深A
    # an option's trailing 。 is dropped before matching (else 选D would be the first explicit answer)
    assert extract_ceval_choice("我选蓝色，不选D", "下面哪一项最合适？", {**opts, "C": "蓝色。"}) == "C"


def test_ceval_fuzzy_fallback():
    pytest.importorskip("thefuzz")
    response = "我认为是既保证可靠也保证按序"  # no letter, no exact option text
    assert first_branch(response, CEVAL_CASCADE) == "e"
    assert extract_ceval_choice(response, NET_Q, NET_OPTS) == "D"
    # equal option texts: the first one wins, as list.index does in the original
    assert extract_ceval_choice("完全无关", "题目？", {"A": "x", "B": "x", "C": "x", "D": "x"}) == "A"


GREEK = {"A": "alpha", "B": "beta", "C": "gamma", "D": "delta"}  # texts absent from the responses below
CAPITALS = {"A": "London", "B": "Paris, France", "C": "Berlin", "D": "Rome"}


@pytest.mark.parametrize(
    ("response", "branch", "letter"),
    [
        ("The answer is B.", "a", "B"),
        ("Answer: D", "a", "D"),
        ("I would choose C here", "a", "C"),
        ("The answer isn't A. I choose B.", "a", "B"),  # guard: the negated "answer" is skipped
        ("The answer is not A, it is B", "d", "A"),  # guard skips (a); (d) then takes the first letter
        ("Clearly B is correct.", "b", "B"),
        ("A is not correct, but C is right.", "b", "C"),  # guard: "A is not correct" is skipped
        ("C: it depends on the pressure", "c", "C"),
        ("Between the DNA and the ATP options, D", "d", "D"),  # DNA, ATP are not answers
    ],
)
def test_mmlu_branches(response, branch, letter):
    assert first_branch(response, MMLU_CASCADE) == branch
    assert extract_mmlu_choice(response, GREEK) == letter


def test_mmlu_guard_changes_the_answer():
    assert MMLU_CASCADE[0].search("The answer isn't A. I choose B.").group(1) == "B"
    assert MMLU_CASCADE[1].search("A is not correct, but C is right.").group(1) == "C"


def test_mmlu_option_texts_replaced_case_insensitively():
    opts = {"A": "The mitochondria.", "B": "The nucleus (cell).", "C": "Ribosomes", "D": "Golgi"}
    # regex metacharacters are escaped, case is ignored, the trailing "." is dropped; otherwise nothing is
    # replaced and (d) reads the A
    assert extract_mmlu_choice("the NUCLEUS (cell), surely not A", opts) == "B"
    # longest first: "red wine" must not become "A wine"
    assert extract_mmlu_choice("I'd pick red wine", {"A": "Red", "B": "Red wine", "C": "x", "D": "y"}) == "B"


def test_mmlu_fuzzy_fallback():
    pytest.importorskip("thefuzz")
    assert first_branch("Paris, obviously", MMLU_CASCADE) == "e"
    assert extract_mmlu_choice("Paris, obviously", CAPITALS) == "B"
    assert extract_mmlu_choice("", CAPITALS) in "ABCD"  # never "" even for an empty response


def test_missing_thefuzz_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "thefuzz", None)  # makes `import thefuzz` fail
    with pytest.raises(EvalError, match=r'pip install -e "\.\[eval\]"'):
        extract_mmlu_choice("Paris, obviously", CAPITALS)
    assert extract_mmlu_choice("The answer is C", CAPITALS) == "C"  # only the fallback needs it
