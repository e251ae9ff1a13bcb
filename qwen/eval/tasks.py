"""The evaluation scripts' programs: each ``main_*`` is one original script, with its flags and
outputs, run through the shared backends of ``qwen.eval.run``.

Every script writes a per-item JSONL log as items finish (prompt, output, prediction, correct), so
rerunning the same command resumes an interrupted run, and ends with a table and, with
``--output-json``, a results file.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import EvalError, data, extract, prompts, subjects
from .run import (
    Backend,
    ItemLog,
    LocalBackend,
    Request,
    add_common_args,
    main_guard,
    open_backend,
    print_table,
    progress,
    run_id,
    set_seed,
    write_results,
)
from .scoring import argmax_letter, macro_average, micro_average


@dataclass
class Doc:
    doc_id: str
    subject: str
    item: dict
    prompt: str


@dataclass
class MultipleChoice:
    """One subject benchmark: where its files are, how its prompts look and how scores aggregate."""

    name: str
    read: Callable[[str, str, str], list[dict]]
    split: str  # the scored split (the few-shot rows come from "dev")
    chinese: bool
    categories: dict[str, Sequence[str]]
    macro: bool  # unweighted mean over subjects (C-Eval, CMMLU) or over questions (MMLU)
    data_hint: str

    @property
    def subjects(self) -> list[str]:
        """Every subject, in the order the original scripts go through them."""
        return list(dict.fromkeys(s for members in self.categories.values() for s in members))


BENCHMARKS = {
    "ceval": MultipleChoice(
        "ceval", data.read_ceval, "val", True, {**subjects.CEVAL_CATEGORIES, "Hard": subjects.CEVAL_HARD}, True,
        "unzip ceval-exam.zip (Hugging Face dataset ceval/ceval-exam) into data/ceval and pass -d data/ceval"),
    "mmlu": MultipleChoice(
        "mmlu", data.read_mmlu, "test", False, subjects.MMLU_CATEGORIES, False,
        "`python -m qwen.eval.data fetch mmlu --out data` writes data/mmlu/data; pass -d data/mmlu/data"),
    "cmmlu": MultipleChoice(
        "cmmlu", data.read_cmmlu, "test", True, subjects.CMMLU_CATEGORIES, True,
        "unzip cmmlu_v1_0_1.zip (Hugging Face dataset haonan-li/cmmlu) into data/cmmlu and pass -d data/cmmlu"),
}


def _subject_docs(bench: MultipleChoice, args: argparse.Namespace, build: Callable[[str, list, dict], str],
                  shots: int) -> tuple[list[Doc], dict[str, int]]:
    """Every scored item with its prompt, and each subject's full size (before --limit)."""
    if not args.eval_data_path:
        raise EvalError(f"pass -d DATA_DIR: {bench.data_hint}")
    names = args.subjects.split(",") if args.subjects else bench.subjects
    unknown = sorted(set(names) - set(bench.subjects))
    if unknown:
        raise EvalError(f"unknown {bench.name} subjects: {', '.join(unknown)}")
    data.check_subjects(bench.name, args.eval_data_path, names, ["dev", bench.split] if shots else [bench.split])
    docs, sizes = [], {}
    for subject in names:
        dev = bench.read(args.eval_data_path, subject, "dev")[:shots] if shots else []
        items = bench.read(args.eval_data_path, subject, bench.split)
        sizes[subject] = len(items)
        for index, item in enumerate(items[: args.limit]):
            docs.append(Doc(f"{subject}/{index}", subject, item, build(subject, dev, item)))
    return docs, sizes


def _multiple_choice_parser(bench: str, chat: bool) -> argparse.ArgumentParser:
    kind = "chat model, 0-shot, answer extracted from the reply" if chat else "base model, 5-shot, letter logits"
    parser = argparse.ArgumentParser(description=f"{bench} ({kind}), as the original Qwen eval/ script")
    add_common_args(parser, "Qwen/Qwen-7B-Chat" if chat else "Qwen/Qwen-7B", api=chat)
    parser.add_argument("-d", "--eval_data_path", help="the benchmark's data folder (original layout)")
    parser.add_argument("--debug", action="store_true", help="print each prompt and prediction")
    parser.add_argument("--subjects", help="comma-separated subjects (default: all)")
    parser.add_argument("--out-dir", help="per-subject CSVs and the per-item log "
                                          f"(default: {'outs_chat' if chat else 'outs'}/{bench}_eval_result)")
    if not chat:
        parser.add_argument("--max-seq-len", type=int, default=2048,
                            help="MMLU keeps the last max-seq-len - 1 tokens of a longer prompt; unused elsewhere")
        parser.add_argument("--gpu", type=int, default=0, help="accepted for compatibility; unused")
    return parser


def _report(bench: MultipleChoice, docs: list[Doc], log: ItemLog, args: argparse.Namespace, out_dir: Path,
            sizes: dict[str, int], settings: dict, started: float, csv_fields: Sequence[str]) -> dict:
    """Per-subject CSVs (the original columns plus the model's), the aggregate table and results file."""
    correct: dict[str, list[bool]] = {}
    by_subject: dict[str, list[dict]] = {}
    for doc in docs:
        record = log.done[doc.doc_id]
        correct.setdefault(doc.subject, []).append(record["correct"])
        by_subject.setdefault(doc.subject, []).append({**doc.item, **{f: record[f] for f in csv_fields}})
    for subject, rows in by_subject.items():
        with (out_dir / f"{subject}_result.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    scores = (macro_average if bench.macro else micro_average)(correct, bench.categories)
    per_subject = {s: 100 * sum(c) / len(c) for s, c in correct.items()}
    print_table(bench.name, [(k, v) for k, v in scores.items()] + [("items", len(docs))])
    result = write_results(
        args.output_json, bench.name, {**scores, "subjects": per_subject},
        {"original": sum(sizes.values()), "effective": len(docs)}, settings, started)
    log.close()
    return result


def _settings(args: argparse.Namespace, backend: Backend, **task: object) -> dict:
    """What decides the answers, recorded in the results and fingerprinted for resuming."""
    model = {k: getattr(args, k, None) for k in ("dtype", "int8", "kv_cache_int8", "window_attn")}
    return {"model": backend.name, **model, "max_new_tokens": backend.max_new_tokens, **task}


def main_multiple_choice(bench_name: str, argv: list[str] | None = None) -> None:
    """evaluate_ceval.py / evaluate_mmlu.py / evaluate_cmmlu.py (base models)."""
    def run(argv: list[str] | None) -> None:
        bench = BENCHMARKS[bench_name]
        args = _multiple_choice_parser(bench_name, chat=False).parse_args(argv)
        if bench_name == "mmlu" and not args.eval_data_path and Path("data/mmlu/data").is_dir():
            args.eval_data_path = "data/mmlu/data"
        started = time.time()
        set_seed(args.seed)
        if bench_name == "mmlu":
            build = lambda subject, dev, item: prompts.mmlu_prompt(subject, dev, item)  # noqa: E731
        else:
            build = lambda subject, dev, item: prompts.ceval_prompt(dev, item)  # noqa: E731
        docs, sizes = _subject_docs(bench, args, build, shots=5)
        backend = LocalBackend(args, chat=False)
        truncate = args.max_seq_len if bench_name == "mmlu" else None
        settings = _settings(args, backend, task=bench_name, data=str(Path(args.eval_data_path).resolve()),
                             truncate=truncate)
        out_dir = Path(args.out_dir or f"outs/{bench_name}_eval_result")
        log = ItemLog(out_dir / "samples.jsonl", run_id(settings), args.overwrite)
        pending = [d for d in docs if d.doc_id not in log.done]

        def on_batch(indices: list[int], probs: list[list[float]]) -> None:
            for index, row in zip(indices, probs, strict=True):
                doc = pending[index]
                prediction = argmax_letter(row)
                log.add({"doc_id": doc.doc_id, "subject": doc.subject, "prompt": doc.prompt,
                         "probs": dict(zip(prompts.LETTERS, row, strict=True)), "prediction": prediction,
                         "answer": doc.item["answer"], "correct": prediction == doc.item["answer"]})
                if args.debug:
                    print(f"{doc.prompt}\nprediction: {prediction}, answer: {doc.item['answer']}\n")

        backend.choice_probs([d.prompt for d in pending], not bench.chinese, args.batch_size, truncate, on_batch,
                             not args.no_progress)
        for record in log.done.values():  # the original CSV columns
            record.update({"model_output": record["prediction"], "correctness": int(record["correct"]),
                           **{f"prob_{k}": v for k, v in record["probs"].items()}})
        _report(bench, docs, log, args, out_dir, sizes, settings, started,
                ["model_output", "prob_A", "prob_B", "prob_C", "prob_D", "correctness"])

    main_guard(run, argv)


def _generate(backend: Backend, log: ItemLog, pending: list, requests: list[Request],
              record: Callable[[object, str], dict], show: bool, debug: bool = False) -> None:
    """Ask every pending item, logging each as it finishes."""
    bar = progress(len(pending), "generating", show)
    for index, text in backend.generate(requests, show):
        entry = record(pending[index], text)
        log.add(entry)
        if debug:
            print(f"{entry.get('prompt', '')}\n--> {text!r}\n")
        bar.update()
    bar.close()


def main_chat_multiple_choice(bench_name: str, argv: list[str] | None = None) -> None:
    """evaluate_chat_ceval.py / evaluate_chat_mmlu.py (chat models, zero-shot)."""
    from .choice import extract_ceval_choice, extract_mmlu_choice

    def run(argv: list[str] | None) -> None:
        bench = BENCHMARKS[bench_name]
        args = _multiple_choice_parser(bench_name, chat=True).parse_args(argv)
        started = time.time()
        set_seed(args.seed)
        chat_prompt = prompts.chat_ceval_prompt if bench_name == "ceval" else prompts.chat_mmlu_prompt
        docs, sizes = _subject_docs(bench, args, lambda s, dev, item: chat_prompt(item), shots=0)
        backend = open_backend(args, chat=True)
        settings = _settings(args, backend, task=f"chat_{bench_name}",
                             data=str(Path(args.eval_data_path).resolve()))
        out_dir = Path(args.out_dir or f"outs_chat/{bench_name}_eval_result")
        log = ItemLog(out_dir / "samples.jsonl", run_id(settings), args.overwrite)

        def judge(doc: Doc, response: str) -> dict:
            options = {letter: doc.item[letter] for letter in prompts.LETTERS}
            if bench_name == "ceval":
                prediction = extract_ceval_choice(response, doc.item["question"], options)
            else:
                prediction = extract_mmlu_choice(response, options)
            return {"doc_id": doc.doc_id, "subject": doc.subject, "prompt": doc.prompt, "response": response,
                    "prediction": prediction, "answer": doc.item["answer"],
                    "correct": prediction == doc.item["answer"]}

        pending = [d for d in docs if d.doc_id not in log.done]
        _generate(backend, log, pending, [Request(d.prompt, chat=True) for d in pending], judge,
                  not args.no_progress, args.debug)
        for doc in docs:  # re-extract stored replies too, as the original does on resume
            record = judge(doc, log.done[doc.doc_id]["response"])
            log.done[doc.doc_id].update(record, model_response=record["response"],
                                        model_output=record["prediction"], correctness=int(record["correct"]))
        _report(bench, docs, log, args, out_dir, sizes, settings, started,
                ["model_response", "model_output", "correctness"])

    main_guard(run, argv)


# ----- GSM8K ---------------------------------------------------------------------------------------------


def _gsm8k_items(args: argparse.Namespace) -> list[dict]:
    """The whole test set (the results report its size; ``--limit`` applies afterwards)."""
    if not args.sample_input_file:
        raise EvalError("pass -f GSM8K_TEST (a JSONL file, a folder with test.jsonl, or a datasets save_to_disk "
                        "folder); `python -m qwen.eval.data fetch gsm8k --out data` writes data/gsm8k/test.jsonl")
    return data.read_gsm8k(args.sample_input_file)


def main_gsm8k(chat: bool, argv: list[str] | None = None) -> None:
    """evaluate_gsm8k.py (base, 8-shot) / evaluate_chat_gsm8k.py (chat, 0- or 4-shot)."""
    def run(argv: list[str] | None) -> None:
        parser = argparse.ArgumentParser(description=f"GSM8K ({'chat' if chat else 'base'} model), as the "
                                                     "original Qwen eval/ script")
        add_common_args(parser, "Qwen/Qwen-7B-Chat" if chat else "Qwen/Qwen-7B")
        parser.add_argument("-f", "--sample-input-file", help="GSM8K test set (JSONL, or datasets save_to_disk)")
        parser.add_argument("-o", "--sample-output-file", default="gsm8k_res.jsonl",
                            help="per-item JSONL, also used to resume (default: %(default)s)")
        parser.add_argument("--debug", action="store_true", help="print each prompt and completion")
        if chat:
            parser.add_argument("--use-fewshot", action="store_true", help="4 worked examples in the message")
            parser.add_argument("--fewshot-file", help=f"their text (default: {prompts.CHAT_GSM8K_FEWSHOT_FILE.name})")
        else:
            parser.add_argument("--prompt-file", help="the 8-shot text; the original gsm8k_prompt.txt works as is "
                                                      f"(default: qwen's own, {prompts.GSM8K_PROMPT_FILE.name})")
            parser.add_argument("--answer-rule", choices=["original", "number"], default="original",
                                help="original: last run of digits, exact match (the published numbers); "
                                     "number: last signed/decimal number, as the chat script")
        args = parser.parse_args(argv)
        started = time.time()
        set_seed(args.seed)
        every_item = _gsm8k_items(args)
        items = every_item[: args.limit]
        if chat:
            fewshot = prompts.read_prompt_file(args.fewshot_file, prompts.CHAT_GSM8K_FEWSHOT_FILE) \
                if args.use_fewshot else None
            rule, build = "number", lambda q: prompts.chat_gsm8k_prompt(q, fewshot)
            ours = prompts.CHAT_GSM8K_FEWSHOT_FILE if args.use_fewshot and not args.fewshot_file else None
        else:
            fewshot = prompts.read_prompt_file(args.prompt_file, prompts.GSM8K_PROMPT_FILE)
            rule, build = args.answer_rule, lambda q: prompts.gsm8k_prompt(fewshot, q)
            ours = None if args.prompt_file else prompts.GSM8K_PROMPT_FILE
        if ours:  # the original's exemplar files are not shipped: say so before any score is read
            print(f"worked examples: qwen's own ({ours}), not the original's, so scores are not comparable "
                  f"to the published table; pass {'--fewshot-file' if chat else '--prompt-file'} with the "
                  "original's file for those", file=sys.stderr)
        backend = open_backend(args, chat=chat)
        settings = _settings(args, backend, task="chat_gsm8k" if chat else "gsm8k", rule=rule, fewshot=fewshot,
                             data=str(Path(args.sample_input_file).resolve()))
        log = ItemLog(args.sample_output_file, run_id(settings), args.overwrite)
        docs = [Doc(str(i), "gsm8k", item, build(item["question"])) for i, item in enumerate(items)]

        def judge(doc: Doc, output: str) -> dict:
            completion = output if chat else extract.cut(output, extract.GSM8K_CUT)
            gold = extract.gsm8k_gold(doc.item["answer"])
            read = extract.gsm8k_base_answer if rule == "original" else extract.gsm8k_number_answer
            prediction = read(completion)
            correct = extract.gsm8k_correct(prediction, gold, rule)
            return {"doc_id": doc.doc_id, "question": doc.item["question"], "answer": doc.item["answer"],
                    "prompt": doc.prompt, "completion": completion, "prediction": prediction, "acc": correct,
                    "correct": correct}

        pending = [d for d in docs if d.doc_id not in log.done]
        stops = () if chat else extract.GSM8K_CUT[1:]
        _generate(backend, log, pending, [Request(d.prompt, chat, stops) for d in pending], judge,
                  not args.no_progress, args.debug)
        accuracy = 100 * sum(log.done[d.doc_id]["correct"] for d in docs) / max(len(docs), 1)
        label = ("4-shot" if args.use_fewshot else "Zero-shot") if chat else "8-shot"
        print_table(f"gsm8k ({label})", [("accuracy", accuracy), ("items", len(docs))])
        write_results(args.output_json, "chat_gsm8k" if chat else "gsm8k", {"accuracy": accuracy},
                      {"original": len(every_item), "effective": len(docs)},
                      settings, started)
        log.close()

    main_guard(run, argv)


# ----- HumanEval -----------------------------------------------------------------------------------------


def main_humaneval(chat: bool, argv: list[str] | None = None) -> None:
    """evaluate_humaneval.py (base, completion) / evaluate_chat_humaneval.py (chat, instruction): writes
    the original samples file, then runs the tests in the sandbox (only with --confirm-run-unsafe-code)."""
    from . import sandbox

    def run(argv: list[str] | None) -> None:
        parser = argparse.ArgumentParser(description=f"HumanEval ({'chat' if chat else 'base'} model), as the "
                                                     "original Qwen eval/ script, scored in a sandbox")
        add_common_args(parser, "Qwen/Qwen-7B-Chat" if chat else "Qwen/Qwen-7B")
        parser.add_argument("-f", "--sample-input-file", help="HumanEval.jsonl or HumanEval.jsonl.gz "
                            "(`python -m qwen.eval.data fetch humaneval --out data`)")
        parser.add_argument("-o", "--sample-output-file", default="HumanEval_res.jsonl",
                            help="samples ({task_id, completion} lines), also used to resume (default: %(default)s)")
        parser.add_argument("--debug", action="store_true", help="print each prompt and completion")
        if not chat:
            parser.add_argument("--cut", choices=sorted(extract.HUMANEVAL_CUT), default="original",
                                help="original: cut at the first blank line or 'def ' (the published numbers); "
                                     "codex: at the next top-level statement")
        parser.add_argument("--confirm-run-unsafe-code", action="store_true",
                            help="run the model's code (in a separate process with time and memory limits)")
        parser.add_argument("--generate-only", action="store_true", help="only write the samples file")
        parser.add_argument("--score", metavar="SAMPLES", help="score an existing samples file and exit")
        parser.add_argument("--timeout", type=float, default=3.0, help="seconds per test program")
        parser.add_argument("--memory-mb", type=int, default=1024, help="memory limit per test program")
        parser.add_argument("--workers", type=int, default=2, help="test programs run at once")
        args = parser.parse_args(argv)
        started = time.time()
        set_seed(args.seed)
        if not args.sample_input_file:
            raise EvalError("pass -f HumanEval.jsonl: `python -m qwen.eval.data fetch humaneval --out data` "
                            "writes data/humaneval/HumanEval.jsonl")
        if not args.generate_only:
            sandbox.require_unsafe_confirmation(args.confirm_run_unsafe_code)
        sandbox_args = {"timeout": args.timeout, "memory_mb": args.memory_mb, "workers": args.workers}
        if args.score:
            summary = sandbox.score_file(args.score, args.sample_input_file, **sandbox_args)
            print_table("humaneval", [(k, 100 * v if k.startswith("pass@") else v) for k, v in summary.items()])
            write_results(args.output_json, "humaneval", summary, {"effective": summary["n_samples"]},
                          {"samples": args.score}, started)
            return
        problems = data.read_humaneval(args.sample_input_file)
        total = len(problems)
        problems = problems[: args.limit]
        backend = open_backend(args, chat=chat)
        rule = "chat" if chat else args.cut
        settings = _settings(args, backend, task="chat_humaneval" if chat else "humaneval", rule=rule,
                             data=str(Path(args.sample_input_file).resolve()))
        log = ItemLog(args.sample_output_file, run_id(settings), args.overwrite)

        def record(problem: dict, output: str) -> dict:
            entry = {"doc_id": problem["task_id"], "task_id": problem["task_id"]}
            if chat:
                body = extract.chat_humaneval_body(output, problem["entry_point"])
                return {**entry, "completion": body, "response": output, "prompt": problem["prompt"]}
            return {**entry, "completion": extract.cut(output, extract.HUMANEVAL_CUT[rule]),
                    "prompt": problem["prompt"]}

        pending = [p for p in problems if p["task_id"] not in log.done]
        requests = [Request(prompts.chat_humaneval_prompt(p), True) if chat
                    else Request(p["prompt"], False, extract.HUMANEVAL_CUT[rule][1:]) for p in pending]
        _generate(backend, log, pending, requests, record, not args.no_progress, args.debug)
        log.close()
        if args.generate_only:
            print(f"samples written to {args.sample_output_file}; score them with --score "
                  f"{args.sample_output_file} --confirm-run-unsafe-code")
            return
        samples = [log.done[p["task_id"]] for p in problems]
        results, summary = sandbox.score_samples({p["task_id"]: p for p in problems}, samples,
                                                 progress=not args.no_progress, **sandbox_args)
        sandbox.write_jsonl(f"{args.sample_output_file}_results.jsonl", results)
        print_table("humaneval", [("pass@1", 100 * summary["pass@1"]), ("items", len(problems))])
        write_results(args.output_json, "chat_humaneval" if chat else "humaneval", summary,
                      {"original": total, "effective": len(problems)}, settings, started)

    main_guard(run, argv)


# ----- tool use (ReAct) ----------------------------------------------------------------------------------


def main_plugin(default_data_dir: str | Path, argv: list[str] | None = None) -> None:
    """evaluate_plugin.py: ReAct tool selection, tool input (ROUGE-L) and false positives."""
    import json

    from .react import plugin_metrics

    def run(argv: list[str] | None) -> None:
        parser = argparse.ArgumentParser(description="ReAct tool-use benchmark (chat model), as the original "
                                                     "Qwen eval/evaluate_plugin.py")
        add_common_args(parser, "Qwen/Qwen-7B-Chat")
        parser.add_argument("--data-dir", default=str(default_data_dir),
                            help="folder of the job files and their .cache files (default: %(default)s)")
        parser.add_argument("--eval-react-positive", action="store_true", help="jobs that need a tool call")
        parser.add_argument("--eval-react-positive-filename", default="exam_plugin_v20231206_react_positive.jsonl")
        parser.add_argument("--eval-react-negative", action="store_true", help="jobs that must not call a tool")
        parser.add_argument("--eval-react-negative-filename", default="exam_plugin_v20231206_react_negative.jsonl")
        parser.add_argument("--eval-hfagent", action="store_true", help="not supported (see eval/README.md)")
        args = parser.parse_args(argv)
        if args.eval_hfagent:
            raise EvalError("--eval-hfagent ran transformers' old Agent benchmark (transformers.tools), which "
                            "transformers removed in v4.52; it cannot run on transformers 5. See eval/README.md.")
        if not (args.eval_react_positive or args.eval_react_negative):
            raise EvalError("nothing to do: pass --eval-react-positive and/or --eval-react-negative")
        started = time.time()
        set_seed(args.seed)
        backend = open_backend(args, chat=True)
        sections: dict[str, list[dict] | None] = {"positive": None, "negative": None}
        counts = {}
        for kind in sections:
            if not getattr(args, f"eval_react_{kind}"):
                continue
            path = Path(args.data_dir) / getattr(args, f"eval_react_{kind}_filename")
            if not path.is_file():
                raise EvalError(f"{path} not found: the original job files (exam_plugin_v20231206_react_*.jsonl) "
                                "are not public outside the original download; pass --data-dir with your copy")
            jobs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            jobs = jobs[: args.limit]
            counts[kind] = len(jobs)
            settings = _settings(args, backend, task=f"plugin_{kind}", data=str(path.resolve()))
            # Generations are cached next to the data, as the original's <file>.cache.
            log = ItemLog(f"{path}.cache", run_id(settings), args.overwrite)
            docs = [Doc(str(i), kind, job, job["prompt"]) for i, job in enumerate(jobs)]
            pending = [d for d in docs if d.doc_id not in log.done]
            # Generation may stop at the observation: the scores read only what comes before it.
            _generate(backend, log, pending, [Request(d.prompt, True, ("Observation:",)) for d in pending],
                      lambda doc, text: {"doc_id": doc.doc_id, **doc.item, "gen": [text]}, not args.no_progress)
            sections[kind] = [log.done[d.doc_id] for d in docs]
            log.close()
        tokenizer = _token_strings(args, backend)
        scores = plugin_metrics(sections["positive"], sections["negative"], tokenizer)
        print(json.dumps(scores, indent=2))
        rows = [(f"{section}.{name}", 100 * value if "rate" in name else value)
                for section, values in scores.items() for name, value in values.items()]
        print_table("plugin", rows)
        write_results(args.output_json, "plugin", scores, counts, {"model": backend.name}, started)

    main_guard(run, argv)


def _token_strings(args: argparse.Namespace, backend: Backend) -> Callable[[str], list[str]]:
    """Qwen token strings of a text, for the ROUGE-L of tool inputs (the vocabulary ships with qwen, so
    this works when the model sits behind a server too)."""
    if isinstance(backend, LocalBackend):
        tokenizer = backend.tokenizer
    else:
        from qwen.tokenizer import QWenTokenizer

        tokenizer = QWenTokenizer()

    def tokens(text: str) -> list[str]:
        return [t.decode("utf-8", "backslashreplace") if isinstance(t, bytes) else t for t in tokenizer.tokenize(text)]

    return tokens
