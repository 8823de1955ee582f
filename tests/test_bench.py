"""The GPU benchmark must not rot: it runs at tiny size on CPU (no speed asserted)."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_throughput_benchmark_runs_at_tiny_size_on_cpu(tmp_path):
    res = subprocess.run([sys.executable, "bench/gpu_throughput.py", "--model", "tiny", "--seq-length", "32",
                          "--micro-batch-size", "2", "--steps", "2", "--warmup", "1", "--json", str(tmp_path / "r.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "r.jsonl").read_text())
    for side in ("ours", "baseline"):
        assert result[side]["tokens_per_s"] > 0 and result[side]["step_s"] > 0
    assert result["ours_over_baseline"] > 0
