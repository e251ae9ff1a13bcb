"""Interactive front ends: the terminal chat (``cli``) and the browser chat (``web``)."""

from __future__ import annotations

from typing import Any


def sampling_settings(temperature: float, **sampling: Any) -> dict[str, Any]:
    """Generation settings for a front end's temperature, where 0 means greedy decoding (the terminal's
    ``:conf temperature=0`` and the web page's slider agree). ``sampling`` (e.g. ``top_p``) is kept only
    when sampling: greedy decoding ignores it."""
    if temperature < 0:
        raise ValueError(f"temperature must be 0 (greedy) or more, not {temperature}")
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(temperature), **sampling}
