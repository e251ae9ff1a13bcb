"""The built wheel carries every subpackage and the data files the code opens at run time."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_subpackages_vocabulary_and_kernel_source(tmp_path):
    # Build from a clean copy: a stale build/ folder in the checkout could supply files the config misses.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "NOTICE"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "qwen", source / "qwen", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist")],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("qwen-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    files = [*source.glob("qwen/**/*.py"), *source.glob("qwen/csrc/*.cpp"), source / "qwen/qwen.tiktoken"]
    expected = {str(path.relative_to(source)) for path in files}
    assert {"qwen/serve/app.py", "qwen/apps/web.py", "qwen/csrc/block_matvec.cpp"} <= expected
    assert expected <= names, sorted(expected - names)


# ----- the dependency policy (docs/dependencies.md) -----------------------------------------------

FAST_MOVING = {"transformers", "peft", "bitsandbytes", "deepspeed", "gradio", "lm-eval", "accelerate", "gguf",
               "openai", "langchain", "langchain-openai", "smolagents", "llguidance", "fastapi", "ruff",
               "schemathesis"}


def check_newest():
    """.ci/check_newest.py as a module (its folder is not a package)."""
    spec = importlib.util.spec_from_file_location("check_newest", ROOT / ".ci" / "check_newest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fast_moving_libraries_have_upper_bounds_that_admit_the_tested_versions():
    """A new release of a fast-moving library cannot reach a fresh install before it is tested, and
    constraints.txt (what CI installs) pins a version inside every declared range, torch and qwen excepted."""
    cn = check_newest()
    declared = cn.declared_requirements(ROOT / "pyproject.toml", ["all", "dev", "quant", "flash"])
    pins = cn.read_pins(ROOT / "constraints.txt")
    names = {cn.canonical(r.name) for r in declared}
    assert FAST_MOVING <= names
    for req in declared:
        name = cn.canonical(req.name)
        if name in FAST_MOVING:
            assert any(s.operator in ("<", "<=", "~=") for s in req.specifier), f"{req} has no upper bound"
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), (str(req), pins[name])
    assert {n for n in names if n not in ("gptqmodel", "optimum", "flash-attn", "torch")} <= set(pins)
    assert "torch" not in pins and "qwen" not in pins  # README installs torch first; a GPU user their own


def test_the_newest_check_lifts_only_upper_bounds(capsys):
    from packaging.requirements import Requirement

    cn = check_newest()
    lifted = [cn.lift_upper_bounds(Requirement(r)) for r in
              ("transformers>=5.24,<5.26", "peft~=0.21.2", "numpy", "x>=1,!=1.3,<=2; python_version>='3.11'")]
    assert lifted == ["transformers>=5.24", "peft>=0.21.2", "numpy", 'x!=1.3,>=1; python_version >= "3.11"']
    assert cn.main(["--plan"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert plan[0] == "torch==2.13.0" and "transformers>=5.24" in plan and "gradio>=6" in plan
    assert not [line for line in plan[1:] if "<" in line or line.startswith("torch")], plan


def test_ci_runs_the_readme_test_command_with_the_torch_the_newest_check_uses():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    demo, tests = [line for line in block.splitlines() if line and not line.startswith("#")]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    install = ci[ci.index("# --- README install command ---") + 1]
    test = ci[ci.index("# --- README test command ---") + 1]
    assert tests == f"{install} && {test}"
    assert "-c constraints.txt" in tests and demo.startswith(check_newest().TORCH.join(["pip install ", " && "]))


def test_the_readme_quantization_table_is_what_bench_quant_prints():
    """Same columns and the same rows (bench/quant.py's labels), so the table cannot drift from the bench."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import quant
    finally:
        sys.path.remove(str(ROOT / "bench"))
    page = (ROOT / "docs" / "quantization.md").read_text(encoding="utf-8")  # the README's section moved there
    assert quant.TABLE_HEADER in page
    table = page.split(quant.TABLE_HEADER, 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert [line.split(" | ")[0].lstrip("| ") for line in table] == [label for label, *_ in quant.ROWS.values()]
