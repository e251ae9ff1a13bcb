"""``PeakRSS``: the highest resident memory of this process while a block runs, for the bench scripts."""

from __future__ import annotations

import os
import threading


class PeakRSS:
    """Highest resident memory of this process while the block runs, sampled every ``interval`` s
    by a thread (``ru_maxrss`` cannot do this: it never goes down, so it cannot measure one block)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval

    def __enter__(self) -> PeakRSS:
        self.peak, self._stop = self.rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())
