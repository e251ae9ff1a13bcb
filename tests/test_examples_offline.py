"""The offline examples, run as a user runs them: the tokenizer showcase's snippets, vocabulary expansion
(add_merges.py with the spec's example), function-calling fine-tuning samples (written, then trained on
for one step), and auto_comments.py (its split/merge helpers, then the script on a tiny chat model,
locally and through the API server)."""

from __future__ import annotations

import ast
import base64
import importlib.util
import json
import linecache
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from qwen import QWenTokenizer
from qwen.finetune_data import load_conversations
from qwen.serve.process import ServerProcess
from qwen.serve.prompting import build_chat_prompt
from qwen.serve.protocol import ChatCompletionRequest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# Spec 3.1: the expected merges of examples/qwen_extra_vocab.txt.
EXPECTED_MERGES = {"一只猫": 151851, "只猫": 151852, "是一只猫": 151853, "我是一只猫": 151854, "你是一只猫": 151855,
                   "他是一只猫": 151856}


def load_example(name: str):
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args, cwd: Path = ROOT, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[:2]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_extra_vocab(path: Path) -> dict[str, int]:
    pairs = (line.split() for line in path.read_text().splitlines())
    return {base64.b64decode(token).decode(): int(rank) for token, rank in pairs}


# ----- tokenizer_showcase.md ----------------------------------------------------------------------


def test_tokenizer_showcase_snippets_run_in_order_and_hold_the_spec_vectors(monkeypatch, capsys):
    text = (EXAMPLES / "tokenizer_showcase.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    code = "".join(blocks)
    # The spec's vectors are asserted by the snippets themselves.
    for vector in ("[1350, 11146, 91, 8691, 723, 427, 91, 79865]", "[1350, 492, 151643, 863, 151643]",
                   "[35946, 99639, 91680, 100472]", "[99639, 91680, 100472]",
                   "[151644, 1350, 492, 151646, 863, 151645, 151643]", "151850", "151857", "[151854]", "[151853]"):
        assert f"== {vector}\n" in code, vector
    monkeypatch.chdir(ROOT)  # the page runs examples/add_merges.py from the repository root
    namespace: dict = {}
    for i, block in enumerate(blocks):
        name = f"tokenizer_showcase.md python block {i + 1}"
        linecache.cache[name] = (len(block), None, block.splitlines(keepends=True), name)  # tracebacks show it
        exec(compile(block, name, "exec"), namespace)
    assert len(blocks) >= 9
    assert "[1350, 11146, 91, 8691, 723, 427, 91, 79865]" in capsys.readouterr().out


# ----- add_merges.py + qwen_extra_vocab.txt -------------------------------------------------------


def test_example_input_has_the_six_crlf_lines_of_the_spec():
    data = (EXAMPLES / "qwen_extra_vocab.txt").read_bytes()
    assert data.count(b"\r\n") == 6 and data.count(b"\n") == 6
    lines = data.decode().split("\r\n")[:-1]
    assert [tuple(line.split("\t")) for line in lines] == [
        ("我是一只猫", "20"), ("你是一只猫", "10"), ("他是一只猫", "5"), ("一只", "200"), ("一只猫", "100"),
        ("夸张的 比喻手法", "20"),
    ]


def test_add_merges_reproduces_the_spec_example_and_the_tokenizer_loads_it(tmp_path, tiny_chat):
    out = tmp_path / "qwen_extra.tiktoken"
    proc = run(EXAMPLES / "add_merges.py", EXAMPLES / "qwen_extra_vocab.txt", out)  # the bundled vocab
    assert read_extra_vocab(out) == EXPECTED_MERGES
    assert [line.split()[1] for line in out.read_text().splitlines()] == [str(i) for i in range(151851, 151857)]
    assert "skipped '一只': it is already a token (id 102292)" in proc.stderr
    assert "skipped '夸张的 比喻手法': the pre-tokenizer splits it" in proc.stderr

    for tokenizer in (QWenTokenizer(extra_vocab_file=out),
                      AutoTokenizer.from_pretrained(tiny_chat, extra_vocab_file=out)):
        assert len(tokenizer) == 151857
        assert tokenizer.encode("我是一只猫") == [151854] and tokenizer.encode("是一只猫") == [151853]
        for word, token_id in EXPECTED_MERGES.items():
            assert tokenizer.encode(word) == [token_id]
            assert tokenizer.convert_ids_to_tokens(token_id) == word.encode()
        assert tokenizer.encode("一只") == [102292]  # the base vocabulary is untouched

    # An explicit vocabulary path and --start_id; the same words, ids moved.
    moved = tmp_path / "moved.tiktoken"
    load_example("add_merges").main([str(EXAMPLES / "qwen_extra_vocab.txt"), str(moved),
                                     str(ROOT / "qwen" / "qwen.tiktoken"), "--start_id", "151900"])
    assert read_extra_vocab(moved) == {word: i + 49 for word, i in EXPECTED_MERGES.items()}


def test_learned_merges_make_every_word_one_token_whatever_the_input_order(tmp_path):
    add_merges = load_example("add_merges")
    base = QWenTokenizer()
    words = {"Qwenification": 7, " Qwenification": 3, "tokenizerless": 5, "猫猫猫猫猫": 4, "反向传播算法": 9,
             "Ünïcödé": 2, "deeeeeeep": 6}
    rng = random.Random(0)  # and 300 random words that share many pieces
    pieces = ["一只", "猫", "是", "深度", "学习", "模型", "Qw", "en", "ization"]
    while len(words) < 307:
        word = "".join(rng.choices(pieces[:6], k=rng.randint(2, 5))) if rng.random() < 0.7 else (
            "".join(rng.choices(pieces[6:], k=rng.randint(2, 4))))
        words.setdefault(word, rng.randint(1, 50))
    ranks = base.mergeable_ranks
    usable = add_merges.usable_words(words, ranks)
    words = {word: freq for word, freq in words.items() if word.encode() in usable}  # not single tokens already
    assert len(words) > 250
    new = add_merges.learn_merges(usable, ranks, 151851)
    assert sorted(new.values()) == list(range(151851, 151851 + len(new)))
    assert new == add_merges.learn_merges(dict(reversed(list(usable.items()))), ranks, 151851)
    path = tmp_path / "extra.tiktoken"
    add_merges.write_extra_vocab(new, path)
    expanded = QWenTokenizer(extra_vocab_file=path)
    for word in words:
        assert len(expanded.encode(word)) == 1, word
        # The pure-Python segmentation is tiktoken's, before and after.
        assert add_merges.bpe_segment(word.encode(), ranks) == base.tokenize(word)
        assert expanded.decode(expanded.encode(word + " and more")) == word + " and more"


def test_add_merges_refuses_bad_input_with_a_message(tmp_path, capsys):
    add_merges = load_example("add_merges")
    bad = tmp_path / "bad.txt"
    bad.write_text("word without frequency\n", encoding="utf-8")
    for argv, message in [
        ([str(bad), str(tmp_path / "o")], "line 1: expected 'word<TAB>frequency'"),
        ([str(EXAMPLES / "qwen_extra_vocab.txt"), str(tmp_path / "o"), "--start_id", "151850"],
         "--start_id 151850 is not above the base vocabulary and the special tokens; use 151851 or more"),
        ([str(tmp_path / "missing.txt"), str(tmp_path / "o")], "missing.txt"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            add_merges.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ----- function_call_finetune_examples.py ---------------------------------------------------------


def test_function_call_samples_match_the_server_prompt_and_train_one_step(tmp_path, tiny_chat, tokenizer):
    run(EXAMPLES / "function_call_finetune_examples.py", cwd=tmp_path)
    path = tmp_path / "example_func_call_train_samples.json"  # the default output
    samples = load_conversations(path)
    assert len(samples) == 2
    first, dialogue = (s["conversations"] for s in samples)
    assert [m["from"] for m in first] == ["user", "assistant"]
    assert first[1]["value"].startswith("Thought:")
    assert re.findall(r"^Action: (\w+)$", first[1]["value"], re.M) == ["web_search", "image_gen"]
    assert [m["from"] for m in dialogue] == ["user", "assistant"] * 4
    no_tool = [m["value"] for m in dialogue if m["from"] == "assistant" and "Action:" not in m["value"]]
    assert no_tool and all(re.match(r"Thought: .*\nFinal Answer: ", v) for v in no_tool)

    # The instruction is the server's own: a request with the same functions and the first question
    # gives a prompt that holds the sample's first user message verbatim.
    example = load_example("function_call_finetune_examples")
    for conversation in (first, dialogue):
        question = conversation[0]["value"].rsplit("\n\nQuestion: ", 1)[1]
        request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": question}],
                                        functions=example.FUNCTIONS)
        prompt = tokenizer.decode(build_chat_prompt(tokenizer, request).ids)
        assert f"<|im_start|>user\n{conversation[0]['value']}<|im_end|>" in prompt

    out = tmp_path / "out"
    run(ROOT / "finetune" / "finetune.py", "--model_name_or_path", tiny_chat, "--data_path", path,
        "--output_dir", out, "--max_steps", "1", "--per_device_train_batch_size", "2", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True", "--disable_tqdm", "True", cwd=tmp_path)
    log = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in log if "loss" in h]
    assert len(losses) == 1 and math.isfinite(losses[0]) and losses[0] > 0


# ----- auto_comments.py ---------------------------------------------------------------------------


def commented_ok(original: str, merged: str) -> None:
    """Every original line is in ``merged``, in order; every other line is a comment; same program."""
    rest = iter(original.splitlines(keepends=True))
    expected = next(rest, None)
    for line in merged.splitlines(keepends=True):
        if line == expected:
            expected = next(rest, None)
        else:
            assert line.lstrip().startswith("#"), line
    assert expected is None, f"original line missing or out of order: {expected!r}"
    assert ast.dump(ast.parse(merged)) == ast.dump(ast.parse(original))


CODE = '''import os


def area(w, h):
    """Rectangle area.

    # not a comment: inside the docstring
    """
    total = w * \\
        h
    return total


def main():
    print(area(2, 3))
'''


def test_split_code_cuts_at_defs_packs_pieces_and_caps_chunk_length():
    auto = load_example("auto_comments")
    assert auto.split_code(CODE) == [CODE]  # short files are sent whole
    long_def = "def big():\n" + "".join(f"    x{i} = {i}\n" for i in range(120))
    code = "import os\n\n\n" + "def a():\n    pass\n\n\n" + long_def + "\ndef b():\n    return 1\n"
    chunks = auto.split_code(code)
    assert "".join(chunks) == code
    assert all(len(c.splitlines()) <= 50 for c in chunks)
    assert chunks[0] == "import os\n\n\ndef a():\n    pass\n\n\n"  # header and a() packed together
    assert chunks[1].startswith("def big():\n") and len(chunks[1].splitlines()) == 50
    assert chunks[-1].endswith("\ndef b():\n    return 1\n")  # the tail of big() packed with b()
    assert len(chunks) == 4


def test_merge_keeps_every_original_line_whatever_the_reply():
    auto = load_example("auto_comments")
    reply = '''Here is the code:
```python
# Import the os module
import os

# Compute the area of a rectangle
def area(width, height):
    """Rectangle area.
    # a comment the model put inside the docstring
    """
    # Multiply the sides
    total = w * \\
        # a comment that would break the continuation
        h
    return total  # give the result back
# trailing remark
```'''
    merged = auto.merge_comments(CODE, reply)
    commented_ok(CODE, merged)
    lines = merged.splitlines()
    assert lines[0] == "# Import the os module" and lines[1] == "import os"
    assert lines[lines.index("def area(w, h):") - 1] == "# Compute the area of a rectangle"  # the def was changed
    assert lines[lines.index("    total = w * \\") - 1] == "    # Multiply the sides"
    assert lines[lines.index("    return total") - 1] == "    # give the result back"  # a trailing comment
    assert "# trailing remark" in lines
    # Nothing inside the docstring or between the continued lines.
    assert lines[lines.index('    """Rectangle area.') + 1] == ""
    assert lines[lines.index("    total = w * \\") + 1] == "        h"

    # Dropped, reordered and invented lines; an empty reply; a reply that is all junk.
    shuffled = "\n".join(["# first", "def main():", "# about area", "    return total", "import os",
                          "    print(area(2, 3))", "import sys", "# last"])
    for reply in (shuffled, "", "I cannot help with that.", CODE[::-1]):
        commented_ok(CODE, auto.merge_comments(CODE, reply))
    assert auto.merge_comments(CODE, "") == CODE

    crlf = CODE.replace("\n", "\r\n")
    merged = auto.merge_comments(crlf, "# header\nimport os")
    assert merged == "# header\r\n" + crlf


def test_only_commented_copies_are_skipped_as_inputs(tmp_path):
    auto = load_example("auto_comments")
    for name in ("a.py", "a_comments.py", "auto_comments.py", "sub/b.py", "sub/b_comments.py", "notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    assert auto.python_files(tmp_path) == [tmp_path / "a.py", tmp_path / "auto_comments.py", tmp_path / "sub/b.py"]
    assert auto.python_files(tmp_path / "a_comments.py") == [tmp_path / "a_comments.py"]  # named: done as asked


def test_auto_comments_script_on_a_tiny_chat_model(tiny_chat, tmp_path, capsys):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    long_file = CODE + "".join(f"\n\ndef f{i}(x):\n    return x + {i}\n" for i in range(20))
    (src / "shapes.py").write_text(CODE)
    (src / "pkg" / "many.py").write_text(long_file)  # over 50 lines: several chunks
    server = ServerProcess(tiny_chat, "--model-name", "tiny")  # starts while the local run works
    try:
        proc = run(EXAMPLES / "auto_comments.py", "--path", src, "-c", tiny_chat, "--max-new-tokens", "8")
        for name, code in (("shapes", CODE), ("pkg/many", long_file)):
            commented_ok(code, (src / f"{name}_comments.py").read_text())
        assert proc.stderr.count("wrote ") == 2

        # Through an OpenAI-compatible server (the model name is asked from /v1/models).
        server.wait()
        run(EXAMPLES / "auto_comments.py", "--path", src / "shapes.py", "--api-base", f"{server.url}/v1",
            "--max-new-tokens", "8", "--regenerate")
        commented_ok(CODE, (src / "shapes_comments.py").read_text())
    finally:
        server.stop()

    # Existing outputs are reused (no model is loaded) unless --regenerate; *_comments.py is never an input.
    marker = "# kept as it was\n" + CODE
    (src / "shapes_comments.py").write_text(marker)
    load_example("auto_comments").main(["--path", str(src), "-c", str(tmp_path / "no-such-checkpoint")])
    assert capsys.readouterr().out.count("kept ") == 2 and (src / "shapes_comments.py").read_text() == marker
    assert not list(src.rglob("*_comments_comments.py"))
