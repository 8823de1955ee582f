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
