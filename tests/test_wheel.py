"""The release as a user installs it: ``python -m build`` makes an sdist and a wheel (from that sdist), the wheel
goes into a fresh virtual environment (not ``-e``), and its console scripts, a chat through the Python API, a
kernel build and the server run from a folder outside the checkout.

The fresh environment takes qwen from the wheel alone; to stay fast and offline it borrows the dependencies
(torch, transformers, ...) from the environment running the tests through a ``.pth`` path line, which adds
that site-packages folder without running its ``.pth`` files, so the editable install's finder (which maps
``qwen`` to this checkout) is never installed there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import urllib.request
import zipfile
from pathlib import Path

import pytest

import qwen
from qwen.entry_points import DEFERRED_IMPORTS, SCRIPTS
from qwen.serve.process import free_port, wait_until_ok

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FILES = ("pyproject.toml", "README.md", "NOTICE", "CHANGELOG.md", "MANIFEST.in")
# The files the code opens at run time (besides its modules).
DATA = ["qwen/qwen.tiktoken", *(f"qwen/csrc/{p.name}" for p in sorted((ROOT / "qwen/csrc").glob("*.[ch]*"))),
        *(f"qwen/eval/prompts/{p.name}" for p in sorted((ROOT / "qwen/eval/prompts").iterdir()))]


def run(cmd: list, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """``python -m build`` on a copy of what the release is made from (a stale build/ folder or egg-info in the
    checkout cannot supply a file the configuration misses): the sdist, then the wheel built from it."""
    pytest.importorskip("build", reason="`build` is not installed (pip install build; it belongs in the dev extra)")
    base = tmp_path_factory.mktemp("release")
    source = base / "src"
    source.mkdir()
    for name in SOURCE_FILES:
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "qwen", source / "qwen", ignore=shutil.ignore_patterns("__pycache__"))
    # --no-isolation: setuptools comes from this environment (torch needs it), so the build needs no network.
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", base / "dist", source], os.environ, base)
    return base / "dist"


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> dict:
    """A fresh virtual environment with the wheel installed; ``env`` runs its programs with nothing of the
    checkout on the path (no PYTHONPATH, this environment's bin/ off PATH) and kernels built into a new folder."""
    base = tmp_path_factory.mktemp("venv")
    prefix = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", prefix], check=True, timeout=120)
    python = prefix / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    borrowed = dict.fromkeys(sysconfig.get_path(key) for key in ("purelib", "platlib"))
    (site / "_qwen_test_dependencies.pth").write_text("".join(f"{path}\n" for path in borrowed))
    (wheel,) = dist.glob("qwen-*.whl")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
        os.environ, base)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    outer_bin = Path(sys.prefix, "bin")
    env["PATH"] = os.pathsep.join([str(prefix / "bin"), *(p for p in env.get("PATH", "").split(os.pathsep)
                                                          if p and Path(p) != outer_bin)])
    env.update(VIRTUAL_ENV=str(prefix), PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1",
               TORCH_EXTENSIONS_DIR=str(base / "torch_extensions"))
    work = base / "work"  # the programs' working folder: outside the checkout
    work.mkdir()
    return {"prefix": prefix, "python": python, "bin": prefix / "bin", "env": env, "cwd": work}


@pytest.fixture(scope="module")
def tiny(venv) -> Path:
    """A tiny checkpoint written by the installed ``qwen-tiny``."""
    done = run([venv["bin"] / "qwen-tiny", "tiny-chat", "--max-new-tokens", "8"], venv["env"], venv["cwd"])
    assert "wrote a tiny random Qwen checkpoint" in done.stdout
    return venv["cwd"] / "tiny-chat"


def test_the_sdist_and_the_wheel_carry_the_code_and_its_data(dist):
    (sdist,) = dist.glob("qwen-*.tar.gz")
    (wheel,) = dist.glob("qwen-*.whl")
    version = qwen.__version__
    assert sdist.name == f"qwen-{version}.tar.gz" and wheel.name.startswith(f"qwen-{version}-py3-none-any")
    modules = [str(p.relative_to(ROOT)) for p in (ROOT / "qwen").rglob("*.py")]
    assert len(DATA) >= 6 and {"qwen/csrc/block_matvec.cpp", "qwen/eval/prompts/gsm8k_prompt.txt"} <= set(DATA)

    in_sdist = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    assert {*modules, *DATA, *SOURCE_FILES} <= in_sdist, sorted({*modules, *DATA, *SOURCE_FILES} - in_sdist)

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"qwen-{version}.dist-info"
        metadata = zf.read(f"{info}/METADATA").decode()
        scripts = zf.read(f"{info}/entry_points.txt").decode()
    assert {*modules, *DATA} <= names, sorted({*modules, *DATA} - names)
    assert f"\nVersion: {version}\n" in metadata
    # pyproject.toml's [project.scripts] is qwen.entry_points.SCRIPTS, and the wheel declares them
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert declared == {name: target for name, (target, _) in SCRIPTS.items()}
    for name, (target, _) in SCRIPTS.items():
        assert f"\n{name} = {target}\n" in scripts


def test_the_console_scripts_answer_help_in_the_fresh_environment(venv):
    """Every console script is installed; the front ends answer --help under their own name before torch and
    transformers are imported, as the root scripts do."""
    assert sorted(p.name for p in venv["bin"].glob("qwen-*")) == sorted(SCRIPTS)
    for name in sorted(DEFERRED_IMPORTS):
        done = run([venv["python"], "-X", "importtime", venv["bin"] / name, "--help"], venv["env"], venv["cwd"],
                   timeout=60)
        assert done.stdout.startswith(f"usage: {name} "), done.stdout[:200]
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
        assert "qwen" in imported and {"torch", "transformers"}.isdisjoint(imported), (name, sorted(imported))
    done = run([venv["bin"] / "qwen-export", "--help"], venv["env"], venv["cwd"], timeout=120)
    assert done.stdout.startswith("usage: qwen-export ")


CHAT = """
import importlib.metadata, json, sys
import qwen
from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
response, history = model.chat(tokenizer, "你好", history=None, do_sample=False)
print(json.dumps({"file": qwen.__file__, "version": qwen.__version__, "metadata": importlib.metadata.version("qwen"),
                  "tokenizer": type(tokenizer).__module__, "model": type(model).__module__,
                  "history": history, "editable": sorted(m for m in sys.modules if m.startswith("__editable__"))}))
"""


def test_a_chat_through_the_python_api_runs_the_installed_package(venv, tiny):
    done = run([venv["python"], "-c", CHAT, tiny], venv["env"], venv["cwd"])
    result = json.loads(done.stdout.splitlines()[-1])
    installed = Path(result["file"]).resolve()
    assert installed.is_relative_to(venv["prefix"].resolve()) and not installed.is_relative_to(ROOT), installed
    assert result["version"] == result["metadata"] == qwen.__version__
    assert (result["tokenizer"], result["model"]) == ("qwen.tokenizer", "qwen.modeling")
    assert result["editable"] == []
    ((query, reply),) = result["history"]
    assert query == "你好" and isinstance(reply, str)


def test_the_cpu_kernel_builds_from_the_installed_sources(venv):
    """``python -m qwen.cpu_kernels bf16`` compiles the wheel's copy of csrc/bf16_matvec.cpp into an empty
    $TORCH_EXTENSIONS_DIR (the smallest of the three kernels; each build is the same torch extension call)."""
    if not (shutil.which("c++") or os.environ.get("CXX")):
        pytest.skip("no C++ compiler (c++) to build qwen's CPU kernels with")
    done = run([venv["python"], "-m", "qwen.cpu_kernels", "bf16"], venv["env"], venv["cwd"], timeout=300)
    folder = Path(done.stdout.strip().splitlines()[-1].split(": ", 1)[1])
    assert folder.parent == Path(venv["env"]["TORCH_EXTENSIONS_DIR"]) and folder.name.startswith("qwen_bf16_matvec-")
    assert list(folder.glob("*.so")), sorted(p.name for p in folder.iterdir())


def test_the_installed_server_serves_a_checkpoint(venv, tiny):
    pytest.importorskip("uvicorn")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = venv["cwd"] / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(venv["bin"] / "qwen-serve"), "-c", str(tiny), "--server-name", "127.0.0.1",
                                 "--server-port", str(port)], cwd=venv["cwd"], env=venv["env"], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_until_ok(f"{url}/health", timeout=240, proc=proc, log=log)
        body = json.dumps({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = json.load(response)
        assert reply["model"] == "tiny-chat" and reply["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text()[-3000:]
