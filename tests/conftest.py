"""Shared fixtures: tiny random checkpoints in the exact original folder layout."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import qwen  # noqa: F401  (registers the Auto classes)
from qwen.tiny import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory) -> Path:
    """A 2-layer chat checkpoint (fp32 safetensors, remote-code stand-ins that raise on import)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """The same shape as a base (non-chat) model: chat_format raw."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-base"), chat=False)


@pytest.fixture(scope="session")
def tokenizer(tiny_chat):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat)


@pytest.fixture(scope="session")
def tiny_model(tiny_chat):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_chat).eval()


@pytest.fixture(scope="session")
def api_server(tiny_chat, tmp_path_factory):
    """``python openai_api.py`` serving the tiny chat checkpoint as model "tiny", shared by the tests that
    drive it with real clients (openai, LangChain, lm-eval); its log is ``api_server.log``."""
    from qwen.serve.process import ServerProcess

    log = tmp_path_factory.mktemp("api-server") / "server.log"
    with ServerProcess(tiny_chat, "--model-name", "tiny", command=[sys.executable, "openai_api.py"],
                       cwd=Path(__file__).resolve().parents[1], log=log) as server:
        yield server
