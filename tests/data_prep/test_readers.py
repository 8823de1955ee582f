"""data_prep.readers: every input format through megatron's reader; bad input counted or refused, naming the file."""
import gzip
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, assert_accounting, expected_ids, read_back, run_prepare, write_jsonl


def _write_format(fmt: str, d, texts):
    d.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        write_jsonl(d / "a.jsonl", texts)
    elif fmt == "jsonl.gz":
        write_jsonl(d / "a.jsonl.gz", texts)
    elif fmt == "jsonl.zst":
        import zstandard

        data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
        (d / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), d / "a.parquet", row_group_size=5)
    elif fmt == "txt-file":
        for i, t in enumerate(texts):
            (d / f"{i:03d}.txt").write_text(t)
    elif fmt == "txt-block":
        (d / "all.txt").write_text("\n\n".join(t.replace("\n", " ") for t in texts) + "\n")
    elif fmt == "hf-saved":
        import datasets

        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(d / "saved"))
    elif fmt == "arrow":
        import pyarrow as pa

        table = pa.table({"text": texts})
        with pa.OSFile(str(d / "a.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt-file", "txt-block",
                                 "hf-saved", "arrow"])
def test_every_reader_round_trips_through_megatron(tmp_path, tokenizer_dir, texts, fmt):
    _write_format(fmt, tmp_path / "in", texts)
    man = run_prepare([tmp_path / "in"], tokenizer_dir, tmp_path / "out", txt_mode="block" if fmt == "txt-block"
                      else "file")
    want = [t.replace("\n", " ") for t in texts] if fmt == "txt-block" else texts
    assert read_back(tmp_path / "out") == expected_ids(tokenizer_dir, want)
    assert man["counts"]["documents_kept"] == len(texts)
    assert_accounting(man)


# ----------------------------------------------------------------------------------------------- bad input
@pytest.fixture()
def bad_inputs(tmp_path, texts):
    d = tmp_path / "bad"
    d.mkdir()
    lines = [json.dumps({"text": texts[0]}), "{not json", json.dumps({"other": 1}), json.dumps({"text": 5}),
             json.dumps({"text": "nul\x00byte " + texts[1]})]
    (d / "a.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff utf8"}\n')
    (d / "empty.jsonl").write_bytes(b"")
    big = "word " * (50 * 2**20 // 5)  # a 50 MB single document
    (d / "big.jsonl").write_text(json.dumps({"text": big}) + "\n")
    data = gzip.compress(("".join(json.dumps({"text": t}) + "\n" for t in texts[2:10])).encode())
    (d / "trunc.jsonl.gz").write_bytes(data[: len(data) * 2 // 3])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), d / "nocol.parquet")
    return d


def test_bad_inputs_are_counted_skips(tmp_path, tokenizer_dir, bad_inputs):
    man = run_prepare([bad_inputs], tokenizer_dir, tmp_path / "out")
    dropped = man["counts"]["dropped"]
    assert dropped["bad_json"] == 1 and dropped["bad_text_field"] == 2 and dropped["bad_utf8"] == 1
    assert dropped["too_long"] == 1 and dropped["truncated_file"] == 1 and dropped["missing_text_column"] == 1
    assert man["counts"]["empty_files"] == 1
    assert_accounting(man)
    docs = read_back(tmp_path / "out")
    assert len(docs) == man["counts"]["documents_kept"] >= 2  # the good line, the NUL one, the gz prefix
    from data_prep.tokenizer import load

    assert "\x00" not in load(tokenizer_dir).decode(docs[1])


@pytest.mark.parametrize("name, content, message", [
    ("a.jsonl", b'{"text": "ok"}\n{broken\n', "a.jsonl:2: bad json"),
    ("a.jsonl", b'{"other": 1}\n', "a.jsonl:1: bad text field"),
    ("a.jsonl", b'{"text": "\xff"}\n', "a.jsonl:1: bad utf8"),
    ("e.jsonl", b"", "e.jsonl: empty file"),
])
def test_strict_mode_errors_name_file_and_line(tmp_path, tokenizer_dir, name, content, message):
    (tmp_path / name).write_bytes(content)
    from data_prep.readers import InputError

    with pytest.raises(InputError, match=message):
        run_prepare([tmp_path / name], tokenizer_dir, tmp_path / "out", strict=True)


def test_strict_truncated_gzip_and_missing_column(tmp_path, tokenizer_dir, bad_inputs):
    from data_prep.readers import InputError

    with pytest.raises(InputError, match="trunc.jsonl.gz:.*truncated"):
        run_prepare([bad_inputs / "trunc.jsonl.gz"], tokenizer_dir, tmp_path / "o1", strict=True)
    with pytest.raises(InputError, match="nocol.parquet: no column 'text'.*--text-key"):
        run_prepare([bad_inputs / "nocol.parquet"], tokenizer_dir, tmp_path / "o2", strict=True)


def test_excluded_directories_are_not_walked_but_other_files_stay(tmp_path):
    from data_prep import readers

    for rel in ("a.txt", "site-packages/b.txt", "deep/site-packages/c.txt", "keep/d.txt", "keep/e.log.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    walked = []
    real_walk = os.walk
    readers.os.walk = lambda p: (walked.append(r) or (r, d, f) for r, d, f in real_walk(p))
    try:
        files = readers.expand_inputs([str(tmp_path), str(tmp_path / "a.txt")],
                                      exclude=("*/site-packages/*", "*/keep/*.log.txt"))
    finally:
        readers.os.walk = real_walk
    assert [os.path.relpath(f, tmp_path) for f in files] == ["a.txt", "keep/d.txt"]  # a.txt once
    assert not any("site-packages" in w for w in walked) and str(tmp_path / "keep") in walked


def test_unreadable_or_missing_path_is_a_clear_error(tmp_path, tokenizer_dir):
    res = subprocess.run([sys.executable, "-m", "data_prep", "prepare", "--input", str(tmp_path / "nope.jsonl"),
                          "--tokenizer", tokenizer_dir, "--output", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "nope.jsonl: no such file or directory" in res.stderr
