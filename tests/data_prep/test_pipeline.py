"""data_prep.pipeline and data_prep.shards: the manifest, byte-identical output for any worker count, kill and
resume, rerun of a finished run, work units."""
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, peak_rss_mib, run_prepare, write_jsonl


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


def test_work_units_cut_by_record_count_and_by_bytes(tmp_path):
    """Units depend on the input only: lists of records (here .txt files) by count and bytes; plain JSON lines as
    byte ranges that end after a newline, carrying their first line number."""
    from data_prep.pipeline import PrepareOptions, _Reading

    for i, n in enumerate([10, 10, 100, 5, 5, 5, 5]):
        (tmp_path / f"{i}.txt").write_text("x" * n)
    files = sorted(str(p) for p in tmp_path.glob("*.txt"))

    def units(**kw):
        opts = PrepareOptions(inputs=[], tokenizer="", output="", **kw)
        return [[os.path.basename(r[0]) for r in u] for u in _Reading(files, opts).units()]

    assert units(chunk_docs=3, chunk_bytes=50) == [["0.txt", "1.txt", "2.txt"], ["3.txt", "4.txt", "5.txt"], ["6.txt"]]
    assert units(chunk_docs=10, chunk_bytes=15) == [["0.txt", "1.txt"], ["2.txt"], ["3.txt", "4.txt", "5.txt"],
                                                    ["6.txt"]]
    lines = [b'{"text": "%s"}\n' % (b"y" * n) for n in (5, 40, 5, 5, 60, 5)]
    (tmp_path / "a.jsonl").write_bytes(b"".join(lines))
    opts = PrepareOptions(inputs=[], tokenizer="", output="", chunk_bytes=50)
    ranges = list(_Reading([str(tmp_path / "a.jsonl")], opts).units())
    ends = [sum(map(len, lines[:k])) for k in range(1, len(lines) + 1)]
    assert [r[3] for r in ranges] == [ends[1], ends[4], ends[5]]  # each ends at the first line end 50 bytes on
    assert [r[4] for r in ranges] == [1, 3, 6]
    opts = PrepareOptions(inputs=[], tokenizer="", output="", chunk_bytes=500, chunk_docs=2)
    assert [r[3] for r in _Reading([str(tmp_path / "a.jsonl")], opts).units()] == [ends[1], ends[3], ends[5]]


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


def test_resume_refuses_inputs_that_changed_since_the_kill(tmp_path, tokenizer_dir, corpus):
    """A file added between a kill and the rerun would be skipped (its documents taken for duplicates) if the
    rerun trusted the old fingerprint: it names what changed instead."""
    import shutil

    import pytest

    inputs = tmp_path / "in"
    shutil.copytree(corpus, inputs)
    args = [sys.executable, "-m", "data_prep", "prepare", "--input", str(inputs), "--tokenizer", tokenizer_dir,
            "--workers", "1", "--shard-size", "5000", "--chunk-docs", "16", "--progress", "log", "--output",
            str(tmp_path / "out")]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "out" / "shard-r000-00001.state.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (tmp_path / "out" / "manifest.json").exists():
        pytest.fail("the run finished before it could be killed")
    write_jsonl(inputs / "part9.jsonl", ["a new document added after the kill"])
    res = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "over other inputs (since then: added" in res.stderr and "part9.jsonl" in \
        res.stderr


def test_accounting_catches_a_lost_record(tmp_path, tokenizer_dir, texts, monkeypatch):
    """read == kept + dropped is checked against records counted where they were read, so it can fail."""
    import pytest

    from data_prep import work

    process = work.process

    def lossy(job):
        kind, n, outcomes, *rest = process(job)
        return kind, n, outcomes[:-1], *rest  # a worker that forgets a record

    monkeypatch.setattr(work, "process", lossy)
    write_jsonl(tmp_path / "a.jsonl", texts)
    with pytest.raises(RuntimeError, match="accounting error: work unit 0 had 12 records"):
        run_prepare([tmp_path / "a.jsonl"], tokenizer_dir, tmp_path / "out", dedup="none")


def test_full_disk_says_so_and_leaves_nothing_half_written(tmp_path, tokenizer_dir, corpus):
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(disk)], check=True)
    try:
        res = subprocess.run([sys.executable, "-m", "data_prep", "prepare", "--input", str(corpus), "--tokenizer",
                              tokenizer_dir, "--output", str(disk / "out"), "--workers", "1", "--shard-size", "5000",
                              "--progress", "log"], capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 5, res.stderr[-2000:]
        assert "error: no space left on the filesystem of" in res.stderr and "Traceback" not in res.stderr
        assert not [p for p in (disk / "out").iterdir() if ".tmp" in p.name]
        committed = sorted(p.name for p in (disk / "out").glob("*.state.json"))
        for state in committed:  # what was committed before the disk filled is whole
            assert (disk / "out" / state.replace(".state.json", ".bin")).exists()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_huge_document_costs_a_bounded_multiple_of_its_size(tmp_path, tokenizer_dir):
    """A 30 MB document (with --max-chars raised) through prepare: the extra peak memory stays a small multiple of
    the document (HF tokenizers alone needs ~130x, as the probe in issue 19 saw: 13.8 GB for 100 MB; gigatoken
    splits a huge document at pre-token boundaries, and the tokenizers cross-check skips documents over 64 KB)."""
    import random

    from conftest import make_doc

    rng = random.Random(0)
    doc = "\n\n".join(make_doc(rng, 200) for _ in range(24_000))[: 30 * 2**20]
    write_jsonl(tmp_path / "big.jsonl", [doc])
    write_jsonl(tmp_path / "small.jsonl", [doc[:10_000]])

    def peak_mib(name):
        return peak_rss_mib([sys.executable, "-m", "data_prep", "prepare", "--input", tmp_path / name, "--tokenizer",
                             tokenizer_dir, "--output", tmp_path / f"out-{name}", "--workers", "1", "--max-chars",
                             10**9, "--progress", "log"])

    big, small = peak_mib("big.jsonl"), peak_mib("small.jsonl")
    extra = big - small
    print(f"30 MB document: {big:.0f} vs {small:.0f} MiB peak: +{extra:.0f} MiB ({extra / 30:.1f}x)")
    assert extra < 10 * 30  # measured 4.9x
