"""Subject tables (counts, categories, no overlaps) and the ReAct benchmark pieces (parser, action-input
normalisation, ROUGE-L, plugin metrics)."""

import random
import sys

import pytest

from qwen.eval import EvalError
from qwen.eval.react import normalize_action_input, parse_react, plugin_metrics, rouge_l_f1
from qwen.eval.subjects import (
    CEVAL_CATEGORIES,
    CEVAL_HARD,
    CEVAL_SUBJECTS,
    CMMLU_CATEGORIES,
    CMMLU_SUBJECTS,
    MMLU_CATEGORIES,
    MMLU_SUBJECTS,
    category_members,
)

# --- subject tables ---------------------------------------------------------------------------------------


def sizes(categories):
    return {name: len(members) for name, members in categories.items()}


def test_ceval_table():
    assert len(CEVAL_SUBJECTS) == 52
    assert sizes(CEVAL_CATEGORIES) == {"STEM": 20, "Social Science": 10, "Humanities": 11, "Other": 11}
    assert sorted(s for members in CEVAL_CATEGORIES.values() for s in members) == sorted(CEVAL_SUBJECTS)
    for position in (0, 1):  # English and Chinese names are all distinct
        assert len({v[position] for v in CEVAL_SUBJECTS.values()}) == 52
    assert CEVAL_SUBJECTS["computer_network"] == ("Computer Network", "计算机网络", "STEM")
    assert CEVAL_SUBJECTS["physician"] == ("Physician", "医师资格", "Other")


def test_ceval_hard_subjects():
    assert len(set(CEVAL_HARD)) == len(CEVAL_HARD) == 8
    assert set(CEVAL_HARD) <= set(CEVAL_CATEGORIES["STEM"])


def test_mmlu_table():
    assert len(MMLU_SUBJECTS) == 57
    assert sizes(MMLU_CATEGORIES) == {"stem": 19, "Humanities": 13, "other": 13, "social": 12}
    assert sorted(s for members in MMLU_CATEGORIES.values() for s in members) == sorted(MMLU_SUBJECTS)
    assert MMLU_SUBJECTS["clinical_knowledge"] == "other"
    assert MMLU_SUBJECTS["formal_logic"] == "Humanities"
    assert MMLU_SUBJECTS["econometrics"] == "social"
    assert list(MMLU_SUBJECTS)[:2] == ["abstract_algebra", "anatomy"]  # the script's walking order
    assert list(MMLU_SUBJECTS)[-1] == "us_foreign_policy"


def test_cmmlu_table():
    assert len(CMMLU_SUBJECTS) == 67
    assert sizes(CMMLU_CATEGORIES) == {
        "STEM": 17, "Humanities": 13, "Social Science": 22, "Other": 15, "China specific": 15,
    }
    main = ("STEM", "Humanities", "Social Science", "Other")
    for subject, categories in CMMLU_SUBJECTS.items():  # exactly one main category each
        assert len(set(categories) & set(main)) == 1, subject
        assert set(categories) <= {*main, "China specific"}
    assert set(CMMLU_CATEGORIES["China specific"]) < set(CMMLU_SUBJECTS)
    assert CMMLU_SUBJECTS["ancient_chinese"] == ("Social Science", "China specific")
    assert CMMLU_SUBJECTS["global_facts"] == ("Humanities",)


def test_category_members():
    assert category_members("ceval", "Other") == CEVAL_CATEGORIES["Other"]
    assert category_members("mmlu", "social")[0] == "econometrics"
    assert "chinese_history" in category_members("cmmlu", "China specific")
    with pytest.raises(KeyError, match="known: stem, Humanities, other, social"):
        category_members("mmlu", "STEM")


# --- ReAct parser -----------------------------------------------------------------------------------------

FULL = (
    "Thought: 我需要查询北京的天气\n"
    "Action: weather\n"
    'Action Input: {"city": "北京"}\n'
    "Observation: 晴，25度\n"
    "Thought: I now know the final answer\n"
    "Final Answer: 北京今天晴，25度"
)


def test_parse_full_transcript():
    assert parse_react(FULL) == {
        "thought": "Thought: 我需要查询北京的天气",  # from the very start, as in the original
        "action": "weather",
        "action_input": '{"city": "北京"}',
        "observation": "晴，25度",
        "thought_last": "I now know the final answer",
        "final_answer": "北京今天晴，25度",
    }


def test_parse_generation_that_stops_after_the_call():
    parsed = parse_react("Thought: 查一下\nAction: search\nAction Input: {'q': 1}")
    assert parsed["action"] == "search"
    assert parsed["action_input"] == "{'q': 1}"  # no Observation: runs to the end
    assert parsed["observation"] == ""  # no Observation: marker
    assert parsed["final_answer"] == ""
    # the only "Thought:" is the first one, and there is no "Final Answer:": the rest of the text
    assert parsed["thought_last"] == "查一下\nAction: search\nAction Input: {'q': 1}"


def test_parse_observation_before_the_last_thought_is_empty():
    # generation stopped at the observation: the last "Thought:" lies before it, so the slice is empty
    parsed = parse_react("Thought: a\nAction: b\nAction Input: {}\nObservation: done")
    assert parsed["observation"] == ""
    assert parsed["action_input"] == "{}"


def test_parse_plain_answer():
    assert parse_react("你好！我可以帮你。") == {
        "thought": "你好！我可以帮你。", "action": "", "action_input": "", "observation": "",
        "thought_last": "", "final_answer": "",
    }
    direct = parse_react("Thought: 不需要工具\nFinal Answer: 42")
    assert (direct["action"], direct["thought_last"], direct["final_answer"]) == ("", "不需要工具", "42")


def test_normalize_action_input():
    assert normalize_action_input('{"b": 1, "a": "北京"}') == '{"a": "北京", "b": 1}'
    assert normalize_action_input("{city: '北京', days: [1, 2,],}") == '{"city": "北京", "days": [1, 2]}'
    assert normalize_action_input("42") == "42"
    assert normalize_action_input("北京") == ""
    assert normalize_action_input('{"a": 1') == ""
    assert normalize_action_input("") == ""


def test_missing_json5_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "json5", None)  # makes `import json5` fail
    with pytest.raises(EvalError, match=r'pip install -e "\.\[eval\]"'):
        normalize_action_input("{}")


# --- ROUGE-L ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "candidate", "expected"),
    [
        ("a b c d", "a c d e", 0.75),  # LCS a c d: P = R = 3/4
        ("a b c", "c b a", 1 / 3),  # LCS 1: P = R = 1/3
        ("a b c d e f", "a f", 0.5),  # LCS 2: P = 1, R = 1/3, F = 2PR/(P+R) = 1/2
        ("x y", "x y", 1.0),
        ("a b", "c d", 0.0),
        ("", "a", 0.0),
        ("a", "", 0.0),
        ("", "", 0.0),
    ],
)
def test_rouge_l_by_hand(reference, candidate, expected):
    assert rouge_l_f1(reference.split(), candidate.split()) == pytest.approx(expected)


def test_rouge_l_equals_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

    class Whitespace:
        def tokenize(self, text):
            return text.split()

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Whitespace())
    rng = random.Random(0)
    for _ in range(300):
        ref = [rng.choice("abcde") for _ in range(rng.randint(0, 9))]
        cand = [rng.choice("abcde") for _ in range(rng.randint(0, 9))]
        assert rouge_l_f1(ref, cand) == scorer.score(" ".join(ref), " ".join(cand))["rougeL"].fmeasure


# --- plugin metrics ---------------------------------------------------------------------------------------


def job(gen, gold=FULL):
    return {"prompt": "...ReAct prompt...", "response": gold, "gen": [gen]}


POSITIVE = [
    # right tool (case and spacing differ), same input written as JSON5: right, ROUGE 1
    job('Thought: 查天气\nAction:  Weather \nAction Input: {city: "北京"}\nObservation:'),
    # wrong tool, half the input tokens right: wrong, ROUGE 1/2 ('{"city":' matches, '"上海"}' does not)
    job('Thought: 查天气\nAction: search\nAction Input: {"city": "上海"}\nObservation:'),
    # no tool call: wrong, ROUGE 0 (empty action input)
    job("Thought: 我知道\nFinal Answer: 晴"),
    # right tool and input but "Action: " not after a newline, so not a call: wrong, ROUGE still 1
    job('Action: weather\nAction Input: {"city": "北京"}\nObservation:'),
]
NEGATIVE = [
    job("Thought: 不需要工具\nFinal Answer: 你好"),
    job("Thought: 查一下\nAction: search\nAction Input: {}"),  # a tool call: bad
    job("Action: search"),  # at the very start, not "\nAction: ": not counted
]


def test_plugin_metrics():
    scores = plugin_metrics(POSITIVE, NEGATIVE, str.split)
    assert scores["react_positive"]["action_right_rate"] == 0.25
    assert scores["react_positive"]["action_input_rouge"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert scores["react_negative"] == {"bad_rate": pytest.approx(1 / 3)}


def test_plugin_rouge_uses_tokenizer_strings_without_inner_spaces():
    # Character tokens: the " " token vanishes when the joined string is split again, leaving the 13
    # characters of {"city":"北京"}; 11 of them are shared with {"city":"上海"}.
    scores = plugin_metrics(POSITIVE[1:2], None, list)
    assert scores["react_positive"]["action_input_rouge"] == pytest.approx(11 / 13)
    assert "react_negative" not in scores


def test_plugin_metrics_bad_input():
    assert plugin_metrics(None, None, str.split) == {}
    with pytest.raises(EvalError, match="no react_negative jobs"):
        plugin_metrics(None, [], str.split)
    with pytest.raises(EvalError, match="react_positive job 1 has no generation"):
        plugin_metrics([POSITIVE[0], {"prompt": "p", "response": FULL}], None, str.split)
