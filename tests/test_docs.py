"""The documentation: the site builds with `mkdocs build --strict` (every page in the nav, every link between
pages and every anchor resolves, the API reference renders from the docstrings), and the README stays short
with every link into docs/ pointing at a page that exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_the_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
    pytest.importorskip("material", reason="mkdocs-material is not installed")
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings[python] is not installed")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    for page in ("index.html", "serving/index.html", "api/index.html", "performance/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "SamplingParams" in api and "create_app" in api and "load_lora" in api


def test_the_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 160, f"README.md has {len(lines)} lines: move sections to docs/"


def test_every_readme_link_into_docs_resolves():
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)\s]*)\)", text)
    assert links, "the README links no docs/ page"
    for link in links:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README links {link}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(encoding="utf-8"), flags=re.M)
            slugs = {slug(h) for h in headings}
            assert anchor in slugs, f"README links {link}: no heading with that anchor in {path}"


def test_the_nav_lists_every_page():
    """Every docs/*.md is in the nav (mkdocs.yml also makes a missing one fail the strict build; this names it)."""
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {p for p in pages if f": {p}" not in nav} == set()


def slug(heading: str) -> str:
    """Python-Markdown's toc anchor (its default slugify): lowercase, punctuation dropped, spaces to dashes."""
    text = re.sub(r"`|\*\*", "", heading)
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)
