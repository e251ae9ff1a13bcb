"""Every eval/ script end to end on tiny checkpoints and crafted data in the original layouts, and the
chat scripts through --api-base against a real openai_api.py server."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen.eval import extract, tasks
from qwen.eval.prompts import GSM8K_PROMPT_FILE
from qwen.eval.scoring import letter_ids

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = [("1", "2", "3", "4"), ("red", "green", "blue", "None"), ("甲", "乙", "丙", "丁")]


def rows(n: int, offset: int = 0) -> list[dict]:
    return [{"id": str(i), "question": f"问题 {i + offset}: which one?", "A": OPTIONS[i % 3][0],
             "B": OPTIONS[i % 3][1], "C": OPTIONS[i % 3][2], "D": OPTIONS[i % 3][3], "answer": "ABCD"[i % 4]}
            for i in range(n)]


def write_csv(path: Path, fields: list[str], records: list[dict], header: bool = True, index: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(([""] if index else []) + fields)
        for i, record in enumerate(records):
            writer.writerow(([i] if index else []) + [record[k.lower()] if k.lower() in record else record[k]
                                                     for k in fields])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-data")
    for subject in ("computer_network", "college_physics"):
        write_csv(root / "ceval/dev" / f"{subject}_dev.csv", ["id", "question", "A", "B", "C", "D", "answer"],
                  rows(5, 100))
        write_csv(root / "ceval/val" / f"{subject}_val.csv", ["id", "question", "A", "B", "C", "D", "answer"], rows(4))
    for subject in ("abstract_algebra", "anatomy"):
        fields = ["question", "A", "B", "C", "D", "answer"]
        write_csv(root / "mmlu/dev" / f"{subject}_dev.csv", fields, rows(5, 100), header=False)
        write_csv(root / "mmlu/test" / f"{subject}_test.csv", fields, rows(4), header=False)
    for subject in ("agronomy", "anatomy"):
        fields = ["Question", "A", "B", "C", "D", "Answer"]
        write_csv(root / "cmmlu/dev" / f"{subject}.csv", fields, rows(5, 100), index=True)
        write_csv(root / "cmmlu/test" / f"{subject}.csv", fields, rows(4), index=True)
    gsm = [{"question": f"Tom has {i} apples and buys 2 more. How many?", "answer": f"{i}+2={i + 2}\n#### {i + 2}"}
           for i in range(4)]
    (root / "gsm8k.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gsm))
    problems = [
        {"task_id": "Test/0", "entry_point": "add",
         "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b.\n    >>> add(1, 2)\n    3\n    """\n',
         "canonical_solution": "    return a + b\n",
         "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"},
        {"task_id": "Test/1", "entry_point": "neg",
         "prompt": 'def neg(a: int) -> int:\n    """Return -a.\n    >>> neg(1)\n    -1\n    """\n',
         "canonical_solution": "    return -a\n", "test": "def check(candidate):\n    assert candidate(4) == -4\n"},
    ]
    (root / "HumanEval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    plugin = root / "plugin"
    plugin.mkdir()
    job = {"prompt": "Answer with a tool. Question: weather in Paris?",
           "response": 'Thought: use the tool\nAction: weather\nAction Input: {"city": "Paris"}\nObservation: sun'}
    (plugin / "pos.jsonl").write_text(json.dumps(job) + "\n" + json.dumps(job) + "\n")
    (plugin / "neg.jsonl").write_text(json.dumps({"prompt": "Say hi", "response": "Final Answer: hi"}) + "\n")
    return root


def script(name: str, *args: object, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run eval/<name>.py as a user would."""
    result = subprocess.run([sys.executable, str(ROOT / "eval" / f"{name}.py"), *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("bench,subjects", [("ceval", "computer_network,college_physics"),
                                            ("mmlu", "abstract_algebra,anatomy"), ("cmmlu", "agronomy,anatomy")])
def test_base_multiple_choice_script(bench, subjects, data, tiny_base, tmp_path):
    folder = data / bench
    result = script(f"evaluate_{bench}", "-c", tiny_base, "-d", folder, "--subjects", subjects, "--limit", 2,
                    "--output-json", "results.json", "--batch-size", 3, "--no-progress", cwd=tmp_path)
    out = tmp_path / f"outs/{bench}_eval_result"
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 4 and {s["doc_id"] for s in samples} == {f"{s}/{i}" for s in subjects.split(",")
                                                                   for i in range(2)}
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["n-samples"][bench] == {"original": 8, "effective": 4}
    scores = results["results"][bench]
    assert set(scores["subjects"]) == set(subjects.split(","))
    accuracy = 100 * sum(s["correct"] for s in samples) / 4
    assert scores["Average"] == pytest.approx(accuracy)  # equal subject sizes: macro == micro
    assert "| Average" in result.stdout and "items" in result.stdout
    with (out / f"{subjects.split(',')[0]}_result.csv").open(encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and {"model_output", "prob_A", "prob_D", "correctness"} <= set(table[0])
    assert table[0]["question"] == "问题 0: which one?"
    # The logged prediction is the model's own argmax letter for that exact prompt.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    first = samples[0]
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.encode(first["prompt"])])).logits[0, -1]
    choices = letter_ids(tokenizer, spaced=bench == "mmlu")
    assert first["prediction"] == "ABCD"[int(logits[choices].argmax())]
    assert first["prompt"].endswith("答案：" if bench != "mmlu" else "Answer:")


@pytest.mark.parametrize("bench,subject", [("ceval", "computer_network"), ("mmlu", "anatomy")])
def test_chat_multiple_choice_script(bench, subject, data, tiny_chat, tiny_model, tokenizer, tmp_path):
    """A local chat run: each logged reply is chat()'s greedy reply to the prompt, and the letter comes from it."""
    from qwen.chat import chat
    from qwen.eval.choice import extract_ceval_choice, extract_mmlu_choice

    result = script(f"evaluate_chat_{bench}", "-c", tiny_chat, "-d", data / bench, "--subjects", subject, "--limit", 2,
                    "--max-new-tokens", 10, "--no-progress", cwd=tmp_path)
    samples = read_jsonl(tmp_path / f"outs_chat/{bench}_eval_result/samples.jsonl")
    assert len(samples) == 2 and "| Average" in result.stdout
    items = {f"{subject}/{i}": row for i, row in enumerate(rows(4))}
    for s in samples:
        expected, _ = chat(tiny_model, tokenizer, s["prompt"], do_sample=False, repetition_penalty=1.0,
                           max_new_tokens=10)
        assert s["response"] == expected
        options = {k: items[s["doc_id"]][k] for k in "ABCD"}
        letter = (extract_ceval_choice(expected, items[s["doc_id"]]["question"], options) if bench == "ceval"
                  else extract_mmlu_choice(expected, options))
        assert s["prediction"] == letter and s["correct"] == (letter == s["answer"])
    with (tmp_path / f"outs_chat/{bench}_eval_result/{subject}_result.csv").open(encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    # Each row holds its own reply (the original chat-MMLU script stored the last reply in every row).
    assert [r["model_response"] for r in table] == [s["response"] for s in sorted(samples, key=lambda s: s["doc_id"])]


def test_resume_and_refusal_to_mix_runs(data, tiny_base, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["-c", str(tiny_base), "-d", str(data / "ceval"), "--subjects", "computer_network", "--no-progress"]
    tasks.main_multiple_choice("ceval", argv + ["--limit", "2"])
    log = tmp_path / "outs/ceval_eval_result/samples.jsonl"
    first = read_jsonl(log)
    tasks.main_multiple_choice("ceval", argv + ["--limit", "3"])
    assert "resuming: 2 items" in capsys.readouterr().err
    second = read_jsonl(log)
    assert second[:2] == first and len(second) == 3  # only the new item was scored
    with pytest.raises(SystemExit) as exit_info:  # same log, another model setting
        tasks.main_multiple_choice("ceval", argv + ["--int8"])
    assert exit_info.value.code == 2 and "another run" in capsys.readouterr().err
    tasks.main_multiple_choice("ceval", argv + ["--int8", "--overwrite"])
    assert len(read_jsonl(log)) == 4


def test_clear_errors(data, tiny_base, tiny_chat, tmp_path, capsys, monkeypatch):
    missing = script("evaluate_ceval", "-c", tmp_path / "nope", "-d", data / "ceval", "--subjects", "computer_network",
                     cwd=tmp_path, check=False)
    assert missing.returncode == 2 and "no checkpoint folder" in missing.stderr and "Traceback" not in missing.stderr
    monkeypatch.chdir(tmp_path)  # the same programs in-process (each subprocess costs seconds of imports)
    cases = [
        (lambda: tasks.main_multiple_choice("cmmlu", ["-c", str(tiny_base)]), "cmmlu_v1_0_1.zip"),
        (lambda: tasks.main_chat_multiple_choice("mmlu", ["-c", str(tiny_base), "-d", str(data / "mmlu"),
                                                         "--subjects", "anatomy"]), "base model"),
        (lambda: tasks.main_humaneval(False, ["-c", str(tiny_base), "-f", str(data / "HumanEval.jsonl")]),
         "--confirm-run-unsafe-code"),
        (lambda: tasks.main_plugin(tmp_path, ["-c", str(tiny_chat), "--eval-hfagent"]), "transformers"),
    ]
    for run, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run()
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_gsm8k_scripts(data, tiny_base, tiny_chat, tmp_path):
    base = script("evaluate_gsm8k", "-c", tiny_base, "-f", data / "gsm8k.jsonl", "--limit", 2, "--max-new-tokens",
                  24, "--output-json", "base.json", "--no-progress", cwd=tmp_path)
    assert "qwen's own" in base.stderr and "not comparable to the published table" in base.stderr
    samples = read_jsonl(tmp_path / "gsm8k_res.jsonl")
    assert [s["question"] for s in samples] == [f"Tom has {i} apples and buys 2 more. How many?" for i in range(2)]
    for s in samples:
        assert s["prompt"].endswith(f"\nQuestion: {s['question']}\nLet's think step by step\n")
        assert "\n\n" not in s["completion"] and "Question:" not in s["completion"]
        assert s["acc"] == s["correct"] == (s["prediction"] == int(s["answer"].rsplit(" ", 1)[1]))
    assert json.loads((tmp_path / "base.json").read_text())["n-samples"]["gsm8k"]["effective"] == 2
    # The second question reused the 8-shot examples' keys from the prefix cache; without it, the same text.
    # (A --prompt-file given, even the same text, is the user's choice: no notice.)
    uncached = script("evaluate_gsm8k", "-c", tiny_base, "-f", data / "gsm8k.jsonl", "--limit", 2, "--max-new-tokens",
                      24, "--prefix-cache-gb", 0, "--prompt-file", GSM8K_PROMPT_FILE, "-o", "uncached.jsonl",
                      "--no-progress", cwd=tmp_path)
    assert "qwen's own" not in uncached.stderr
    assert [s["completion"] for s in read_jsonl(tmp_path / "uncached.jsonl")] == [s["completion"] for s in samples]
    result = script("evaluate_chat_gsm8k", "-c", tiny_chat, "-f", data / "gsm8k.jsonl", "--limit", 2,
                    "--use-fewshot", "-o", "chat.jsonl", "--max-new-tokens", 16, "--no-progress", cwd=tmp_path)
    assert "gsm8k (4-shot)" in result.stdout and "qwen's own" in result.stderr
    chat = read_jsonl(tmp_path / "chat.jsonl")
    assert len(chat) == 2 and chat[0]["prompt"].endswith("Let's think step by step")


def test_humaneval_scripts(data, tiny_base, tiny_chat, tmp_path):
    problems = data / "HumanEval.jsonl"
    script("evaluate_humaneval", "-c", tiny_base, "-f", problems, "--generate-only", "--max-new-tokens", 16,
           "--no-progress", cwd=tmp_path)
    samples = read_jsonl(tmp_path / "HumanEval_res.jsonl")
    assert [s["task_id"] for s in samples] == ["Test/0", "Test/1"] and all("completion" in s for s in samples)
    # --score rescoring a samples file in the original format: a right and a wrong completion.
    (tmp_path / "mine.jsonl").write_text(json.dumps({"task_id": "Test/0", "completion": "    return a + b\n"})
                                         + "\n" + json.dumps({"task_id": "Test/1", "completion": "    return a\n"}))
    scored = script("evaluate_humaneval", "-f", problems, "--score", "mine.jsonl", "--confirm-run-unsafe-code",
                    "--output-json", "he.json", cwd=tmp_path)
    assert "50.0" in scored.stdout
    assert json.loads((tmp_path / "he.json").read_text())["results"]["humaneval"]["pass@1"] == 0.5
    result = script("evaluate_chat_humaneval", "-c", tiny_chat, "-f", problems, "--confirm-run-unsafe-code",
                    "--max-new-tokens", 16, "-o", "chat.jsonl", "--no-progress", cwd=tmp_path)
    assert "pass@1" in result.stdout
    chat = read_jsonl(tmp_path / "chat.jsonl_results.jsonl")
    assert len(chat) == 2 and all(not row["passed"] for row in chat)  # random weights write no working code


def test_plugin_script(data, tiny_chat, tmp_path):
    result = script("evaluate_plugin", "-c", tiny_chat, "--data-dir", data / "plugin", "--eval-react-positive",
                    "--eval-react-positive-filename", "pos.jsonl", "--eval-react-negative",
                    "--eval-react-negative-filename", "neg.jsonl", "--max-new-tokens", 16, "--output-json",
                    "plugin.json", "--no-progress", cwd=tmp_path)
    scores = json.loads((tmp_path / "plugin.json").read_text())["results"]["plugin"]
    assert set(scores) == {"react_positive", "react_negative"}
    assert 0 <= scores["react_positive"]["action_input_rouge"] <= 1
    cache = read_jsonl(data / "plugin/pos.jsonl.cache")
    assert len(cache) == 2 and all(len(job["gen"]) == 1 for job in cache)
    assert "react_negative.bad_rate" in result.stdout


@pytest.fixture(scope="module")
def server(api_server):
    return api_server


def test_chat_scripts_through_the_api(data, tiny_chat, tiny_model, tokenizer, server, tmp_path, capsys,
                                      monkeypatch):
    """The chat scripts through openai_api.py get the server's greedy replies: those of a local chat() on
    the message as the server reads it (stripped of surrounding whitespace, as the original server did)."""
    from qwen.chat import chat

    result = script("evaluate_chat_ceval", "--api-base", f"{server.url}/v1", "--concurrency", 3, "-d", data / "ceval",
                    "--subjects", "computer_network", "--limit", 3, "--max-new-tokens", 12, "--no-progress",
                    "--output-json", "api.json", cwd=tmp_path)
    api = read_jsonl(tmp_path / "outs_chat/ceval_eval_result/samples.jsonl")
    assert sorted(s["doc_id"] for s in api) == [f"computer_network/{i}" for i in range(3)]
    for s in api:
        expected, _ = chat(tiny_model, tokenizer, s["prompt"].strip(), do_sample=False, repetition_penalty=1.0,
                           max_new_tokens=12)
        assert s["response"] == expected and s["prediction"] in "ABCD"
    assert json.loads((tmp_path / "api.json").read_text())["config"]["model"].startswith("tiny @ ")
    assert "| Average" in result.stdout
    # A base completion task through /v1/completions: the server's greedy completion, cut by the original rule.
    # The other scripts in-process (a subprocess each would cost seconds of imports).
    monkeypatch.chdir(tmp_path)
    api = ["--api-base", f"{server.url}/v1", "--no-progress"]
    tasks.main_gsm8k(False, [*api, "-f", str(data / "gsm8k.jsonl"), "--limit", "1", "--max-new-tokens", "8",
                             "-o", "base.jsonl"])
    (base,) = read_jsonl(tmp_path / "base.jsonl")
    ids = tokenizer.encode(base["prompt"])
    with torch.no_grad():
        out = tiny_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert base["completion"] == extract.cut(tokenizer.decode(out[0, len(ids):].tolist()), extract.GSM8K_CUT)
    tasks.main_gsm8k(True, [*api, "-f", str(data / "gsm8k.jsonl"), "--limit", "2", "--max-new-tokens", "8"])
    assert len(read_jsonl(tmp_path / "gsm8k_res.jsonl")) == 2
    tasks.main_humaneval(True, [*api, "-f", str(data / "HumanEval.jsonl"), "--max-new-tokens", "8",
                                "--confirm-run-unsafe-code"])
    assert "pass@1" in capsys.readouterr().out
    assert len(read_jsonl(tmp_path / "HumanEval_res.jsonl_results.jsonl")) == 2
    tasks.main_chat_multiple_choice("mmlu", [*api, "-d", str(data / "mmlu"), "--subjects", "anatomy", "--limit", "2",
                                             "--max-new-tokens", "8"])
    assert "| Average" in capsys.readouterr().out


def test_lora_flag_measures_an_adapter_without_merging(data, tiny_base, tiny_chat, tokenizer, tmp_path):
    """--lora DIR: the multiple-choice scores and the chat replies are the adapter's (checked in this process with
    qwen.lora), not the base model's."""
    from test_lora import make_adapter
    from transformers import AutoModelForCausalLM

    from qwen.chat import chat
    from qwen.lora import load_lora, use_lora

    base_adapter, _ = make_adapter(tiny_base, tmp_path / "base-lora", ["c_attn", "w2"], seed=7)
    script("evaluate_ceval", "-c", tiny_base, "-d", data / "ceval", "--subjects", "computer_network", "--limit", 2,
           "--lora", base_adapter, "--output-json", "results.json", "--no-progress", cwd=tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    adapter = load_lora(model, base_adapter)
    for sample in read_jsonl(tmp_path / "outs/ceval_eval_result/samples.jsonl"):
        with torch.no_grad(), use_lora(adapter):
            logits = model(torch.tensor([tokenizer.encode(sample["prompt"])])).logits[0, -1]
        assert sample["prediction"] == "ABCD"[int(logits[letter_ids(tokenizer, spaced=False)].argmax())]
    assert "base-lora" in json.loads((tmp_path / "results.json").read_text())["config"]["model"]

    chat_adapter, _ = make_adapter(tiny_chat, tmp_path / "chat-lora", ["c_attn", "c_proj", "w1", "w2"], seed=8)
    script("evaluate_chat_ceval", "-c", tiny_chat, "-d", data / "ceval", "--subjects", "computer_network",
           "--limit", 1, "--max-new-tokens", 10, "--lora", chat_adapter, "--no-progress", cwd=tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat).eval()
    adapter = load_lora(model, chat_adapter)
    [sample] = read_jsonl(tmp_path / "outs_chat/ceval_eval_result/samples.jsonl")
    plain, _ = chat(model, tokenizer, sample["prompt"], do_sample=False, repetition_penalty=1.0, max_new_tokens=10)
    with use_lora(adapter):
        expected, _ = chat(model, tokenizer, sample["prompt"], do_sample=False, repetition_penalty=1.0,
                           max_new_tokens=10)
    assert sample["response"] == expected != plain
