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


# ------------------------------------------------------------------------------------------ edge cases (issue 19)
def test_a_utf8_byte_order_mark_is_not_a_bad_record(tmp_path, tokenizer_dir, texts):
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"text": t}) + "\n" for t in texts[:3])
                                       .encode())
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbf" + texts[3].encode())
    man = run_prepare([tmp_path], tokenizer_dir, tmp_path / "out")
    assert man["counts"]["dropped"] == {} and man["counts"]["documents_kept"] == 4
    assert read_back(tmp_path / "out") == expected_ids(tokenizer_dir, texts[:4])


@pytest.mark.parametrize("where", ["mid-frame", "last bytes", "frame boundary"])
def test_a_truncated_zst_is_detected(tmp_path, tokenizer_dir, texts, where):
    import zstandard

    cctx = zstandard.ZstdCompressor()
    lines = ["".join(json.dumps({"text": t + f" {i}"}) + "\n" for i, t in enumerate(texts * 30))]
    data = lines[0].encode()
    frames = [cctx.compress(data[: len(data) // 2]), cctx.compress(data[len(data) // 2:])]
    blob = b"".join(frames)
    cut = {"mid-frame": len(frames[0]) // 2, "last bytes": len(blob) - 3,
           # a cut between frames, inside the second one's header: no frame is complete past the first
           "frame boundary": len(frames[0]) + 4}[where]
    (tmp_path / "a.jsonl.zst").write_bytes(blob[:cut])
    from data_prep.readers import InputError

    with pytest.raises(InputError, match="a.jsonl.zst:.*truncated"):
        run_prepare([tmp_path / "a.jsonl.zst"], tokenizer_dir, tmp_path / "o1", strict=True)
    write_jsonl(tmp_path / "b.jsonl", texts[:1])  # something to keep: the damaged file may decode to nothing
    man = run_prepare([tmp_path / "a.jsonl.zst", tmp_path / "b.jsonl"], tokenizer_dir, tmp_path / "o2")
    assert man["counts"]["dropped"].get("truncated_file") == 1


def test_a_json_array_file_is_read_record_by_record(tmp_path, tokenizer_dir, texts):
    (tmp_path / "a.json").write_text(json.dumps([{"text": t} for t in texts[:5]] + [{"other": 1}], indent=2))
    man = run_prepare([tmp_path / "a.json"], tokenizer_dir, tmp_path / "out")
    assert man["counts"]["documents_kept"] == 5 and man["counts"]["dropped"] == {"bad_text_field": 1}
    assert read_back(tmp_path / "out") == expected_ids(tokenizer_dir, texts[:5])


def test_links_that_loop_are_named_or_not_followed(tmp_path, tokenizer_dir, texts):
    from data_prep.readers import InputError, expand_inputs

    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "sub" / "a.jsonl", texts[:2])
    os.symlink(d, d / "sub" / "loop")  # a directory link back up: a recursive glob would never end
    files = expand_inputs([str(d / "**" / "*.jsonl")])
    assert files == [str(d / "sub" / "a.jsonl")]
    assert expand_inputs([str(d)]) == files
    os.symlink("self.jsonl", d / "self.jsonl")  # a file link to itself
    with pytest.raises(InputError, match="self.jsonl: symbolic link loop"):
        expand_inputs([str(d)])


def test_a_parquet_without_the_text_column_counts_every_row(tmp_path, tokenizer_dir, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [f"row {i}" for i in range(37)]}), tmp_path / "a.parquet", row_group_size=10)
    write_jsonl(tmp_path / "b.jsonl", texts[:1])
    man = run_prepare([tmp_path], tokenizer_dir, tmp_path / "out")
    assert man["counts"]["dropped"] == {"missing_text_column": 37}
    assert_accounting(man)


def test_drops_say_where_and_a_run_keeping_nothing_fails(tmp_path, tokenizer_dir, texts, caplog):
    lines = [json.dumps({"text": texts[0]})] + ["{broken"] * 8 + [json.dumps({"txt": "x"})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING", logger="data_prep"):
        man = run_prepare([tmp_path / "a.jsonl"], tokenizer_dir, tmp_path / "out")
    a = str(tmp_path / "a.jsonl")
    assert man["drop_examples"] == {"bad_json": [f"{a}:{i}" for i in range(2, 7)], "bad_text_field": [f"{a}:10"]}
    assert f"dropped {a}:2: bad json" in caplog.text and f"{a}:7" not in caplog.text  # the first 5 per reason
    (tmp_path / "b.jsonl").write_text("{broken\n" + json.dumps({"txt": "x"}) + "\n")
    res = subprocess.run([sys.executable, "-m", "data_prep", "prepare", "--input", str(tmp_path / "b.jsonl"),
                          "--tokenizer", tokenizer_dir, "--output", str(tmp_path / "o2")], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 2 and "no document kept: 2 read" in res.stderr and "bad_json" in res.stderr
