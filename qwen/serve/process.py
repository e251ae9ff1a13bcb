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
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Start the server for ``checkpoint`` with extra command-line ``args`` (see ``openai_api.py -h``).

    ``command`` replaces ``python -m qwen.serve.main`` (e.g. ``[sys.executable, "openai_api.py"]``),
    ``cwd`` is the child's working folder, ``log`` keeps its output in that file (default: a
    temporary file removed by ``stop``)."""

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *args: str,
        command: list[str] | None = None,
        cwd: str | os.PathLike | None = None,
        log: str | os.PathLike | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._owns_log = log is None
        self.log = Path(log) if log is not None else Path(tempfile.mkstemp(prefix="qwen-server-", suffix=".log")[1])
        self._log_file = self.log.open("w")
        cmd = [*(command or [sys.executable, "-m", "qwen.serve.main"]), "-c", str(checkpoint),
               "--server-name", "127.0.0.1", "--server-port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 300) -> ServerProcess:
        """Block until ``/health`` answers 200; raise RuntimeError with the log's tail if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not become healthy within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-chars:]

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
