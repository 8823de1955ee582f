"""Tokens/s and peak memory as the context grows, with and without --document-mask (issue 16), on one device.

For each sequence length (micro-batch shrinking so that tokens per micro-batch stay constant), runs our side of
bench/gpu_throughput.py (its own process each) plain and with --document-mask, until a length runs out of memory.
Sequence parallelism needs TP > 1, so several GPUs: its activation saving is measured on CPU by
tests/pretrain/test_parallel_equivalence.py and modelled by pretrain.plan.

  python bench/context_sweep.py --model 1b --tokens 16384 --seqs 2048 4096 8192 16384 32768
  python bench/context_sweep.py --model tiny --tokens 128 --seqs 32 64 --steps 2 --warmup 1   # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.report import emit  # noqa: E402


def _one(model: str, seq: int, mb: int, mask: bool, steps: int, warmup: int, extra: list[str]) -> dict | str:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.jsonl")
        cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu_throughput.py"), "--which", "ours", "--model", model,
               "--seq-length", str(seq), "--micro-batch-size", str(mb), "--steps", str(steps), "--warmup",
               str(warmup), "--json", out, *extra] + (["--document-mask"] if mask else [])
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
        with open(out) as f:
            return json.loads(f.read())["ours"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="1b")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch (micro-batch = tokens / seq)")
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", help="append the results as one JSON line to this file")
    a, extra = p.parse_known_args(argv)  # anything else goes to gpu_throughput.py (--zero, --compile, ...)
    rows = []
    for seq in a.seqs:
        mb = max(1, a.tokens // seq)
        row = {"seq": seq, "micro_batch": mb}
        for name, mask in (("plain", False), ("document_mask", True)):
            r = _one(a.model, seq, mb, mask, a.steps, a.warmup, extra)
            row[name] = r if isinstance(r, str) else {k: r[k] for k in ("tokens_per_s", "mfu", "peak_mem_gb")}
        rows.append(row)
        print(f"seq {seq} x {mb}: " + "; ".join(f"{n} {row[n]}" for n in ("plain", "document_mask")), flush=True)
        if any(row[n] == "out of memory" for n in ("plain", "document_mask")):
            break
    return emit({"model": a.model, "tokens_per_micro_batch": a.tokens, "sweep": rows}, a.json)


if __name__ == "__main__":
    sys.exit(main())
