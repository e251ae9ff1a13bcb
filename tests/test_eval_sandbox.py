"""The HumanEval sandbox: real child processes running crafted problems in HumanEval's format."""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from fractions import Fraction
from pathlib import Path

import pytest

from qwen.eval import EvalError
from qwen.eval.data import read_jsonl
from qwen.eval.sandbox import (
    check_completion,
    pass_at_k,
    require_unsafe_confirmation,
    score_file,
    score_samples,
    write_jsonl,
)

ADD = {
    "task_id": "Test/0",
    "prompt": 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b.\n    >>> add(2, 3)\n    5\n    """\n',
    "canonical_solution": "    return a + b\n",
    "test": "METADATA = {}\n\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n"
    "    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}
UPPER = {
    "task_id": "Test/1",
    "prompt": 'def shout(s: str) -> str:\n    """Upper-case s and add "!".\n    >>> shout("hi")\n'
    '    \'HI!\'\n    """\n',
    "test": "def check(candidate):\n    assert candidate('hi') == 'HI!'\n",
    "entry_point": "shout",
}
PROBLEMS = {p["task_id"]: p for p in (ADD, UPPER)}


def test_passing_and_wrong_completions():
    assert check_completion(ADD, "    return a + b\n") == {"task_id": "Test/0", "passed": True, "result": "passed"}
    wrong = check_completion(ADD, "    return a - b\n")
    assert wrong == {"task_id": "Test/0", "passed": False, "result": "failed: AssertionError"}


def test_syntax_error_and_early_exit_fail():
    assert check_completion(ADD, "    return a +\n")["result"].startswith("failed: SyntaxError")
    # exit(0) before check() ran must not look like a pass
    early = check_completion(ADD, "    pass\nimport sys\nsys.exit(0)\n")
    assert not early["passed"] and early["result"].startswith("failed: SystemExit")


def test_endless_loop_is_killed_with_its_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    completion = (
        "    import subprocess, sys\n"
        "    p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"    open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "    while True:\n        pass\n"
    )
    start = time.monotonic()
    result = check_completion(ADD, completion, timeout=1.0)
    assert time.monotonic() - start < 3.0
    assert result == {"task_id": "Test/0", "passed": False, "result": "timed out"}
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # the orphan is reaped by init shortly after the SIGKILL
        if not Path(f"/proc/{grandchild}").exists() or " Z " in Path(f"/proc/{grandchild}/stat").read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the sleeping grandchild {grandchild} survived the time limit")


@pytest.mark.parametrize(
    "hog, memory_mb",
    [
        ("    x = bytearray(4 << 30)\n", 1024),
        ("    x = []\n    while True:\n        x.append(bytearray(1 << 20))\n", 256),
    ],
    ids=["4GB-bytearray", "growing-list"],
)
def test_memory_hog_is_reported_as_out_of_memory(hog, memory_mb):
    assert check_completion(ADD, hog + "    return a + b\n", memory_mb=memory_mb)["result"] == "out of memory"


def test_writes_land_in_a_removed_temp_dir_and_secrets_stay_out(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("QWEN_TEST_SECRET", "hunter2")
    where = tmp_path / "where.txt"
    completion = (
        "    import os\n"
        "    assert 'QWEN_TEST_SECRET' not in os.environ\n"
        "    open('stray.txt', 'w').write('x')\n"
        f"    open({str(where)!r}, 'w').write(os.getcwd())\n"
        "    return a + b\n"
    )
    assert check_completion(ADD, completion)["passed"]
    sandbox_dir = Path(where.read_text())
    assert sandbox_dir != cwd and not sandbox_dir.exists()
    assert list(cwd.iterdir()) == []


def test_refusal_without_confirmation_names_the_flag():
    with pytest.raises(EvalError, match="--confirm-run-unsafe-code") as err:
        require_unsafe_confirmation(False)
    assert "NOT a security boundary" in str(err.value)
    require_unsafe_confirmation(True)


def test_pass_at_k_known_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 8, 3) == 1.0  # fewer than k failures: some k-subset always passes
    for n, c, k in [(7, 3, 2), (20, 5, 10), (200, 13, 100)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)


def test_score_samples_keeps_order_and_reports_only_covered_k():
    samples = [{"task_id": "Test/0", "completion": "    return a + b\n", "extra": 1}]
    samples += [{"task_id": "Test/1", "completion": c} for c in ("    return s.upper() + '!'\n", "    return s\n")]
    results, summary = score_samples(PROBLEMS, samples, workers=2, progress=False)
    assert [r["passed"] for r in results] == [True, True, False]
    assert results[0] == {**samples[0], "passed": True, "result": "passed"}
    # Test/0: 1 of 1; Test/1: 1 of 2; pass@10 is left out because no task has 10 samples
    assert summary == {"pass@1": pytest.approx((1.0 + 0.5) / 2), "n_tasks": 2, "n_samples": 3}
    with pytest.raises(EvalError, match="Test/9"):
        score_samples(PROBLEMS, [{"task_id": "Test/9", "completion": ""}], progress=False)


def test_score_file_end_to_end(tmp_path):
    problems = tmp_path / "problems.jsonl.gz"
    with gzip.open(problems, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in PROBLEMS.values())
    samples = tmp_path / "HumanEval_res.jsonl"
    write_jsonl(samples, [{"task_id": "Test/0", "completion": "    return a + b\n"},
                          {"task_id": "Test/1", "completion": "    return s.lower()\n"}])  # fmt: skip
    summary = score_file(samples, problems, timeout=3.0, memory_mb=512, workers=2, progress=False)
    assert summary == {"pass@1": 0.5, "n_tasks": 2, "n_samples": 2}
    rows = read_jsonl(f"{samples}_results.jsonl")
    assert [(r["task_id"], r["passed"], r["result"]) for r in rows] == [
        ("Test/0", True, "passed"),
        ("Test/1", False, "failed: AssertionError"),
    ]


def test_score_file_input_errors(tmp_path):
    problems = tmp_path / "HumanEval.jsonl"
    write_jsonl(problems, PROBLEMS.values())
    with pytest.raises(EvalError, match="no such file"):
        score_file(tmp_path / "missing.jsonl", problems, progress=False)
    with pytest.raises(EvalError, match="fetch humaneval"):
        score_file(problems, tmp_path / "missing.jsonl", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "Test/0", "completion": ""}\n{"task_id": \n')
    with pytest.raises(EvalError, match="line 2: not JSON"):
        score_file(bad, problems, progress=False)
    bad.write_text('\n{"task_id": "Test/0"}\n')
    with pytest.raises(EvalError, match="line 2: missing completion"):
        score_file(bad, problems, progress=False)
    assert not os.path.exists(f"{bad}_results.jsonl")
