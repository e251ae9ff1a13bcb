"""The console scripts an installed wheel puts on PATH (``[project.scripts]`` in pyproject.toml).

Each runs the same ``main`` as the root script or ``python -m`` command beside it, which keep their names:

    qwen-cli     qwen.apps.cli:main          python cli_demo.py
    qwen-web     qwen.apps.web:main          python web_demo.py
    qwen-serve   qwen.serve.main:main        python openai_api.py
    qwen-tiny    qwen.tiny:main              python -m qwen.tiny
    qwen-export  qwen.export.__main__:main   python -m qwen.export

Importing this module imports nothing else: ``qwen/__init__.py`` asks it whether this process is a front end
that parses its command line before torch is imported (what the root scripts say with ``QWEN_DEFER_IMPORTS``).
"""

from __future__ import annotations

import os
import re
import sys

# script name: (entry point, the name the same program has in a checkout)
SCRIPTS = {
    "qwen-cli": ("qwen.apps.cli:main", "cli_demo.py"),
    "qwen-web": ("qwen.apps.web:main", "web_demo.py"),
    "qwen-serve": ("qwen.serve.main:main", "openai_api.py"),
    "qwen-tiny": ("qwen.tiny:main", "python -m qwen.tiny"),
    "qwen-export": ("qwen.export.__main__:main", "python -m qwen.export"),
}
# The front ends whose --help answers before torch and transformers are imported.
DEFERRED_IMPORTS = {"qwen-cli", "qwen-web", "qwen-serve"}


def running_script() -> str | None:
    """The console script this process runs (``qwen-serve``...), or None (a root script, ``python -m``, a notebook).
    pip's launchers are ``bin/NAME`` on POSIX and ``Scripts\\NAME.exe`` (or ``NAME-script.py``) on Windows."""
    argv = getattr(sys, "argv", None) or [""]
    name = re.sub(r"(\.exe|-script\.pyw?)$", "", os.path.basename(argv[0] or ""), flags=re.IGNORECASE)
    return name if name in SCRIPTS else None


def program_name(default: str) -> str:
    """The name a program's usage line shows: the console script when run as one, else ``default``
    (``openai_api.py``, ``python -m qwen.tiny``...)."""
    return running_script() or default
