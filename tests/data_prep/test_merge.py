"""data_prep.merge: MPI ranks + merge equal one process (exact dedup made global)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, assert_accounting, read_back

pytestmark = pytest.mark.slow


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


@pytest.fixture(scope="module")
def near_corpus(tmp_path_factory):
    """Six files; light copies (near duplicates) and exact copies of the first files' documents in the last
    files, so that with 2 or 4 ranks most duplicates are cross-rank."""
    import random

    from conftest import make_doc, write_jsonl
    from test_dedup import variant

    rng = random.Random(11)
    d = tmp_path_factory.mktemp("near")
    docs = [[make_doc(rng, 120) for _ in range(40)] for _ in range(6)]
    for i in range(3, 6):
        docs[i] += [variant(rng, docs[i - 3][k], 100) for k in range(0, 40, 4)] + docs[i - 3][1:4]
        rng.shuffle(docs[i])
    for i, part in enumerate(docs):
        write_jsonl(d / f"part{i}.jsonl", part)
    return d


@pytest.mark.parametrize("world", [2, 4])
def test_near_duplicates_across_ranks_match_one_process(tmp_path, tokenizer_dir, near_corpus, world):
    base = ["-m", "data_prep", "prepare", "--input", str(near_corpus), "--tokenizer", tokenizer_dir, "--workers",
            "1", "--shard-size", "4000", "--dedup", "near", "--near-threshold", "0.7", "--progress", "log"]
    res = subprocess.run([sys.executable, *base, "--output", str(tmp_path / "single")], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    for rank in range(world):
        res = subprocess.run([sys.executable, *base, "--output", str(tmp_path / "ranks"), "--rank", str(rank),
                              "--world-size", str(world)], cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "data_prep", "merge", "--output", str(tmp_path / "ranks")],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    single = json.load(open(tmp_path / "single" / "manifest.json"))["counts"]
    merged = json.load(open(tmp_path / "ranks" / "manifest.json"))["counts"]
    assert single["dropped"]["near_duplicate"] >= 25 and single["dropped"]["exact_duplicate"] == 9
    assert merged == single
    assert read_back(tmp_path / "ranks") == read_back(tmp_path / "single")


def test_near_duplicates_across_mpi_ranks_match_one_process(tmp_path, tokenizer_dir, near_corpus):
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable))
    base = ["-m", "data_prep", "prepare", "--input", str(near_corpus), "--tokenizer", tokenizer_dir, "--workers",
            "1", "--dedup", "near", "--near-threshold", "0.7", "--progress", "log"]
    subprocess.run([sys.executable, *base, "--output", str(tmp_path / "single")], check=True, cwd=ROOT,
                   capture_output=True)
    res = subprocess.run([mpiexec, "-n", "2", sys.executable, *base, "--output", str(tmp_path / "mpi")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    subprocess.run([sys.executable, "-m", "data_prep", "merge", "--output", str(tmp_path / "mpi")], check=True,
                   cwd=ROOT, capture_output=True)
    assert read_back(tmp_path / "mpi") == read_back(tmp_path / "single")
    man = json.load(open(tmp_path / "mpi" / "manifest.json"))
    assert man["counts"]["dropped"]["near_duplicate"] >= 25
