"""What a newcomer meets in the first hour, each checked for real on tiny checkpoints: None as the default
system prompt in batch_chat, no warnings on greedy chat or when fine-tuning starts, a mistyped folder that
fails at once with a message naming it, --demo's readable model name, the tiny checkpoint's short default
replies, the web page's temperature 0 as greedy decoding, and the generated folders git ignores.
(The terminal's ``:conf`` checks and its temperature 0 are tested in test_cli.py, through a real terminal.)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import GenerationConfig

from qwen.chat import DEFAULT_SYSTEM, batch_chat
from qwen.loading import DEMO_NAME, CheckpointNotFoundError, add_model_args, front_end_checkpoint, load_model
from qwen.tiny import TINY_MAX_NEW_TOKENS
from qwen.tiny import main as tiny_main

ROOT = Path(__file__).resolve().parents[1]
GREEDY = {"do_sample": False, "max_new_tokens": 6}


@contextlib.contextmanager
def transformers_messages() -> Iterator[list[str]]:
    """Messages that transformers logs (any level) and Python warnings raised, while the block runs.

    transformers says some things once per process (``warning_once``): that memory is cleared first, so an
    earlier test that triggered a message does not hide it here."""
    once = getattr(logging.Logger, "warning_once", None)
    if hasattr(once, "cache_clear"):
        once.cache_clear()
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, logger = Collect(level=logging.DEBUG), logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages += [str(w.message) for w in caught]
    finally:
        logger.removeHandler(handler)


# ----- 1. None as the default system prompt -------------------------------------------------------


def test_batch_chat_takes_none_as_the_default_system_prompt(tiny_model, tokenizer):
    queries = ["hello", "how are you?"]
    explicit = batch_chat(tiny_model, tokenizer, queries, systems=[DEFAULT_SYSTEM, "You are a pirate."], **GREEDY)
    assert batch_chat(tiny_model, tokenizer, queries, systems=None, **GREEDY)[0] == explicit[0]
    assert batch_chat(tiny_model, tokenizer, queries, systems=[None, "You are a pirate."], **GREEDY) == explicit
    assert tiny_model.chat(tokenizer, "hello", history=None, system=None, **GREEDY) == explicit[0]


# ----- 4. no warnings on every call ---------------------------------------------------------------


def test_greedy_chat_does_not_warn_about_the_configs_sampling_flags(tiny_model, tokenizer):
    """The -Chat generation config samples (top_p 0.8, top_k 0); a greedy call must not make transformers
    say "The following generation flags are not valid and may be ignored: ['top_p', 'top_k']"."""
    greedy_config = copy.deepcopy(tiny_model.generation_config)
    greedy_config.do_sample = False  # what the terminal's :conf do_sample=false / temperature=0 hands over
    with transformers_messages() as messages:
        tiny_model.chat(tokenizer, "hello", **GREEDY)
        batch_chat(tiny_model, tokenizer, ["a", "b"], **GREEDY)
        list(tiny_model.chat_stream(tokenizer, "hello", **GREEDY))
        tiny_model.chat(tokenizer, "hello", generation_config=greedy_config, max_new_tokens=3)
    assert not messages, messages
    assert greedy_config.top_p == 0.8  # the caller's config is left as it was


def test_greedy_results_are_unchanged_by_the_neutral_flags(tiny_model, tokenizer):
    """Greedy decoding never read top_p/top_k: the reply is the argmax path either way."""
    plain = tiny_model.chat(tokenizer, "hello", **GREEDY)[0]
    assert tiny_model.chat(tokenizer, "hello", top_k=50, top_p=1.0, **GREEDY)[0] == plain


# Run in a fresh Python: records every call of kernels.get_kernel (bitsandbytes' way to fetch a Hub kernel),
# imports what a fine-tune imports, and prints the calls.
HUB_KERNEL_PROBE = """
import kernels
calls = []
real = kernels.get_kernel
kernels.get_kernel = lambda *a, **k: calls.append(a) or real(*a, **k)
{first}
from transformers import Trainer
import bitsandbytes, peft
print("get_kernel calls:", calls)
"""


def test_a_fine_tune_fetches_no_hub_kernel_and_prints_no_notice():
    """bitsandbytes, imported on an AVX512-BF16 CPU, asks the Hub for a 4-bit kernel through ``kernels``
    (installed by transformers 5.25) and warns when that fails; qwen.finetune imports it with ``kernels``
    hidden, so nothing is fetched and nothing is printed."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("kernels")
    notice = "Failed to load CPU gemm_4bit_forward from kernels-community"

    codes = [HUB_KERNEL_PROBE.format(first=first) for first in ("", "import qwen.finetune")]
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for code in codes]
    (plain_out, plain_err), (qwen_out, qwen_err) = (proc.communicate(timeout=180) for proc in procs)
    assert [proc.returncode for proc in procs] == [0, 0], (plain_err, qwen_err)
    assert "get_kernel calls: []" in qwen_out, qwen_out
    assert notice not in qwen_err and "kernels" not in qwen_err, qwen_err
    if "get_kernel calls: []" in plain_out:
        pytest.skip("bitsandbytes asks for no Hub kernel on this CPU (no AVX512-BF16): the control shows nothing")
    assert notice in plain_err  # without qwen.finetune it asks the Hub and warns: the probe can see it


def test_the_kernels_filter_keeps_other_bitsandbytes_failures():
    import qwen.finetune  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Collect()
    logger.addHandler(handler)
    try:
        message = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ..."
        missing = ModuleNotFoundError("No module named 'kernels'", name="kernels")
        logger.warning(message, missing)
        logger.warning(message, OSError("the Hub could not be reached"))
        logger.warning(message, ModuleNotFoundError("No module named 'torch_xyz'", name="torch_xyz"))
    finally:
        logger.removeHandler(handler)
    assert len(seen) == 2 and "Hub could not be reached" in seen[0] and "torch_xyz" in seen[1], seen


# ----- 5. a mistyped folder fails at once ---------------------------------------------------------


def model_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("-c", "--checkpoint-path")
    parser.add_argument("--demo", action="store_true")
    add_model_args(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("path", ["./Qwen-7B-Chta", "Qwen-7B-Chta", "Qwen/Qwen-7B-Chta", "~/no-such-qwen-folder",
                                  "models/Qwen-7B-Chat"])
def test_a_missing_folder_fails_at_once_naming_it(path, tmp_path, monkeypatch):
    """transformers reads a missing ``name`` or ``org/name`` as a Hub id and, offline, retries the Hub for
    about 45 s per file; ``./name`` fails fast but says "Repo id must use alphanumeric chars"."""
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    with pytest.raises(CheckpointNotFoundError) as error:
        load_model(path, model_args())
    assert time.monotonic() - started < 5
    assert repr(path) in str(error.value) and "does not exist" in str(error.value), error.value


def test_a_near_miss_names_the_folder_it_probably_meant(tiny_chat, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_chat, tmp_path / "Qwen-7B-Chat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match=r"Did you mean 'Qwen-7B-Chat'\?"):
        load_model("Qwen-7B-Chta", model_args())
    with pytest.raises(CheckpointNotFoundError, match="'empty' is a folder without config.json"):
        load_model("empty", model_args())
    model, _ = load_model("Qwen-7B-Chat", model_args())  # the right name loads
    assert model.config.model_type == "qwen"


def test_the_front_ends_exit_with_one_line_for_a_missing_folder(tmp_path):
    with pytest.raises(SystemExit) as done, front_end_checkpoint(model_args("-c", str(tmp_path / "nope"))):
        pass
    assert str(done.value.code).startswith(f"error: checkpoint folder '{tmp_path / 'nope'}' does not exist")
    assert "--demo" in str(done.value.code)


# ----- 3. --demo's model name ---------------------------------------------------------------------


def test_demo_checkpoint_has_a_readable_name_and_is_removed_afterwards():
    for argv in (["--demo"], []):
        with front_end_checkpoint(model_args(*argv)) as (path, is_demo):
            assert is_demo and path.name == DEMO_NAME == "tiny-random-qwen"
            assert (path / "config.json").is_file()
        assert not path.exists()


# ----- 6. short default replies on tiny checkpoints -----------------------------------------------


def test_tiny_checkpoints_default_to_short_replies(tiny_chat, tiny_base, tiny_model, tokenizer, tmp_path):
    for folder in (tiny_chat, tiny_base):
        assert GenerationConfig.from_pretrained(folder).max_new_tokens == TINY_MAX_NEW_TOKENS == 32
    # The README's snippet with the folder's own settings (sampling, no max_new_tokens) stays short. (Random
    # text decoded and encoded again may split into a few more tokens than were generated.)
    response, _ = tiny_model.chat(tokenizer, "你好", history=None)
    assert 0 < len(tokenizer.encode(response)) < 2 * TINY_MAX_NEW_TOKENS
    tiny_main([str(tmp_path / "t"), "--max-new-tokens", "7"])  # python -m qwen.tiny DIR --max-new-tokens 7
    assert GenerationConfig.from_pretrained(tmp_path / "t").max_new_tokens == 7


# ----- 2. the web page's temperature 0 is greedy, as in the terminal ------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_web_temperature_zero_is_greedy_and_quiet(tiny_model, tokenizer):
    """Through the page's own /generate endpoint (gradio_client: no browser needed)."""
    pytest.importorskip("gradio")
    gradio_client = pytest.importorskip("gradio_client")
    from qwen.apps.web import build_ui

    demo = build_ui(tiny_model, tokenizer)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        with transformers_messages() as messages:
            chat, _ = client.predict("hello", DEFAULT_SYSTEM, 0, 0.8, 6, api_name="/generate")
        assert not [m for m in messages if "generation flags" in m], messages
    finally:
        demo.close()
    shown = chat[-1]["content"]
    shown = "".join(part["text"] for part in shown) if isinstance(shown, list) else shown
    assert shown == tiny_model.chat(tokenizer, "hello", **GREEDY)[0]


# ----- 7. generated folders are ignored -----------------------------------------------------------


@pytest.mark.parametrize("path", ["merged-model/model.safetensors", "outs/mmlu_eval_result/x.csv",
                                  "outs_chat/gsm8k_eval_result/x.csv", "data/mmlu/data/dev/x.csv",
                                  "gsm8k_res.jsonl", "HumanEval_res.jsonl", "example_func_call_train_samples.json",
                                  "output_qwen/adapter_model.safetensors", "tiny-qwen/config.json", "mmlu.json"])
def test_what_the_readme_and_examples_write_is_ignored_by_git(path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
    assert done.returncode == 0, f"{path} is not ignored"


# ----- 8. the front ends: --help at once, --demo everywhere, ports that do not clash ----------------


@pytest.mark.parametrize("script", ["openai_api.py", "web_demo.py", "cli_demo.py"])
def test_help_answers_without_importing_torch(script):
    """--help (and a mistyped flag) is answered before torch and transformers are imported (seconds)."""
    done = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "qwen" in imported and {"torch", "transformers"}.isdisjoint(imported), sorted(imported)


def test_the_web_demo_and_the_api_server_have_different_default_ports():
    from qwen.apps.web import parse_args as web_args
    from qwen.serve.main import parse_args as api_args

    assert (api_args([]).server_port, web_args([]).server_port) == (8000, 7860)


def test_a_taken_port_is_one_line_naming_the_flag_in_every_front_end():
    """A real API server (--demo) holds a port; the web demo and a second server asked for the same port end
    at once with one line that names --server-port, before loading a model."""
    pytest.importorskip("uvicorn")
    openai = pytest.importorskip("openai")
    from qwen.serve.process import ServerProcess

    with ServerProcess(None, "--demo", command=[sys.executable, "openai_api.py"], cwd=ROOT) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        assert [m.id for m in client.models.list()] == [DEMO_NAME]
        reply = client.chat.completions.create(model=DEMO_NAME, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3, temperature=0)
        assert reply.choices[0].finish_reason in ("length", "stop")
        for script in ("web_demo.py", "openai_api.py"):
            done = subprocess.run([sys.executable, script, "--demo", "--server-port", str(server.port)], cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 1, (script, done.stderr)
            assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
            assert f"port {server.port} on 127.0.0.1 is already in use" in done.stderr
            assert "--server-port" in done.stderr, done.stderr
