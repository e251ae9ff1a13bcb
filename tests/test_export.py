"""qwen.export: Qwen2 folders that plain transformers loads without qwen, and GGUF files laid out as llama.cpp reads.

The exported folders are loaded by a fresh Python process in which ``import qwen`` is impossible (its module
entry is None), without ``trust_remote_code``; it reports token ids, decodes, chat-template ids, logits and
greedy generations, which are compared here with ``QWenTokenizer``, ``make_context`` and our model.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from qwen.chat import make_context
from qwen.export import ExportError, export_gguf, export_qwen2
from qwen.export.__main__ import main as cli
from qwen.export.rope import DEFAULT_ROPE_SCALING, least_drift, measure_drift, tiny_long_context_shape
from qwen.gptq import GPTQSettings, pack_layer, rtn_quantize_weight, save_gptq_folder
from qwen.tiny import make_tiny_checkpoint
from qwen.tokenizer import SPECIAL_TOKENS, QWenTokenizer

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
PROMPTS = ["The quick brown fox jumps over the lazy dog because", "你好，世界！今天天气怎么样？",
           "def f(x):\n    return x"]
CONVERSATIONS = [  # (query, history, system); no content starts with a newline (see the README)
    ("Hello!", [], "You are a helpful assistant."),
    ("给这个故事起一个标题", [("讲一个故事", "从前有座山……"), ("再讲一个", "好的。")], "You are a helpful assistant."),
    ("And in Python?", [("How do I sort a list in Rust?", "Use `v.sort()`.\n\n```rust\nv.sort();\n```")],
     "You answer briefly. 用中文或英文。"),
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CONVERSATIONS = [
    [{"role": "user", "content": "What is the weather in Paris?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
     {"role": "tool", "content": "Sunny, 21 C"}, {"role": "assistant", "content": "It is sunny."},
     {"role": "user", "content": "天气好吗？"}],
]

# Runs in a fresh interpreter: loads every exported folder with plain transformers (qwen cannot be imported).
LOADER = r"""
import json, sys
sys.modules["qwen"] = None  # any `import qwen` now fails
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
job = json.load(open(sys.argv[1]))
out = {}
for name, spec in job["folders"].items():
    res = {}
    if spec["tokenizer"]:
        tok = AutoTokenizer.from_pretrained(spec["path"])
        res.update({"class": type(tok).__name__, "eos": tok.eos_token, "pad": tok.pad_token, "len": len(tok)})
    if spec["corpus"]:
        ids = tok(job["corpus"], add_special_tokens=False).input_ids
        res["ids"] = ids
        res["decoded"] = tok.batch_decode(ids)
        res["random_decoded"] = tok.batch_decode(job["random_ids"])
        res["random_decoded_skip"] = tok.batch_decode(job["random_ids"], skip_special_tokens=True)
        res["chats"] = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
                        for c in job["chats"]]
        res["tool_chats"] = [tok.apply_chat_template(c, tools=job["tools"], add_generation_prompt=True,
                                                     tokenize=True, return_dict=False) for c in job["tool_chats"]]
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32).eval()
    res["model_class"] = type(model).__name__
    logits, greedy = [], []
    with torch.no_grad():
        for ids in job["prompt_ids"]:
            x = torch.tensor([ids])
            logits.append(model(x).logits[0])
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12)
            greedy.append(y[0, len(ids):].tolist())
    torch.save(logits, spec["logits_out"])
    res["greedy"] = greedy
    res["generation_eos"] = model.generation_config.eos_token_id
    out[name] = res
assert "qwen" not in sys.modules or sys.modules["qwen"] is None
print(json.dumps(out))
"""


# ----- sources ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Tiny originals: chat, base (3 source shards), window attention (one size), GPTQ 4-bit of the chat one."""
    root = tmp_path_factory.mktemp("export-src")
    out = {
        "chat": make_tiny_checkpoint(root / "chat"),
        "base": make_tiny_checkpoint(root / "base", chat=False, shards=3, seed=1),
        "window": make_tiny_checkpoint(root / "window", seed=2, use_window_attn=True, window_size=6),
    }
    model = AutoModelForCausalLM.from_pretrained(out["chat"]).eval()
    packed = {}
    for i, block in enumerate(model.transformer.h):
        for name in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"):
            layer = block.get_submodule(name)
            q = rtn_quantize_weight(layer.weight, bits=4, group_size=32)
            packed[f"transformer.h.{i}.{name}"] = pack_layer(q.q, q.scales, q.zeros, q.g_idx, 4, layer.bias)
    settings = GPTQSettings(bits=4, group_size=32, model_file_base_name="model")
    out["gptq"] = save_gptq_folder(model, packed, root / "gptq", settings, source=out["chat"])
    return out


@pytest.fixture(scope="module")
def exports(sources, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-dst")
    export_qwen2(sources["chat"], root / "chat")
    export_qwen2(sources["base"], root / "base", shard_size="20MB")
    export_qwen2(sources["window"], root / "window")
    export_qwen2(sources["gptq"], root / "gptq", dtype="fp32")
    return {name: root / name for name in ("chat", "base", "window", "gptq")}


@pytest.fixture(scope="module")
def qtok() -> QWenTokenizer:
    return QWenTokenizer()


def corpus(qtok: QWenTokenizer) -> list[str]:
    """Chinese, English, code, emoji, whitespace runs, special-token text, NFC cases, and every vocabulary token
    (in shuffled groups of 40, so token boundaries meet in every way)."""
    rng = random.Random(0)
    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "qwen").rglob("*.py"))]
    texts += [p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]]
    texts += [
        "通义千问是阿里云研发的大语言模型。它能回答问题、写代码、翻译文本。", "我今天去了北京的故宫，人很多！",
        "日本語のテキストも少し。한국어 문장도 있습니다.", "Ünïcödé façade, naïve café — “quotes” … 1,234.56€",
        "👨‍👩‍👧‍👦 family, 👍🏽 thumbs, 🇨🇳🇺🇸 flags, 1️⃣ keycap, 🫠", "e\u0301 A\u030a \u1100\u1161\u11a8 ﬁ Ⅻ",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|extra_0|><|extra_204|><|extra_205|><|im_end",
        "<|im_start|>\u0338 x <|extra_3|>\u0338 <|endoftext|>> =\u0338", "it's we're they've I'm you'll he'd IT'S",
        "x = [i ** 2 for i in range(10)]  # squares\n\tif x:\r\n\t\treturn {'a': 1}",
    ]
    spaces = [" ", "  ", "\t", "\n", "\r\n", "\n\n", "\u3000", "\xa0", "   \n", " \t "]
    texts += ["".join(rng.choice(spaces) + rng.choice(["a", "中", "1", "!", ""]) for _ in range(30)) for _ in range(60)]
    texts += ["".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 60))) for _ in range(60)]
    tokens = list(qtok.mergeable_ranks)
    rng.shuffle(tokens)
    texts += [b"".join(tokens[i : i + 40]).decode("utf-8", "replace") for i in range(0, len(tokens), 40)]
    return texts


@pytest.fixture(scope="module")
def ours(sources) -> dict[str, torch.nn.Module]:
    return {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for name, path in sources.items()}


@pytest.fixture(scope="module")
def loaded(exports, qtok, tmp_path_factory) -> dict:
    """What a Python without qwen gets from the exported folders."""
    work = tmp_path_factory.mktemp("loader")
    texts = corpus(qtok)
    rng = random.Random(1)
    job = {
        "folders": {name: {"path": str(path), "logits_out": str(work / f"{name}.pt"), "corpus": name == "chat",
                           "tokenizer": name in ("chat", "base")} for name, path in exports.items()},
        "corpus": texts,
        "random_ids": [[rng.randrange(151851) for _ in range(rng.randint(1, 30))] for _ in range(300)],
        "chats": [_messages(q, h, s) for q, h, s in CONVERSATIONS],
        "tools": TOOLS,
        "tool_chats": TOOL_CONVERSATIONS,
        "prompt_ids": [qtok.encode(p) for p in PROMPTS] + [[rng.randrange(151851) for _ in range(20)]],
    }
    (work / "job.json").write_text(json.dumps(job))
    done = subprocess.run([sys.executable, "-c", LOADER, str(work / "job.json")], capture_output=True, text=True,
                          timeout=300, cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    for name in exports:
        result[name]["logits"] = torch.load(work / f"{name}.pt")
    return {"job": job, "texts": texts, "result": result}


def _messages(query: str, history: list[tuple[str, str]], system: str) -> list[dict]:
    messages = [{"role": "system", "content": system}]
    for q, r in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    return messages + [{"role": "user", "content": query}]


# ----- the Qwen2 folder -----------------------------------------------------------------------------------------


def test_readme_export_snippet_runs_as_written(sources, tmp_path, capsys):
    """The Python export example of docs/export.md (once the README's), on a tiny checkpoint: export, load with
    plain transformers, chat through apply_chat_template and generate (a BatchEncoding, not a tensor, under
    transformers 5.25)."""
    from test_chat import docs_block

    code = docs_block("export.md", "## Export")
    assert '"Qwen-7B-Chat-qwen2"' in code and '"Qwen-7B-Chat"' in code
    code = code.replace('"Qwen-7B-Chat-qwen2"', repr(str(tmp_path / "out"))).replace(
        '"Qwen-7B-Chat"', repr(str(sources["chat"])))
    exec(compile(code, "docs/export.md:export", "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "out" / "config.json").is_file()
    assert capsys.readouterr().out.strip()  # the notes and a decoded reply (random text from a random model)


def test_folder_layout_and_config(exports, sources):
    chat = exports["chat"]
    assert sorted(p.name for p in chat.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((chat / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert "auto_map" not in config and config["intermediate_size"] == 64 and config["num_key_value_heads"] == 4
    assert config["rope_parameters"]["rope_type"] == DEFAULT_ROPE_SCALING == config["rope_scaling"]["type"]
    assert config["max_position_embeddings"] == 8192 and config["rope_theta"] == 10000.0
    base = sorted(p.name for p in exports["base"].iterdir())
    shards = [n for n in base if n.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((exports["base"] / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    window = json.loads((exports["window"] / "config.json").read_text())
    assert window["use_sliding_window"] and window["sliding_window"] == 6 and window["max_window_layers"] == 0
    assert window["layer_types"] == ["sliding_attention"] * 2


def test_generation_config_carries_stops_and_sampling(exports):
    chat = json.loads((exports["chat"] / "generation_config.json").read_text())
    assert chat["eos_token_id"] == [151643, 151645, 151644] and chat["pad_token_id"] == 151643
    assert (chat["top_p"], chat["repetition_penalty"], chat["do_sample"]) == (0.8, 1.1, True)
    assert "chat_format" not in chat and "stop_words_ids" not in chat and "max_window_size" not in chat
    base = json.loads((exports["base"] / "generation_config.json").read_text())
    assert base["eos_token_id"] == [151643] and "repetition_penalty" not in base


def test_tokenizer_ids_equal_qwen_tokenizer_on_a_large_corpus(loaded, qtok):
    res = loaded["result"]["chat"]
    # transformers 5 picks Qwen2Tokenizer for model_type qwen2 whatever tokenizer_config.json says; it builds
    # itself from tokenizer.json's vocabulary and merges
    assert res["class"] in ("Qwen2Tokenizer", "TokenizersBackend") and res["len"] == 151851
    assert (res["eos"], res["pad"]) == ("<|im_end|>", "<|endoftext|>")
    assert loaded["result"]["base"]["eos"] == "<|endoftext|>"
    texts = loaded["texts"]
    assert len(texts) > 3000 and sum(map(len, texts)) > 1_000_000
    for text, ids in zip(texts, res["ids"], strict=True):
        assert ids == qtok.encode(text), text[:200]


def test_decode_round_trips(loaded, qtok):
    res, job = loaded["result"]["chat"], loaded["job"]
    for text, decoded in zip(loaded["texts"], res["decoded"], strict=True):
        assert decoded == unicodedata.normalize("NFC", text)
    for ids, decoded, skipped in zip(job["random_ids"], res["random_decoded"], res["random_decoded_skip"], strict=True):
        assert decoded == qtok.decode(ids)  # partial UTF-8 sequences become U+FFFD in both
        assert skipped == qtok.decode(ids, skip_special_tokens=True)


def test_chat_template_equals_make_context(loaded, qtok):
    res = loaded["result"]["chat"]
    for (query, history, system), ids in zip(CONVERSATIONS, res["chats"], strict=True):
        assert ids == make_context(qtok, query, history, system=system)[1]
    for conversation, ids in zip(TOOL_CONVERSATIONS, res["tool_chats"], strict=True):
        expected = qtok.apply_chat_template(conversation, tools=TOOLS, add_generation_prompt=True, return_dict=False)
        assert ids == expected


@pytest.mark.parametrize("name", ["chat", "base", "window", "gptq"])
def test_model_logits_and_greedy_generations_equal_ours(loaded, ours, name):
    res, job = loaded["result"][name], loaded["job"]
    assert res["model_class"] == "Qwen2ForCausalLM"
    model = ours[name]
    with torch.no_grad():
        for ids, theirs, greedy in zip(job["prompt_ids"], res["logits"], res["greedy"], strict=True):
            x = torch.tensor([ids])
            assert (model(x).logits[0] - theirs).abs().max().item() < TOL
            mine = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12)
            assert greedy == mine[0, len(ids):].tolist()  # with each side's generation config (penalty 1.1)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), st.sampled_from(SPECIAL_TOKENS[:4] + (
    "\n", "  ", "\t", "\r\n", "\u0338", "'s", "123", "<|", "|>", "e\u0301"))), max_size=12).map("".join))
def test_random_unicode_ids_equal(exported_tokenizer, qtok, text):
    # The one known difference (README): transformers 5 matches its eos/pad tokens before NFC, so "<|im_end|>"
    # followed by U+0338 (which NFC composes with ">" into "≯") is a control token there, plain text for Qwen.
    assume("|>\u0338" not in text)
    ids = exported_tokenizer(text, add_special_tokens=False).input_ids
    assert ids == qtok.encode(text)
    assert exported_tokenizer.decode(ids) == qtok.decode(ids)


@pytest.fixture(scope="module")
def exported_tokenizer(exports):
    tok = AutoTokenizer.from_pretrained(exports["chat"])
    assert not isinstance(tok, QWenTokenizer)  # the folder's own fast tokenizer, not ours
    return tok


# ----- long context ---------------------------------------------------------------------------------------------


def test_default_rope_scaling_drifts_least_past_seq_length(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "long", **tiny_long_context_shape(32))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    table = measure_drift(model, multiples=(0.5, 2.0, 4.0))
    assert least_drift(table) == DEFAULT_ROPE_SCALING
    assert table["none"][0.5].max_abs < TOL and table["dynamic"][0.5].max_abs < TOL  # exact below seq_length
    assert table["yarn"][0.5].max_abs > 100 * TOL  # YaRN rescales every length


def test_model_without_dynamic_ntk_exports_exact_at_every_length(tmp_path):
    """Qwen-72B's config: no dynamic NTK, no logn. The default is then the plain rotary, exact past seq_length."""
    src = make_tiny_checkpoint(tmp_path / "src", use_dynamic_ntk=False, use_logn_attn=False,
                               **tiny_long_context_shape(32))
    report = export_qwen2(src, tmp_path / "out")
    assert any(n.startswith("rope scaling: none") and "every length" in n for n in report.notes)
    ours = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Qwen2ForCausalLM"
    x = torch.randint(0, 151643, (1, 3 * 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x).logits - theirs(x).logits).abs().max() < TOL


def test_the_default_export_tells_vllm_users_to_pick_none():
    """vLLM and SGLang read "dynamic" as one fixed NTK base at every length: the export's note says so and names the
    setting that is exact for them below seq_length (bench/vllm_check.py exports with it)."""
    from qwen.export.rope import rope_scaling

    note = rope_scaling("dynamic", 64).describe(64)
    assert "vLLM and SGLang" in note and "not exact below 64 tokens" in note and "--rope-scaling none" in note
    assert 'rope="none"' in (Path(__file__).resolve().parents[1] / "bench" / "vllm_check.py").read_text()


def test_yarn_export_declares_its_context(sources, tmp_path):
    export_qwen2(sources["chat"], tmp_path / "yarn", rope="yarn", rope_factor=8)
    config = AutoConfig.from_pretrained(tmp_path / "yarn")
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 8
    assert config.rope_parameters["original_max_position_embeddings"] == 8192
    assert config.max_position_embeddings == 8192 * 8


# ----- bad input: one line naming the problem and the fix, nothing left behind -----------------------------------


def run_cli(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli([str(a) for a in args])
    err = capsys.readouterr().err
    assert exc.value.code not in (0, None)
    message = str(exc.value.code)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in err
    return message


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_refuses_a_folder_that_is_not_qwen(exports, tmp_path, capsys):
    message = run_cli(["qwen2", exports["chat"], tmp_path / "out"], capsys)
    assert "not an original Qwen v1 checkpoint" in message and "'qwen2'" in message
    (tmp_path / "empty").mkdir()
    assert "without config.json" in run_cli(["gguf", tmp_path / "empty", tmp_path / "x.gguf"], capsys)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_refuses_a_missing_shard(tmp_path, capsys):
    src = make_tiny_checkpoint(tmp_path / "src", shards=3)
    (src / "model-00002-of-00003.safetensors").unlink()
    message = run_cli(["qwen2", src, tmp_path / "out"], capsys)
    assert "model-00002-of-00003.safetensors, which is missing" in message and "download" in message
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_destination_unless_overwrite(sources, exports, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    message = run_cli(["qwen2", sources["chat"], dst], capsys)
    assert "already exists and is not empty" in message and "--overwrite" in message
    assert (dst / "keep.txt").read_text() == "mine"
    cli(["qwen2", str(sources["chat"]), str(dst), "--overwrite"])
    assert "wrote" in capsys.readouterr().out
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file() and not leftovers(tmp_path)
    assert "overlaps the source" in run_cli(["qwen2", sources["chat"], sources["chat"] / "sub"], capsys)


def test_refuses_several_window_sizes(tmp_path, capsys):
    src = make_tiny_checkpoint(tmp_path / "src", use_window_attn=True, window_size=[4, 8])
    message = run_cli(["qwen2", src, tmp_path / "out"], capsys)
    assert "several: [4, 8]" in message and "one window size" in message
    assert "window attention" in run_cli(["gguf", src, tmp_path / "out.gguf"], capsys)


def test_failure_while_writing_leaves_nothing(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "src")
    weights = load_file(src / "model.safetensors")
    weights["transformer.h.1.mlp.c_proj.weight"] = weights["transformer.h.1.mlp.c_proj.weight"][:, :32].contiguous()
    save_file(weights, src / "model.safetensors")
    with pytest.raises(ExportError, match=r"c_proj.weight has shape \[64, 32\]"):
        export_qwen2(src, tmp_path / "out" / "deeper", shard_size="1MB")  # shards before the bad tensor get written
    assert not (tmp_path / "out" / "deeper").exists() and not leftovers(tmp_path / "out")


def test_not_enough_disk_space(sources, tmp_path):
    """The CLI in a private mount namespace whose only writable place is a 30 MB tmpfs."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare for a small private file system")
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=30m tmpfs {mnt} || exit 77; {sys.executable} -m qwen.export qwen2 "
              f"{sources['chat']} {mnt}/out; echo rc=$?; ls -A {mnt}")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    if done.returncode == 77 or "unshare:" in done.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {done.stderr.strip()[:200]}")
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: not enough disk space"), done.stderr
    assert "needs about 0.1" in lines[0] and "choose a DST on another disk" in lines[0]
    assert done.stdout.split() == ["rc=1"]  # and the tmpfs is empty


# ----- GGUF -----------------------------------------------------------------------------------------------------

GGUF_REQUIRED_KEYS = {  # what llama.cpp's loader reads for the qwen architecture (get_key without `false`)
    "general.architecture": "qwen", "qwen.context_length": 8192, "qwen.embedding_length": 64,
    "qwen.block_count": 2, "qwen.feed_forward_length": 128, "qwen.attention.head_count": 4,
    "qwen.attention.layer_norm_rms_epsilon": pytest.approx(1e-6), "qwen.rope.freq_base": 10000.0,
    "qwen.rope.dimension_count": 16, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
    "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.eos_token_id": 151645,
}


@pytest.fixture(scope="module")
def gguf_file(sources, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "chat-q8_0.gguf"
    report = export_gguf(sources["chat"], path, outtype="q8_0")
    assert report.path == path and "pre-tokenizer 'qwen2'" in report.notes[0]
    return path


def test_gguf_metadata_and_tensors_as_llama_cpp_expects(gguf_file, sources, exports):
    """One file (reading a GGUF's 450k vocabulary strings back takes seconds): q8_0, whose matrices llama.cpp
    quantizes and whose norms and biases stay f32. Tensor data is compared after dequantizing, which also proves
    the mapping (w1 is ffn_up, w2 the gate): the random tensors differ by far more than the rounding."""
    import gguf

    reader = gguf.GGUFReader(gguf_file)
    fields = reader.fields
    for key, value in GGUF_REQUIRED_KEYS.items():
        assert fields[key].contents() == value, key
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    fast = json.loads((exports["chat"] / "tokenizer.json").read_text())
    assert len(tokens) == len(types) == 151936
    assert all(tokens[i] == t for t, i in fast["model"]["vocab"].items())
    assert tokens[151645] == "<|im_end|>" and types[151645] == gguf.TokenType.CONTROL
    assert tokens[151900] == "[PAD151900]" and types[151900] == gguf.TokenType.UNUSED
    assert types[9707] == gguf.TokenType.NORMAL and tokens[9707] == "Hello"
    assert fields["tokenizer.ggml.merges"].contents() == [" ".join(m) for m in fast["model"]["merges"]]

    h, v, half = 64, 151936, 64  # llama.cpp's create_tensor shapes (ne order: columns first)
    expected = {"token_embd.weight": [h, v], "output_norm.weight": [h], "output.weight": [h, v]}
    for i in range(2):
        expected.update({f"blk.{i}.attn_norm.weight": [h], f"blk.{i}.attn_qkv.weight": [h, 3 * h],
                         f"blk.{i}.attn_qkv.bias": [3 * h], f"blk.{i}.attn_output.weight": [h, h],
                         f"blk.{i}.ffn_norm.weight": [h], f"blk.{i}.ffn_gate.weight": [h, half],
                         f"blk.{i}.ffn_up.weight": [h, half], f"blk.{i}.ffn_down.weight": [half, h]})
    tensors = {t.name: t for t in reader.tensors}
    assert {name: t.shape.tolist() for name, t in tensors.items()} == expected
    q = gguf.GGMLQuantizationType
    assert {name: t.tensor_type for name, t in tensors.items()} == {
        name: q.F32 if len(shape) == 1 else q.Q8_0 for name, shape in expected.items()}
    original = load_file(sources["chat"] / "model.safetensors")
    pairs = {"blk.1.ffn_up.weight": "transformer.h.1.mlp.w1.weight", "output.weight": "lm_head.weight",
             "blk.1.ffn_gate.weight": "transformer.h.1.mlp.w2.weight", "token_embd.weight": "transformer.wte.weight",
             "blk.0.attn_qkv.weight": "transformer.h.0.attn.c_attn.weight",
             "blk.0.ffn_down.weight": "transformer.h.0.mlp.c_proj.weight"}
    for name, key in pairs.items():
        data = gguf.quants.dequantize(tensors[name].data, q.Q8_0)
        ref = original[key]
        assert (torch.from_numpy(data).reshape(ref.shape) - ref).abs().max() < ref.abs().max() / 100, name
    for name, key in {"blk.0.attn_qkv.bias": "transformer.h.0.attn.c_attn.bias",
                      "output_norm.weight": "transformer.ln_f.weight"}.items():
        assert torch.equal(torch.from_numpy(tensors[name].data.copy()), original[key])


def test_gguf_refuses_a_non_gguf_name_and_existing_file(sources, gguf_file, capsys):
    assert "must be a file name ending in .gguf" in run_cli(["gguf", sources["chat"], "model.bin"], capsys)
    message = run_cli(["gguf", sources["chat"], gguf_file], capsys)
    assert "already exists" in message and "--overwrite" in message
