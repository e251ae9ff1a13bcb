"""Try qwen on the newest releases of its dependencies, past pyproject.toml's upper bounds, and say what broke.

    python .ci/check_newest.py                      # fresh venv, newest releases, ruff + the whole test suite
    python .ci/check_newest.py -- tests/test_finetune.py -x   # only these tests (pytest's arguments)
    python .ci/check_newest.py --plan               # print what would be installed, install nothing

It makes a fresh virtual environment, installs torch as README.md says, then qwen's `all` and `dev` extras
with every upper bound lifted (`transformers>=5.24,<5.26` becomes `transformers>=5.24`), runs `ruff check .`
and pytest there, and ends with a report: each package whose version differs from constraints.txt (the set CI
tests), the bounds the newest releases pass, and the tests that failed. When everything passed,
`--write-constraints` writes the new versions into constraints.txt; raise the bounds in pyproject.toml by hand.
Takes as long as an install plus the suite (~25 min on 2 cores); CI never runs it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # README's install command: the CPU build where pip serves it
LIFTED = {"<", "<=", "~=", "==="}  # operators that cap a version from above


def declared_requirements(pyproject: Path, extras: list[str]) -> list[Requirement]:
    """The core dependencies and those of ``extras``, with qwen's own ``qwen[x]`` references expanded."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    found: list[Requirement] = [Requirement(r) for r in project["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            raise SystemExit(f"error: pyproject.toml has no extra {extra!r}")
        for text in optional[extra]:
            req = Requirement(text)
            if req.name == project["name"]:
                todo += sorted(req.extras)
            else:
                found.append(req)
    return found


def lift_upper_bounds(req: Requirement) -> str:
    """``req`` without the specifiers that cap it from above (``~=X.Y`` keeps its floor, ``>=X.Y``)."""
    kept = []
    for spec in req.specifier:
        if spec.operator == "~=":
            kept.append(f">={spec.version}")
        elif spec.operator not in LIFTED:
            kept.append(str(spec))
    marker = f"; {req.marker}" if req.marker else ""
    return f"{req.name}{','.join(sorted(kept))}{marker}"


def read_pins(constraints: Path) -> dict[str, str]:
    pins = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            pins[canonical(req.name)] = spec.version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, **kwargs)


def installed_versions(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format", "json", "--exclude-editable"],
                         capture_output=True, text=True, check=True).stdout
    return {canonical(p["name"]): p["version"] for p in json.loads(out)}


def failed_tests(junit: Path) -> list[str]:
    if not junit.is_file():
        return []
    failed = []
    for case in ET.parse(junit).iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return failed


def report(declared: list[Requirement], pins: dict[str, str], now: dict[str, str]) -> list[str]:
    """Lines: the declared packages beyond their bound, then every version that differs from the pins."""
    lines = []
    for req in declared:
        version = now.get(canonical(req.name))
        if version is not None and not req.specifier.contains(version, prereleases=True):
            lines.append(f"  beyond the bound: {req.name} {version} (pyproject.toml: {req.specifier})")
    changed = sorted((n, pins.get(n, "-"), v) for n, v in now.items() if pins.get(n) != v and n != "torch")
    lines += [f"  {name}: {old} -> {new}" for name, old, new in changed]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, help="virtual environment folder (default: a temporary one)")
    parser.add_argument("--extras", default="all,dev", help="qwen's extras to install (default: %(default)s)")
    parser.add_argument("--torch", default=TORCH, help="the torch requirement (default: %(default)s)")
    parser.add_argument("--plan", action="store_true", help="print the requirements and stop")
    parser.add_argument("--write-constraints", action="store_true",
                        help="when everything passed, write the versions tested into constraints.txt")
    parser.add_argument("pytest_args", nargs="*", help="pytest's arguments, after -- (default: the whole suite)")
    args = parser.parse_args(argv)

    declared = declared_requirements(ROOT / "pyproject.toml", args.extras.split(","))
    # torch stays as --torch installs it: an upgrade would pull the newest CUDA build (several GB).
    lifted = sorted({lift_upper_bounds(r) for r in declared if canonical(r.name) != "torch"})
    if args.plan:
        print("\n".join([args.torch, *lifted]))
        return 0

    with tempfile.TemporaryDirectory(prefix="qwen-newest-") as temp:
        venv = args.venv or Path(temp) / "venv"
        python = venv / "bin" / "python"
        pip = [str(python), "-m", "pip", "install", "-q"]
        run([sys.executable, "-m", "venv", str(venv)], check=True)
        run([*pip, "--upgrade", "pip"], check=True)
        run([*pip, args.torch], check=True)
        run([*pip, "--no-deps", "-e", "."], check=True)
        install = run([*pip, "--upgrade", *lifted])
        if install.returncode != 0:
            print("\nThe newest releases do not install together (pip's message above).")
            return 1
        now = installed_versions(python)
        lint = run([str(venv / "bin" / "ruff"), "check", "."])
        junit = Path(temp) / "junit.xml"
        tests = run([str(python), "-m", "pytest", "-q", f"--junitxml={junit}", *args.pytest_args])
        failed = failed_tests(junit)

        print("\n# Newest releases against constraints.txt")
        print("\n".join(report(declared, read_pins(ROOT / "constraints.txt"), now)) or "  nothing changed")
        print(f"\nruff: {'passed' if lint.returncode == 0 else 'FAILED (new lint rules? see above)'}")
        print(f"pytest: exit {tests.returncode}, {len(failed)} failed")
        print("".join(f"  {test}\n" for test in failed), end="")
        passed = lint.returncode == 0 and tests.returncode == 0
        if passed and args.write_constraints:
            freeze = subprocess.run([str(python), "-m", "pip", "freeze", "--exclude-editable"],
                                    capture_output=True, text=True, check=True).stdout
            write_constraints(freeze)
            print("constraints.txt rewritten: raise the bounds in pyproject.toml to match, then run CI.")
        return 0 if passed else 1


def write_constraints(freeze: str) -> None:
    """constraints.txt: its header kept, then ``freeze`` without torch (README's command installs it first, a
    GPU user their own build) and without qwen."""
    path = ROOT / "constraints.txt"
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    pins = [line for line in freeze.splitlines()
            if line and not line.startswith("#") and canonical(line.split("==")[0]) not in ("torch", "qwen")]
    path.write_text("\n".join(header + sorted(pins, key=str.lower)) + "\n")


if __name__ == "__main__":
    sys.exit(main())
