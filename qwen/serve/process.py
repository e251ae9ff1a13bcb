"""The API server in a child process, for notebooks, scripts, benchmarks and tests.

    with ServerProcess("Qwen-1_8B-Chat", "--max-batch-size", "16") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")

The child is ``python -m qwen.serve.main`` on 127.0.0.1 and a free port; its output goes to a log
file whose tail is shown if it exits or never becomes healthy.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ok(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200. RuntimeError, with the end of ``log``, if ``proc`` exits
    first or ``timeout`` seconds pass."""
    def tail() -> str:
        return log.read_text(errors="replace")[-3000:] if log is not None else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}:\n{tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:  # refused while starting (URLError is an OSError), or a slow answer
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s:\n{tail()}")


class ServerProcess:
    """Start the server for ``checkpoint`` (None: ``args`` say what to serve, e.g. ``--demo``) with extra
    command-line ``args`` (see ``openai_api.py -h``).

    ``command`` replaces ``python -m qwen.serve.main`` (e.g. ``[sys.executable, "openai_api.py"]``),
    ``cwd`` is the child's working folder, ``log`` keeps its output in that file (default: a
    temporary file removed by ``stop``)."""

    def __init__(
        self,
        checkpoint: str | os.PathLike | None,
        *args: str,
        command: list[str] | None = None,
        cwd: str | os.PathLike | None = None,
        log: str | os.PathLike | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._owns_log = log is None
        if log is None:
            self._log_file = tempfile.NamedTemporaryFile("w", prefix="qwen-server-", suffix=".log", delete=False)
            self.log = Path(self._log_file.name)
        else:
            self.log = Path(log)
            self._log_file = self.log.open("w")
        model = ["-c", str(checkpoint)] if checkpoint is not None else []  # None: args say what (--demo)
        cmd = [*(command or [sys.executable, "-m", "qwen.serve.main"]), *model,
               "--server-name", "127.0.0.1", "--server-port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 300) -> ServerProcess:
        """Block until ``/health`` answers 200; raise RuntimeError with the log's tail if it never does."""
        wait_until_ok(f"{self.url}/health", timeout, self.proc, self.log)
        return self

    def stop(self) -> None:
        """Terminate the child (kill it after 15 s) and close, or remove, its log."""
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()
        if self._owns_log:
            self.log.unlink(missing_ok=True)

    def __enter__(self) -> ServerProcess:
        try:
            return self.wait()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
