"""The built wheel carries every subpackage and the data files the code opens at run time."""

from __future__ import annotations

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
    assert {"qwen/serve/app.py", "qwen/apps/web.py", "qwen/csrc/int8_matvec.cpp"} <= expected
    assert expected <= names, sorted(expected - names)
