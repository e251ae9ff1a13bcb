"""Graceful shutdown: what SIGTERM (``docker stop``, Kubernetes) and Ctrl-C do to a serving process.

The first signal starts draining: the app answers new requests (and ``/health``) with 503 and Retry-After, so a
load balancer moves on, while the requests already in the engine run to their end, for at most
``shutdown_timeout`` seconds; any still running then are stopped and end with finish_reason "abort". Every
stream thus ends with a finish reason and ``[DONE]``; then uvicorn closes the connections and the process exits
0. A second signal stops at once (uvicorn's forced exit).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from ..engine import Engine

logger = logging.getLogger("qwen.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM/SIGINT drains the engine before uvicorn shuts down."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, engine: Engine, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.app, self.engine, self.shutdown_timeout = app, engine, shutdown_timeout
        self.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's own: it re-raises a handled signal once it has shut down, and a process that dies of
        # SIGTERM exits 143, not 0.
        if self.draining:
            logger.warning("second signal: stopping now")
            self.should_exit = self.force_exit = True
            return
        self.draining = True
        self.app.state.draining = True
        running = len(self.engine.unfinished())
        logger.info("%s: finishing %d running requests (at most %g s; new ones get 503), then exiting; "
                    "signal again to stop at once", signal.Signals(sig).name, running, self.shutdown_timeout)
        threading.Thread(target=self._drain, name="qwen-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        while self.engine.unfinished() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self.engine.unfinished()
        if left:
            logger.warning('shutdown timeout: stopping %d requests (finish_reason "abort")', len(left))
            for seq in left:
                self.engine.cancel(seq)
            while self.engine.unfinished() and time.monotonic() < deadline + 5:
                time.sleep(0.05)
        self.should_exit = True
