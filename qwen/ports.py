"""The front ends' listening port, checked before a model is loaded: a port that is taken ends the program
at once with one line naming the flag that changes it, not minutes later with a library's traceback."""

from __future__ import annotations

import argparse
import errno
import socket

API_PORT = 8000  # openai_api.py, as the original
WEB_PORT = 7860  # web_demo.py: gradio's usual port, so the web demo and the API server can run side by side


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, not {text!r}")
    return port


def _bind(host: str, port: int) -> None:
    """Bind and release ``host:port`` as a server would (SO_REUSEADDR, so a port in TIME_WAIT is free)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)


def port_problem(host: str, port: int, port_flag: str = "--server-port",
                 host_flag: str = "--server-name") -> str | None:
    """None when a server can listen on ``host:port``, else a one-line error naming the flag to change."""
    try:
        _bind(host, port)
        return None
    except socket.gaierror as exc:
        return f"error: cannot listen on {host!r}: {exc.strerror}. Give an address of this machine with {host_flag}."
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            hint = next((f" ({p} is free)" for p in range(port + 1, min(port + 50, 65536)) if _free(host, p)), "")
            return (f"error: port {port} on {host} is already in use (another server, or an earlier one still "
                    f"running). Choose another with {port_flag} PORT{hint}.")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return (f"error: no permission to listen on port {port} (below 1024 needs root). "
                    f"Choose another with {port_flag}.")
        return f"error: cannot listen on {host}:{port}: {exc.strerror}. Check {host_flag} and {port_flag}."


def _free(host: str, port: int) -> bool:
    try:
        _bind(host, port)
        return True
    except OSError:
        return False
