"""The OpenAI-compatible API server: ``python openai_api.py -c CHECKPOINT`` or ``create_app``."""

from .app import create_app

__all__ = ["create_app"]
