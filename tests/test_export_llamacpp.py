"""llama.cpp itself loads and runs GGUF files from ``python -m qwen.export gguf`` (marked ``llamacpp``: ``pytest -m
llamacpp`` runs them alone; they are part of the default run).

llama.cpp is built from the llama-cpp-python sdist (its ``vendor/llama.cpp``) as a shared library, once, into
``~/.cache/qwen-llamacpp/<version>/build-<hash of the flags>`` (2.6 min on two cores; the helpers are
``bench/llamacpp_build.py``, shared with ``bench/llamacpp.py``), and driven through the sdist's own ctypes
bindings in a subprocess. Without cmake and a C++ compiler, or without a network to download the sdist,
the tests are skipped with a message saying which.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from qwen.export import export_gguf
from qwen.tiny import make_tiny_checkpoint
from qwen.tokenizer import QWenTokenizer

# The build helpers live beside the benchmark that also builds llama.cpp (bench/llamacpp.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import llamacpp_build  # noqa: E402

pytestmark = pytest.mark.llamacpp

PROMPTS = ["Hello, world! The capital of France is", "你好，请介绍一下你自己。",
           "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
           "<|im_start|>assistant\n"]
NEW_TOKENS = 16

# Runs in a subprocess: the sdist's ctypes bindings (llama_cpp/llama_cpp.py) on the library built here. The
# package's __init__ (which needs diskcache and more) is bypassed with a namespace stand-in.
RUNNER = r"""
import importlib, json, os, sys, types
bindings, lib_dir, model_path, n_new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
prompts = json.loads(sys.argv[5])
os.environ["LLAMA_CPP_LIB_PATH"] = lib_dir
package = types.ModuleType("llama_cpp")
package.__path__ = [bindings]
sys.modules["llama_cpp"] = package
ll = importlib.import_module("llama_cpp.llama_cpp")
ll.llama_backend_init()
model = ll.llama_model_load_from_file(model_path.encode(), ll.llama_model_default_params())
if not model:
    sys.exit("llama.cpp could not load " + model_path)
vocab = ll.llama_model_get_vocab(model)
n_vocab = ll.llama_vocab_n_tokens(vocab)
results = []
for prompt in prompts:
    params = ll.llama_context_default_params()
    params.n_ctx = params.n_batch = 256
    params.n_threads = params.n_threads_batch = 2
    ctx = ll.llama_init_from_model(model, params)
    data = prompt.encode()
    buf = (ll.llama_token * 512)()
    n = ll.llama_tokenize(vocab, data, len(data), buf, 512, True, True)  # add_special (BOS if asked), parse_special
    ids, greedy, feed = list(buf[:n]), [], list(buf[:n])
    for _ in range(n_new):
        batch = (ll.llama_token * len(feed))(*feed)
        assert ll.llama_decode(ctx, ll.llama_batch_get_one(batch, len(feed))) == 0
        logits = ll.llama_get_logits_ith(ctx, -1)
        best = max(range(n_vocab), key=lambda j: logits[j])
        greedy.append(best)
        feed = [best]
    ll.llama_free(ctx)
    results.append({"ids": ids, "greedy": greedy})
print(json.dumps({"n_vocab": n_vocab, "results": results}))
"""


def _announce(config: pytest.Config, message: str) -> None:
    """Print past pytest's output capture: a build of minutes should not look like a hang."""
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n[qwen llamacpp tests] {message}", flush=True)


@pytest.fixture(scope="module")
def llama_cpp(pytestconfig) -> tuple[Path, Path]:
    """(the sdist's bindings package folder, the folder of libllama.so)."""
    try:
        build = llamacpp_build.ensure_build(tools=False, targets=["llama"],
                                            announce=lambda message: _announce(pytestconfig, message))
    except llamacpp_build.LlamaCppUnavailable as exc:
        pytest.skip(str(exc))
    except llamacpp_build.LlamaCppBuildError as exc:
        pytest.fail(str(exc))
    return llamacpp_build.BINDINGS, build / "bin"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llamacpp") / "tiny-chat")


def run_llama_cpp(llama_cpp: tuple[Path, Path], gguf: Path) -> list[dict]:
    bindings, lib = llama_cpp
    # the build was renamed after linking, so the libraries find each other through the loader's path
    paths = [str(lib), os.environ.get("LD_LIBRARY_PATH")]
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(p for p in paths if p)}
    done = subprocess.run([sys.executable, "-c", RUNNER, str(bindings), str(lib), str(gguf), str(NEW_TOKENS),
                           json.dumps(PROMPTS)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["n_vocab"] == 151936
    return out["results"]


def ours_greedy(model, ids: list[int]) -> list[int]:
    x = torch.tensor([ids])
    y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW_TOKENS,
                       repetition_penalty=1.0, eos_token_id=None, pad_token_id=151643)
    return y[0, len(ids):].tolist()


def test_f32_gguf_tokens_and_greedy_generation_equal_ours(llama_cpp, tiny, tmp_path):
    path = tmp_path / "tiny-f32.gguf"
    export_gguf(tiny, path, outtype="f32")
    results = run_llama_cpp(llama_cpp, path)
    tokenizer = QWenTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result["ids"] == tokenizer.encode(prompt), prompt  # no BOS, special tokens parsed
        assert result["greedy"] == ours_greedy(model, result["ids"]), prompt


@pytest.mark.parametrize("outtype", ["bf16", "q8_0"])
def test_bf16_and_q8_0_gguf_run(llama_cpp, tiny, tmp_path, outtype):
    """Rounded weights: llama.cpp runs them; its first greedy token matches ours on the same rounded weights
    (bf16) or ours in fp32 (q8_0 keeps 8 bits per weight) on most prompts."""
    path = tmp_path / f"tiny-{outtype}.gguf"
    export_gguf(tiny, path, outtype=outtype)
    results = run_llama_cpp(llama_cpp, path)
    tokenizer = QWenTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    if outtype == "bf16":
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.copy_(p.to(torch.bfloat16).float())
    agree = 0
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result["ids"] == tokenizer.encode(prompt)
        assert len(result["greedy"]) == NEW_TOKENS and all(0 <= t < 151936 for t in result["greedy"])
        agree += result["greedy"][0] == ours_greedy(model, result["ids"])[0]
    assert agree >= len(PROMPTS) - 1
