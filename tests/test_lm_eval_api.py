"""lm-eval-harness through our server: ``local-completions`` scores multiple choice with echoed prompt
logprobs exactly as its ``hf`` backend does on the same folder, and ``local-chat-completions`` runs a
generation task. Local JSON tasks, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import openai
import pytest

lm_eval = pytest.importorskip("lm_eval")

MODEL = "tiny"
QUESTIONS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Berlin", "Madrid"], "answer": 0},
    {"question": "2 + 2 =", "choices": ["3", "4", "5", "22"], "answer": 1},
    {"question": "The sky is", "choices": ["green", "red", "blue", "plaid"], "answer": 2},
]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        "task: qwen_tiny_mc\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n")
    (folder / "gen.yaml").write_text(
        "task: qwen_tiny_gen\n" + common + "output_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: "{{choices[answer]}}"\n'
        'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")
    return folder


@pytest.fixture(scope="module")
def server(api_server):
    return api_server


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", "none")
    os.environ.pop("HF_ENDPOINT", None)


def evaluate(tasks: Path, task: str, model: str, model_args: str, **kw) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=[task], log_samples=True,
                           task_manager=TaskManager(include_path=str(tasks)), **kw)


def choice_loglikelihoods(results: dict, task: str) -> list[list[float]]:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[resp[0][0] for resp in s["resps"]] for s in samples]


def test_local_completions_scores_like_the_hf_backend(tasks, server, tiny_chat):
    import qwen  # noqa: F401  (lm-eval's hf backend then loads the folder with qwen's classes)

    api = evaluate(tasks, "qwen_tiny_mc", "local-completions",
                   f"model={MODEL},base_url={server.url}/v1/completions,num_concurrent=2,max_retries=1")
    hf = evaluate(tasks, "qwen_tiny_mc", "hf", f"pretrained={tiny_chat},trust_remote_code=True", device="cpu")
    api_ll, hf_ll = choice_loglikelihoods(api, "qwen_tiny_mc"), choice_loglikelihoods(hf, "qwen_tiny_mc")
    assert len(api_ll) == len(QUESTIONS) and all(len(row) == 4 for row in api_ll)
    for api_row, hf_row in zip(api_ll, hf_ll, strict=True):
        assert api_row == pytest.approx(hf_row, abs=1e-3)
    assert api["results"]["qwen_tiny_mc"]["acc,none"] == hf["results"]["qwen_tiny_mc"]["acc,none"]


def test_local_chat_completions_runs_a_generation_task(tasks, server):
    results = evaluate(tasks, "qwen_tiny_gen", "local-chat-completions",
                       f"model={MODEL},base_url={server.url}/v1/chat/completions,max_retries=1",
                       apply_chat_template=True)
    samples = sorted(results["samples"]["qwen_tiny_gen"], key=lambda s: s["doc_id"])
    assert len(samples) == len(QUESTIONS)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    for sample, question in zip(samples, QUESTIONS, strict=True):
        # what the model was given: the task's prompt as one user message; what came back: the server's own
        # greedy reply to that message under the task's stop and length
        (context,), kwargs = sample["arguments"][0]
        messages = json.loads(context)
        assert messages == [{"role": "user", "content": f"Q: {question['question']}\nA:"}]
        own = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, stop=kwargs["until"],
                                             max_tokens=kwargs["max_gen_toks"]).choices[0].message.content
        assert sample["resps"][0][0] == own
        assert sample["exact_match"] == float(sample["filtered_resps"][0] == question["choices"][question["answer"]])
    assert "exact_match,none" in results["results"]["qwen_tiny_gen"]
