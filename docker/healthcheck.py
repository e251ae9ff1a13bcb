"""Docker HEALTHCHECK for the qwen image: exit 0 when the program in the container answers HTTP, else 1.

Python rather than curl because the slim base images carry neither curl nor wget. It asks
``$QWEN_HEALTH_URL``, by default the API server's ``/health`` on ``$QWEN_PORT``; the web demo's run
script points it at the page's root instead, since gradio has no ``/health``.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def health_url() -> str:
    """The URL to probe: the explicit one, else the API server's health route on the container's port."""
    port = os.environ.get("QWEN_PORT", "8000")
    return os.environ.get("QWEN_HEALTH_URL") or f"http://127.0.0.1:{port}/health"


def main() -> int:
    """0 for a 2xx answer within the timeout, 1 for anything else (Docker counts 1 as a failed check)."""
    url = health_url()
    try:
        with urllib.request.urlopen(url, timeout=4) as response:  # noqa: S310 (a fixed local URL)
            ok = 200 <= response.status < 300
    except (OSError, urllib.error.URLError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
