"""data_prep: readers, cleaning, filters, dedup, bad input, determinism, resume, MPI ranks, megatron read-back."""
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_prep.clean import FilterConfig, normalize
from data_prep.pipeline import PrepareOptions, prepare

from conftest import make_doc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
@pytest.fixture(scope="session")
def tokenizer_dir(tiny_tokenizer):
    return tiny_tokenizer


def run_prepare(inputs, tokenizer, out, **kw):
    kw.setdefault("progress", False)
    return prepare(PrepareOptions(inputs=[str(i) for i in inputs], tokenizer=tokenizer, output=str(out), **kw))


def read_back(out) -> list[list[int]]:
    """Every document of every shard, through megatron-core's own reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    man = json.load(open(os.path.join(out, "manifest.json")))
    docs = []
    for shard in man["shards"]:
        ds = IndexedDataset(os.path.join(out, shard["path"]))
        docs += [ds[i].tolist() for i in range(len(ds))]
    return docs


def expected_ids(tokenizer_dir, texts):
    from data_prep.tokenizer import eod_id, load

    tok = load(tokenizer_dir)
    eod = eod_id(tok, tokenizer_dir)
    return [tok.encode(normalize(t), add_special_tokens=False).ids + [eod] for t in texts]


def write_jsonl(path, texts, key="text"):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t, "id": 1}) + "\n")


def assert_accounting(man):
    c = man["counts"]
    assert c["documents_read"] == c["documents_kept"] + sum(c["dropped"].values())


# ----------------------------------------------------------------------------------------------- readers
@pytest.fixture(scope="module")
def texts():
    rng = random.Random(1)
    return [make_doc(rng) for _ in range(12)]


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


def test_manifest_lists_shards_tokenizer_options_and_hashes(tmp_path, tokenizer_dir, texts):
    write_jsonl(tmp_path / "a.jsonl", texts * 20)
    man = run_prepare([tmp_path / "a.jsonl"], tokenizer_dir, tmp_path / "out", shard_tokens=2000, chunk_docs=16,
                      dedup="none")
    assert len(man["shards"]) > 1
    from common.files import file_sha256

    for s in man["shards"]:
        assert file_sha256(str(tmp_path / "out" / (s["path"] + ".bin"))) == s["bin_sha256"]
    assert sum(s["tokens"] for s in man["shards"]) == man["counts"]["tokens"]
    from data_prep.tokenizer import load

    assert man["tokenizer"]["vocab_size"] == load(tokenizer_dir).get_vocab_size(with_added_tokens=True)
    assert man["options"]["dedup"] == "none"
    assert os.path.basename(man["tokenizer"]["path"]) == "tokenizer.json"


def test_uint16_for_small_vocab_int32_for_large():
    from data_prep.indexed import token_dtype

    assert token_dtype(32000) == np.uint16 and token_dtype(128256) == np.int32


# ----------------------------------------------------------------------------------------------- cleaning
def test_normalize_nfc_control_chars_whitespace():
    assert normalize("Cafe\u0301\x00 \x07  bar\t\tbaz  \n\n\n\nend\r\n") == "Caf\u00e9 bar baz\n\nend"
    # the ASCII fast path and the Unicode path agree
    assert normalize("  a\x01 \x7f b \n\n\n\n\n\nc\x0b") == normalize("  a\x01 \x7f b \n\n\n\n\n\nc\x0b\u00e9")[:-1] == "a b\n\nc"
    assert normalize("x\u00a0\u3000y\x85 ") == "x y"


def test_collapse_spaces_fast_path_equals_split_join():
    """The str.strip fast path must give exactly what per-line split/join gives, and it may only be taken when
    _OTHER_SPACE knows every whitespace character that survives control-character removal."""
    import random
    import sys

    from data_prep.clean import _CONTROL, _OTHER_SPACE, _collapse_spaces, _collapse_spaces_keep_indent

    others = {chr(c) for c in range(sys.maxunicode + 1)
              if chr(c).isspace() and chr(c) not in " \t\n\r" and not _CONTROL.match(chr(c))}
    assert others and all(_OTHER_SPACE.match(c) for c in others)
    rng = random.Random(0)
    for alphabet in (" \t\nab", " \t\nab\u00e9", " \t\nab\u00a0\u2028\u3000\u2009"):
        for _ in range(5000):
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
            assert _collapse_spaces(s) == "\n".join(" ".join(line.split()) for line in s.split("\n")), repr(s)
            indented = "\n".join(line[:len(line) - len(line.lstrip())] + " ".join(line.split()) if line.strip()
                                 else "" for line in s.split("\n"))
            assert _collapse_spaces_keep_indent(s) == indented, repr(s)


def test_keep_indent_keeps_code_indentation_end_to_end(tmp_path, tokenizer_dir):
    from data_prep.cli import main

    src = "\n\ndef f(x):\n    if x:   # note \n\treturn  x\t\n\n\n\n   \nclass A:\r\n        pass\u00a0\u00a0y\n"
    assert normalize(src) == "def f(x):\nif x: # note\nreturn x\n\nclass A:\npass y"
    kept = normalize(src, keep_indent=True)
    assert kept == "def f(x):\n    if x: # note\n\treturn x\n\nclass A:\n        pass y"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text(src)
    assert main(["prepare", "--input", str(tmp_path / "src"), "--text-suffix", ".py", "--keep-indent",
                 "--tokenizer", tokenizer_dir, "--output", str(tmp_path / "out"), "--progress", "log"]) == 0
    from data_prep.tokenizer import eod_id, load

    tok = load(tokenizer_dir)
    assert read_back(tmp_path / "out") == [tok.encode(kept, add_special_tokens=False).ids
                                           + [eod_id(tok, tokenizer_dir)]]
    man = json.load(open(tmp_path / "out" / "manifest.json"))
    assert man["options"]["filters"]["keep_indent"] is True


def test_train_tokenizer_cli_sees_the_same_normalisation(tmp_path):
    """train-tokenizer --keep-indent learns indentation merges; without it, it never sees runs of spaces."""
    from data_prep.cli import main
    from data_prep.tokenizer import load

    rng = random.Random(3)
    (tmp_path / "src").mkdir()
    for i in range(40):
        body = "\n".join(f"{' ' * 4 * rng.randint(1, 3)}x{j} = y{j}" for j in range(30))
        (tmp_path / "src" / f"m{i}.py").write_text(f"def f{i}():\n{body}\n")
    for flags, name in (([], "plain"), (["--keep-indent"], "indent")):
        assert main(["train-tokenizer", "--input", str(tmp_path / "src"), "--text-suffix", ".py", "--vocab-size",
                     "300", "--output", str(tmp_path / name), *flags]) == 0
    line = "\n            x1 = y1"
    plain, indent = (len(load(str(tmp_path / n)).encode(line, add_special_tokens=False).ids)
                     for n in ("plain", "indent"))
    assert indent < plain - 4, (indent, plain)


@pytest.mark.parametrize("text, cfg, reason", [
    ("", FilterConfig(), "empty"),
    ("short", FilterConfig(min_chars=10), "too_short"),
    ("x" * 101, FilterConfig(max_chars=100), "too_long"),
    ("a b c", FilterConfig(min_words=5), "too_few_words"),
    ("1 2 3 4 5 six", FilterConfig(min_alpha_word_fraction=0.8), "low_alpha_words"),
    ("a b c d e", FilterConfig(min_mean_word_length=3), "mean_word_length"),
    ("supercalifragilistic words", FilterConfig(max_mean_word_length=10), "mean_word_length"),
    ("# # # hello world", FilterConfig(max_symbol_ratio=0.1), "symbol_ratio"),
    ("same\nsame\nsame\nother", FilterConfig(max_duplicate_line_fraction=0.3), "repeated_lines"),
])
def test_each_filter_drops_with_its_reason(text, cfg, reason):
    from data_prep.clean import clean

    assert clean(text, cfg) == (None, reason)
    off = FilterConfig(min_chars=None, max_chars=None)
    if reason != "empty":
        assert clean(text, off)[1] is None  # every filter can be switched off


def test_gopher_preset_keeps_prose_drops_junk(tmp_path, tokenizer_dir):
    rng = random.Random(3)
    good = [make_doc(rng, 80) for _ in range(5)]
    junk = ["### ### ### ... " * 30, "12 34 56 78 " * 30]
    write_jsonl(tmp_path / "a.jsonl", good + junk)
    man = run_prepare([tmp_path / "a.jsonl"], tokenizer_dir, tmp_path / "out", filters=FilterConfig.gopher())
    assert man["counts"]["documents_kept"] == 5
    assert sum(man["counts"]["dropped"].values()) == 2


# ----------------------------------------------------------------------------------------------- dedup
def test_exact_dedup_across_files_first_occurrence_wins(tmp_path, tokenizer_dir, texts):
    write_jsonl(tmp_path / "a.jsonl", texts[:6])
    write_jsonl(tmp_path / "b.jsonl", [texts[0] + "  ", texts[7], texts[2]])  # same after normalisation
    man = run_prepare([tmp_path], tokenizer_dir, tmp_path / "out")
    assert man["counts"]["dropped"] == {"exact_duplicate": 2}
    assert read_back(tmp_path / "out") == expected_ids(tokenizer_dir, texts[:6] + [texts[7]])


def test_near_dedup_catches_90_percent_copy_and_keeps_distinct(tmp_path, tokenizer_dir):
    rng = random.Random(5)
    originals = [make_doc(rng, 300) for _ in range(8)]
    words = originals[0].split(" ")
    keep = len(words) * 9 // 10  # 90% of the text shared, the last 10% rewritten (Jaccard of 5-grams ~0.8)
    near_copy = " ".join(words[:keep] + [f"new{i}" for i in range(len(words) - keep)])
    write_jsonl(tmp_path / "a.jsonl", originals + [near_copy])
    man = run_prepare([tmp_path / "a.jsonl"], tokenizer_dir, tmp_path / "out", dedup="near",
                      near_threshold=0.7)
    assert man["counts"]["dropped"] == {"near_duplicate": 1}
    assert man["counts"]["documents_kept"] == 8  # every distinct document survives
    man_exact = run_prepare([tmp_path / "a.jsonl"], tokenizer_dir, tmp_path / "out2", dedup="exact")
    assert man_exact["counts"]["documents_kept"] == 9


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


def test_work_units_cut_by_record_count_and_by_bytes():
    from data_prep.pipeline import _chunks
    from data_prep.readers import Record

    recs = [Record("f", i, text="x" * n) for i, n in enumerate([10, 10, 100, 5, 5, 5, 5])]
    sizes = [[r.line for r in c] for c in _chunks(iter(recs), max_records=3, max_bytes=50)]
    assert sizes == [[0, 1, 2], [3, 4, 5], [6]]
    sizes = [[r.line for r in c] for c in _chunks(iter(recs), max_records=10, max_bytes=15)]
    assert sizes == [[0, 1], [2], [3, 4, 5], [6]]


def test_unreadable_or_missing_path_is_a_clear_error(tmp_path, tokenizer_dir):
    res = subprocess.run([sys.executable, "-m", "data_prep", "prepare", "--input", str(tmp_path / "nope.jsonl"),
                          "--tokenizer", tokenizer_dir, "--output", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "nope.jsonl: no such file or directory" in res.stderr


# ----------------------------------------------------------------------------------------------- scale out
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(7)
    d = tmp_path_factory.mktemp("corpus")
    docs = [make_doc(rng, rng.randint(20, 200)) for _ in range(1500)]
    docs += docs[:100]  # duplicates across files
    rng.shuffle(docs)
    for i in range(6):
        write_jsonl(d / f"part{i}.jsonl", docs[i::6])
    return d


def _bytes_of(out) -> dict:
    return {f: (out / f).read_bytes() for f in sorted(os.listdir(out)) if f.endswith((".bin", ".idx", ".json"))
            and not f.startswith(".")}


def test_output_identical_whatever_the_worker_count(tmp_path, tokenizer_dir, corpus):
    run_prepare([corpus], tokenizer_dir, tmp_path / "w1", workers=1, shard_tokens=20000, chunk_docs=64)
    run_prepare([corpus], tokenizer_dir, tmp_path / "w2", workers=2, shard_tokens=20000, chunk_docs=64)
    # 6 workers: past THREADS_PER_PROCESS, so 2 forkserver processes of 3 threads each
    run_prepare([corpus], tokenizer_dir, tmp_path / "w6", workers=6, shard_tokens=20000, chunk_docs=64)
    a, b, c = _bytes_of(tmp_path / "w1"), _bytes_of(tmp_path / "w2"), _bytes_of(tmp_path / "w6")
    assert len(a) > 4 and a == b == c


def test_sigkill_mid_run_then_rerun_is_byte_identical(tmp_path, tokenizer_dir, corpus):
    args = [sys.executable, "-m", "data_prep", "prepare", "--input", str(corpus), "--tokenizer", tokenizer_dir,
            "--workers", "2", "--shard-size", "5000", "--chunk-docs", "16", "--progress", "log"]
    subprocess.run(args + ["--output", str(tmp_path / "ref")], check=True, capture_output=True, cwd=ROOT)
    out = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--output", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "shard-r000-00002.state.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    committed = len(list(out.glob("*.state.json")))
    assert committed >= 2
    res = subprocess.run(args + ["--output", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "resuming after" in res.stderr
    assert _bytes_of(out) == _bytes_of(tmp_path / "ref")


def test_rerun_of_a_finished_run_verifies_and_changes_nothing(tmp_path, tokenizer_dir, corpus):
    """The same command again on a finished output (README command 1 run twice) succeeds, re-tokenizes
    nothing, and leaves every byte as it was, empty-file count included."""
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "empty.jsonl").write_text("")
    inputs = [corpus, tmp_path / "extra"]
    first = run_prepare(inputs, tokenizer_dir, tmp_path / "out", shard_tokens=20000, chunk_docs=64)
    assert first["counts"]["empty_files"] == 1 and len(first["shards"]) > 1
    before = _bytes_of(tmp_path / "out")
    again = run_prepare(inputs, tokenizer_dir, tmp_path / "out", shard_tokens=20000, chunk_docs=64)
    assert again == first and _bytes_of(tmp_path / "out") == before


def test_two_mpi_ranks_plus_merge_equal_a_single_process(tmp_path, tokenizer_dir, corpus):
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable))
    if mpiexec is None:
        pytest.fail("mpiexec not found next to the Python interpreter: the mpich wheel is in requirements.txt")
    base = ["-m", "data_prep", "prepare", "--input", str(corpus), "--tokenizer", tokenizer_dir,
            "--workers", "1", "--shard-size", "20000", "--progress", "log"]
    subprocess.run([sys.executable, *base, "--output", str(tmp_path / "single")], check=True, cwd=ROOT,
                   capture_output=True)
    res = subprocess.run([mpiexec, "-n", "2", sys.executable, *base, "--output", str(tmp_path / "mpi")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "mpi").glob("manifest-r*.json")) == \
        ["manifest-r000.json", "manifest-r001.json"]
    res = subprocess.run([sys.executable, "-m", "data_prep", "merge", "--output", str(tmp_path / "mpi")], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    single, merged = read_back(tmp_path / "single"), read_back(tmp_path / "mpi")
    assert merged == single  # cross-rank duplicates removed by merge: same tokens, same order
    man = json.load(open(tmp_path / "mpi" / "manifest.json"))
    assert man["counts"]["dropped"]["exact_duplicate"] == 100
    assert_accounting(man)
    subprocess.run([sys.executable, "-m", "data_prep", "merge", "--output", str(tmp_path / "mpi"), "--into",
                    "merged"], check=True, cwd=ROOT, capture_output=True)
    assert read_back(tmp_path / "mpi") == single
