"""Build llama.cpp from the llama-cpp-python sdist's ``vendor/llama.cpp``, once, into a cache folder.

Shared by ``tests/test_export_llamacpp.py`` (the shared library, driven through the sdist's ctypes bindings) and
``bench/llamacpp.py`` (the ``llama-bench``, ``llama-batched-bench`` and ``llama-quantize`` tools), and
``bench/chat_ttft.py`` (``llama-server``, built into the same folder as the tools: ggml is reused). The sdist is
the one source of llama.cpp that pip can fetch here (no GitHub access is needed). Each set of cmake flags builds
into its own folder under ``~/.cache/qwen-llamacpp/<version>/``, named by a hash of the flags, so a cached build
made with other flags is never taken; a build is renamed into place only once it has finished.

Callers tell two failures apart: :class:`LlamaCppUnavailable` (no cmake or compiler, or the sdist cannot be
downloaded: skip, with the message) and :class:`LlamaCppBuildError` (the build itself failed: a real error).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

VERSION = "0.3.36"
CACHE = Path("~/.cache/qwen-llamacpp").expanduser() / VERSION
SDIST_DIR = CACHE / f"llama_cpp_python-{VERSION}"
SOURCE = SDIST_DIR / "vendor" / "llama.cpp"
BINDINGS = SDIST_DIR / "llama_cpp"  # the sdist's ctypes bindings package
TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize", "llama-perplexity")


class LlamaCppUnavailable(RuntimeError):
    """llama.cpp cannot be built on this machine (no cmake or compiler, no network for the sdist)."""


class LlamaCppBuildError(RuntimeError):
    """cmake ran and failed: worth a report, not a silent skip."""


def cmake_flags(tools: bool) -> list[str]:
    """The cmake flags of a shared-library build (``tools=False``, what the export tests load) or of a static
    build of the command-line tools (``tools=True``). Static tools keep working after the build folder is
    renamed into place (shared ones would look for their libraries in the temporary folder)."""
    if tools:
        flags = ["-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                 "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_APP=OFF",
                 "-DLLAMA_BUILD_MTMD=OFF", "-DCMAKE_BUILD_TYPE=Release"]
    else:
        # The order is part of the build folder's name: keep it, or every cached library build is redone.
        flags = ["-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                 "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_MTMD=OFF",
                 "-DCMAKE_BUILD_TYPE=Release"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # Some VMs advertise AMX in CPUID without the kernel granting its tile state: a native build then dies
        # with SIGILL in q8_0 matrix products (seen here). AMX only speeds up large batches; leave it out.
        no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        flags += [f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"]
    return flags


def build_dir(flags: list[str]) -> Path:
    """One build folder per set of flags."""
    return CACHE / f"build-{hashlib.sha1(' '.join(flags).encode()).hexdigest()[:10]}"


def library_dir() -> Path:
    """Where the shared-library build keeps libllama.so (built or not)."""
    return build_dir(cmake_flags(tools=False)) / "bin"


def tool_path(name: str) -> Path:
    """Where the tools build keeps the executable ``name`` (built or not)."""
    return build_dir(cmake_flags(tools=True)) / "bin" / name


def _announce_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_sdist() -> Path:
    """Download and unpack the sdist unless the cache has it; returns llama.cpp's source folder."""
    if (SOURCE / "CMakeLists.txt").is_file():
        return SOURCE
    CACHE.mkdir(parents=True, exist_ok=True)
    download = CACHE / "sdist"
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                           f"llama-cpp-python=={VERSION}", "-d", str(download)],
                          capture_output=True, text=True, timeout=900)
    archives = sorted(download.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if done.returncode != 0 or not archives:
        reason = (done.stderr.strip().splitlines() or [f"pip exited with {done.returncode}"])[-1]
        raise LlamaCppUnavailable(f"cannot download the llama-cpp-python {VERSION} sdist with pip (no network?): "
                                  f"{reason}")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(CACHE, filter="data")
    return SOURCE


def ensure_build(tools: bool, targets: list[str] | tuple[str, ...],
                 announce: Callable[[str], None] = _announce_to_stderr) -> Path:
    """The build folder with ``targets`` built (``tools``: see :func:`cmake_flags`), building it first if the
    cache lacks any of them. ``announce`` hears about a build before it starts: minutes of silence would look
    like a hang."""
    flags = cmake_flags(tools)
    build = build_dir(flags)
    if all((build / "bin" / name).exists() for name in _outputs(targets)):
        return build
    if not (shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++"))):
        raise LlamaCppUnavailable("building llama.cpp needs cmake and a C++ compiler (e.g. apt-get install cmake g++)")
    source = ensure_sdist()
    announce(f"building llama.cpp ({', '.join(targets)}) from the llama-cpp-python {VERSION} sdist into {build} "
             f"once, a few minutes")
    partial = build.with_name(build.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if build.exists():  # an earlier build of other targets with the same flags: add to it (ggml is reused)
        os.replace(build, partial)
    for cmd in (["cmake", "-S", str(source), "-B", str(partial), *flags],
                ["cmake", "--build", str(partial), f"-j{os.cpu_count() or 2}", "--target", *targets]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise LlamaCppBuildError(f"llama.cpp build failed: {' '.join(cmd)}\n{(done.stdout + done.stderr)[-3000:]}")
    os.replace(partial, build)  # only a finished build is ever taken from the cache
    return build


def build_or_exit(targets: list[str] | tuple[str, ...], announce: Callable[[str], None] = _announce_to_stderr
                  ) -> Path | None:
    """The benches' way in: the tools build with ``targets``; None (after printing why, so the bench exits 0)
    where llama.cpp cannot be built here, and a one-line exit where the build itself failed."""
    start = time.perf_counter()
    try:
        build = ensure_build(tools=True, targets=targets, announce=announce)
    except LlamaCppUnavailable as exc:
        print(f"skipped: {exc}")
        return None
    except LlamaCppBuildError as exc:
        sys.exit(str(exc))
    announce(f"llama.cpp ({', '.join(targets)}) ready in {build} ({time.perf_counter() - start:.0f} s)")
    return build


def _outputs(targets: list[str] | tuple[str, ...]) -> list[str]:
    """The files in ``bin/`` that show a target was built (the ``llama`` target is the shared library)."""
    return ["libllama.so" if target == "llama" else target for target in targets]
