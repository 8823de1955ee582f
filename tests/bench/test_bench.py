"""The benchmarks must not rot: each runs at tiny size on CPU (no speed asserted), and the plan's CPU step times
hold the bound it prints."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from pretrain import steptime

pytestmark = pytest.mark.slow


def test_gpu_throughput_benchmark_runs_at_tiny_size_on_cpu(tmp_path):
    res = subprocess.run([sys.executable, "bench/gpu_throughput.py", "--model", "tiny", "--seq-length", "32",
                          "--micro-batch-size", "2", "--steps", "2", "--warmup", "1",
                          "--json", str(tmp_path / "r.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "r.jsonl").read_text())
    for side in ("ours", "baseline"):
        assert result[side]["tokens_per_s"] > 0 and result[side]["step_s"] > 0
    assert result["ours_over_baseline"] > 0


def test_async_save_benchmark_runs_at_tiny_size(tmp_path):
    res = subprocess.run([sys.executable, "bench/async_save.py", "--hidden", "64", "--layers", "2", "--steps", "5",
                          "--save-interval", "2", "--json", str(tmp_path / "r.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["sync", "async", "sync-200", "async-200"]
    assert all(r["blocked_s"] > 0 for r in rows) and "issue 33's bar" in res.stdout


def test_loader_benchmark_runs_at_tiny_size(tmp_path):
    res = subprocess.run([sys.executable, "bench/loader_throughput.py", "--tokens", "3e5", "--shards", "1",
                          "--seq-length", "128",
                          "--batches", "5", "--num-workers", "0", "1", "--json", str(tmp_path / "r.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "r.jsonl").read_text())
    assert result["train_samples"] > 0 and result["index_build_cold_s"] > 0
    assert result["workers_0_tokens_per_s"] > 0 and result["workers_1_tokens_per_s"] > 0


def test_data_prep_benchmark_runs_at_tiny_size(tmp_path):
    res = subprocess.run([sys.executable, "bench/data_prep_throughput.py", "--mb", "2", "--vocab-size", "400",
                          "--workers", "1", "2", "--rounds", "2", "--json", str(tmp_path / "r.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "r.jsonl").read_text())
    assert result["train_tokenizer_mb_per_s"] > 0
    for n in (1, 2):
        r = result[f"workers_{n}"]
        for key in ("anchor_s", "prepare_s", "raw_s", "near_s", "gigatoken_encode_s", "tokenizers_encode_s"):
            assert r[key] > 0, key
        assert len(r["prepare_vs_anchor_all"]) == 2 and r["prepare_vs_anchor"] in r["prepare_vs_anchor_all"]


def test_all_benchmarks_in_one_command_print_one_table(tmp_path):
    res = subprocess.run([sys.executable, "bench/run_all.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    table = [line for line in res.stdout.splitlines() if line.startswith("| ")]
    for what in ("data_prep prepare, 1 worker", "data_prep prepare, 2 worker",
                 "GPTDataset index build", "training loader"):
        assert any(what in line for line in table), res.stdout


def test_context_sweep_runs_at_tiny_size(tmp_path):
    res = subprocess.run([sys.executable, "bench/context_sweep.py", "--model", "tiny", "--tokens", "64", "--seqs",
                          "32", "64", "--cp", "1", "2", "--loss-chunks", "2", "--zero", "0", "--steps", "2",
                          "--warmup", "1", "--json", str(tmp_path / "r.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = json.loads((tmp_path / "r.jsonl").read_text())["sweep"]
    assert [(r["seq"], r["cp"]) for r in sweep] == [(32, 1), (32, 2), (64, 1), (64, 2)]
    assert all(r[k]["tokens_per_s"] > 0 and r[k]["peak_mem_gb"] > 0 for r in sweep for k in ("plain", "document_mask"))


def test_the_plans_cpu_step_times_hold_their_printed_bound_with_the_shipped_constants(tmp_path):
    """pretrain/steptime.py's "cpu" constants as shipped (no refit) predict every multi-process layout the suite
    runs, on the model they were fitted for, within the bound the plan prints; the H100 check prints its
    leave-one-out table beside it."""
    res = subprocess.run([sys.executable, "bench/steptime_validation.py", "--shipped", "--json",
                          str(tmp_path / "r.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    cpu = [r for r in rows if r["check"] == "cpu"]
    assert len(cpu) == 7 and {r["constants"] for r in cpu} == {"shipped"} and any(r["check"] == "h100" for r in rows)
    worst = max(abs(r["error"]) for r in cpu)
    print(res.stdout[-1500:])
    assert worst <= steptime.CPU_SHIPPED_WORST_ERROR, res.stdout[-1500:]
    assert f"{steptime.CPU_SHIPPED_WORST_ERROR:.0%}" in steptime.DEVICES["cpu"].measured_error  # what the plan prints


