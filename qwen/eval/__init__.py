"""Evaluation: the original Qwen benchmarks (C-Eval, MMLU, CMMLU, GSM8K, HumanEval, ReAct tool use).

The pure parts live here (prompt builders, answer extraction, scoring, aggregation, data readers, the
HumanEval sandbox) so that each is unit-tested; the scripts in ``eval/`` are thin wrappers with the
original names and flags.
"""


class EvalError(ValueError):
    """Bad input to an evaluation (missing data, wrong layout, unsafe flag not given): the message says
    what is wrong and how to fix it; the scripts print it and exit with status 2."""
