"""Tokens/s and peak memory as the context grows: plain and with --document-mask, and split across context-parallel
ranks (--cp, issue 34), with the chunked loss as asked; each run in its own process(es).

For each sequence length (micro-batch shrinking so that tokens per micro-batch stay constant) and each --cp size,
runs our side of bench/gpu_throughput.py plain and with --document-mask (CP > 1: that many local ranks through
torchrun, splitting each sample), until a length runs out of memory. Peak memory is per rank: the CUDA
allocator's on a GPU, the profiler's allocation events over one step on CPU (pretrain.memory.
peak_allocated_bytes). Tokens/s count the whole samples, whatever CP splits them into. One GPU runs CP 1 only
(CP 2 needs a GPU per rank). Sequence parallelism needs TP > 1: its activation saving is measured on CPU by
tests/pretrain/test_parallel_equivalence.py and modelled by pretrain.plan.

  python bench/context_sweep.py --model 1b --tokens 32768 --seqs 8192 16384 32768 --loss-chunks 8
  python bench/context_sweep.py --model tiny --tokens 4096 --seqs 4096 --cp 1 2 --loss-chunks 4 --zero 0 \\
      --steps 2 --warmup 1   # CPU: CP 1 against CP 2
On the CPU, ZeRO 0: a ZeRO-1 step's gradient buckets (5e8 elements) would set every peak; and the document mask
is a dense [s, s] mask there (FlexAttention's block mask on a GPU), whole on every CP rank, since each attends
over the whole sequence for its heads.
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

FIELDS = ("tokens_per_s", "mfu", "peak_mem_gb")


def _one(model: str, seq: int, mb: int, mask: bool, cp: int, steps: int, warmup: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.jsonl")
        script = os.path.join(ROOT, "bench", "gpu_throughput.py")
        launch = [sys.executable] if cp == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                   str(cp), "--master_port", str(29700 + seq % 97)]
        cmd = [*launch, script, "--which", "ours", "--model", model, "--seq-length", str(seq), "--micro-batch-size",
               str(mb), "--steps", str(steps), "--warmup", str(warmup), "--cp", str(cp), "--json", out, *extra]
        cmd += ["--document-mask"] if mask else []
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
        with open(out) as f:
            return json.loads(f.read())["ours"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="1b")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch (micro-batch = tokens / seq)")
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--cp", type=int, nargs="+", default=[1], help="context-parallel sizes to compare")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", help="append the results as one JSON line to this file")
    a, extra = p.parse_known_args(argv)  # anything else goes to gpu_throughput.py (--zero, --loss-chunks, ...)
    rows = []
    for seq in a.seqs:
        mb = max(1, a.tokens // seq)
        for cp in a.cp:
            row = {"seq": seq, "micro_batch": mb, "cp": cp}
            for name, mask in (("plain", False), ("document_mask", True)):
                r = _one(a.model, seq, mb, mask, cp, a.steps, a.warmup, extra)
                row[name] = r if isinstance(r, str) else {k: r[k] for k in FIELDS}
            rows.append(row)
            print(f"seq {seq} x {mb}, CP {cp}: " + "; ".join(f"{n} {row[n]}" for n in ("plain", "document_mask")),
                  flush=True)
        if any(r[n] == "out of memory" for r in rows[-len(a.cp):] for n in ("plain", "document_mask")):
            break
    return emit({"model": a.model, "tokens_per_micro_batch": a.tokens, "extra": extra, "sweep": rows}, a.json)


if __name__ == "__main__":
    sys.exit(main())
