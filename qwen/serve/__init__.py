"""The OpenAI-compatible API server: ``python openai_api.py -c CHECKPOINT`` or ``create_app``."""

__all__ = ["create_app"]


def __getattr__(name: str):
    """``create_app``, imported on first use: ``openai_api.py --help`` needs neither torch nor FastAPI."""
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'qwen.serve' has no attribute {name!r}")
