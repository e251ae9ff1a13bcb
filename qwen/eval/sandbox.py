"""HumanEval execution sandbox, the unbiased pass@k estimator and scoring of a samples JSONL (``--score``).

HumanEval grades a completion by *running* it against the problem's tests, so the code is model-written and
untrusted. Each check runs in a fresh ``python -I`` child, in its own session and its own temporary directory
(its cwd, removed afterwards), with a wall-clock limit that kills the whole process group, address-space, CPU
and file-size rlimits, and an environment holding nothing from ours. That stops endless loops, memory hogs,
stray processes and clutter in the working directory; it is *not* a security boundary: the code can still
read and write the user's files and use the network.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from qwen.eval import EvalError

KS = (1, 10, 100)  # the pass@k values human-eval reports, each only when every task has at least k samples
FILE_LIMIT_MB = 16  # RLIMIT_FSIZE: the most the child may write to one file, its captured stderr included
_OOM_STATUS = 3  # exit status the bootstrap uses for a MemoryError (it allocates nothing more to report it)
_STDERR_TAIL = 4096  # bytes of the child's stderr read back to name the failure

# Runs in the child before the program. The limits are set here, not in a preexec_fn, because preexec_fn
# runs Python between fork and exec, which the docs call unsafe with threads (score_samples uses a pool).
# The program runs in an empty namespace, as in human-eval, so `if __name__ == "__main__":` blocks in a
# completion stay inactive; an early sys.exit() counts as a failure instead of a silent pass.
_BOOTSTRAP = f"""\
import os, resource, sys
mem, cpu, fsize = map(int, sys.argv[1:])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
try:
    with open("program.py", encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    exec(code, {{}})
except MemoryError:
    os._exit({_OOM_STATUS})
except SystemExit as exc:
    sys.exit(f"SystemExit: the program exited ({{exc.code!r}}) before its tests finished")
"""


def require_unsafe_confirmation(confirmed: bool) -> None:
    """Refuse to run HumanEval unless the user said they accept running model-written code."""
    if not confirmed:
        raise EvalError(
            "HumanEval executes the code the model wrote, on this machine, to check it against the tests. "
            "Each completion runs in a separate Python process inside a temporary directory, with time and "
            "memory limits and a clean environment, but this is NOT a security boundary: the code can still "
            "read and write your files and use the network. Run it only on a machine (or container) you are "
            "prepared to expose, and pass --confirm-run-unsafe-code to proceed."
        )


def check_completion(problem: dict, completion: str, timeout: float = 3.0, memory_mb: int = 1024) -> dict:
    """Run one completion with its problem's tests in a sandboxed child process.

    ``timeout`` is wall-clock seconds including interpreter start-up; ``memory_mb`` caps the child's address
    space (the interpreter itself needs some 20 MB of it). The result is "passed", "timed out",
    "out of memory" or "failed: <the last line of the child's stderr, e.g. the exception>".
    """
    if timeout <= 0 or memory_mb <= 0:
        raise EvalError(f"timeout and memory limit must be positive, got {timeout} s and {memory_mb} MB")
    program = problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"
    limits = [memory_mb << 20, math.ceil(timeout) + 1, FILE_LIMIT_MB << 20]  # CPU limit: a backstop only
    with (
        tempfile.TemporaryDirectory(prefix="qwen-humaneval-", ignore_cleanup_errors=True) as workdir,
        tempfile.TemporaryFile() as stderr,
    ):
        Path(workdir, "program.py").write_text(program, encoding="utf-8")
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-X", "utf8", "-c", _BOOTSTRAP, *map(str, limits)],
            cwd=workdir, env=_child_env(workdir), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=stderr, start_new_session=True,
        )  # fmt: skip
        try:
            status: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            status = None
        finally:  # also kills whatever the program left running in the background
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - _STDERR_TAIL))
        result = "timed out" if status is None else _describe(status, stderr.read().decode("utf-8", "replace"))
    return {"task_id": problem["task_id"], "passed": result == "passed", "result": result}


def _child_env(workdir: str) -> dict[str, str]:
    """Only the basics: none of our variables (API keys, tokens) reach model-written code. Python ignores
    PYTHON* variables under -I, hence -B rather than PYTHONDONTWRITEBYTECODE; one BLAS thread keeps numpy's
    start-up inside the address-space limit."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
    }  # fmt: skip


def _describe(status: int, stderr: str) -> str:
    if status == 0:
        return "passed"
    if status in (_OOM_STATUS, -signal.SIGKILL):  # MemoryError, or killed by the kernel's OOM killer
        return "out of memory"
    if status == -signal.SIGXCPU:
        return "timed out"
    if status == -signal.SIGXFSZ:
        return f"failed: wrote more than {FILE_LIMIT_MB} MB to a file"
    if status < 0:
        try:
            return f"failed: killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"failed: killed by signal {-status}"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return "failed: " + (lines[-1][:300] if lines else f"exit status {status}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k), computed as a product so that
    it stays exact in floating point for large n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score_samples(
    problems: dict[str, dict], samples: list[dict], *, workers: int = 2, timeout: float = 3.0,
    memory_mb: int = 1024, progress: bool = True,
) -> tuple[list[dict], dict]:  # fmt: skip
    """Check every sample (several per task allowed) in ``workers`` parallel children.

    Returns the samples in input order, each with "passed" and "result" added, and a summary with pass@k
    averaged over the tasks that have samples, "n_tasks" and "n_samples".
    """
    for i, sample in enumerate(samples):
        if not isinstance(sample.get("completion"), str) or "task_id" not in sample:
            raise EvalError(f"sample {i} needs a task_id and a string completion, got keys {sorted(sample)}")
    unknown = sorted({s["task_id"] for s in samples} - problems.keys())
    if unknown:
        raise EvalError(f"samples name task ids that are not among the {len(problems)} problems: {unknown[:5]}")
    from tqdm import tqdm

    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:  # a Ctrl-C drops the queued checks instead of running them all first
        futures = [pool.submit(check_completion, problems[s["task_id"]], s["completion"], timeout, memory_mb)
                   for s in samples]  # fmt: skip
        for _ in tqdm(as_completed(futures), total=len(futures), desc="HumanEval", disable=not progress):
            pass
    finally:
        pool.shutdown(cancel_futures=True)
    results = [{**s, **f.result()} for s, f in zip(samples, futures, strict=True)]  # adds passed and result
    counts: dict[str, list[int]] = {}
    for r in results:
        n_c = counts.setdefault(r["task_id"], [0, 0])
        n_c[0] += 1
        n_c[1] += r["passed"]
    summary = {
        f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts)
        for k in KS
        if counts and all(n >= k for n, _ in counts.values())
    }
    return results, {**summary, "n_tasks": len(counts), "n_samples": len(results)}


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def score_file(
    samples_path: str | os.PathLike, problems_path: str | os.PathLike, *, timeout: float = 3.0,
    memory_mb: int = 1024, workers: int = 2, progress: bool = True,
) -> dict:  # fmt: skip
    """Score a samples JSONL of {task_id, completion} lines (what the eval scripts write) against the problems
    (HumanEval.jsonl or .jsonl.gz), write ``<samples_path>_results.jsonl`` as human-eval does (each sample
    plus "result" and "passed"), and return the summary."""
    from .data import read_humaneval, read_jsonl

    problems = {p["task_id"]: p for p in read_humaneval(problems_path)}
    samples = read_jsonl(samples_path, ("task_id", "completion"))
    if not samples:
        raise EvalError(f"{samples_path} holds no samples")
    results, summary = score_samples(
        problems, samples, workers=workers, timeout=timeout, memory_mb=memory_mb, progress=progress
    )
    write_jsonl(f"{samples_path}_results.jsonl", results)
    return summary
