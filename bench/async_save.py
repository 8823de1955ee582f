"""How long a checkpoint save holds the training loop: synchronous against --async-save (issue 33).

Runs pretrain/main.py on 2 ranks (DP 2, ZeRO-3, fp32) with a model of a few hundred MB of checkpoint state, saving
every --save-interval steps, four ways: synchronous and asynchronous, on the local disk as it is and with the writer
held to 200 MB/s (PRETRAIN_SAVE_MBPS: a shared filesystem's share per rank). For each it prints, from the run's own
metrics.jsonl (pretrain/main.py writes save_blocked_s at every save):

  - the median time the loop was held by an interval save (synchronous: the whole save; asynchronous: the copy to
    host memory, plus any wait for the save before it),
  - the median step time while a background save was in flight against the other steps,
  - async / sync blocked time, beside the issue's bar (<= 15% with the slowed writer).

  python bench/async_save.py [--hidden 512 --layers 8] [--steps 12] [--save-interval 4] [--json out.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BAR = 0.15  # issue 33: async blocks at most this share of the synchronous time, with the slowed writer


def data(work: str) -> str:
    """A tokenizer and shards from the machine's own documentation (bench/corpus.py)."""
    from bench.corpus import prose_jsonl

    raw = os.path.join(work, "raw.jsonl")
    prose_jsonl(raw, 4)
    py = [sys.executable, "-m", "data_prep"]
    subprocess.run([*py, "train-tokenizer", "--input", raw, "--vocab-size", "2048", "--output", f"{work}/tok"],
                   check=True, cwd=ROOT, capture_output=True)
    subprocess.run([*py, "prepare", "--input", raw, "--tokenizer", f"{work}/tok", "--output", f"{work}/data",
                    "--workers", "2", "--progress", "log"], check=True, cwd=ROOT, capture_output=True)
    return f"{work}/data"


def run(work: str, data_dir: str, name: str, a, background: bool, mbps: float | None) -> dict:
    out = os.path.join(work, name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "pretrain/main.py",
           "--deepspeed_config", "ds_configs/zero3.json", "--fp32", "--data-path", data_dir, "--model", "tiny",
           "--hidden-size", str(a.hidden), "--num-layers", str(a.layers), "--ffn-hidden-size", str(a.hidden * 11 // 4),
           "--num-attention-heads", "8", "--num-query-groups", "4", "--seq-length", "128", "--micro-batch-size", "1",
           "--global-batch-size", "2", "--train-iters", str(a.steps), "--save", f"{out}/ck", "--save-interval",
           str(a.save_interval), "--keep-last", "2", "--log-interval", "1", "--eval-interval", "0",
           "--num-workers", "0", "--log-dir", f"{out}/logs", "--split", "100,0,0"]
    if background:
        cmd.append("--async-save")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"PRETRAIN_SAVE_MBPS": str(mbps)} if mbps else {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(f"{out}/logs/metrics.jsonl")]
    saves = [r for r in rows if "save_blocked_s" in r and r["step"] < a.steps]  # the interval saves
    steps = {r["step"]: r["last_step_time"] for r in rows if "last_step_time" in r}
    state_mb = _state_mb(f"{out}/ck")
    # steps while a background save was in flight: those after a save until its commit (the log's next line)
    in_flight = _in_flight_steps(proc.stdout + proc.stderr, a) if background else set()
    others = [t for s, t in steps.items() if s not in in_flight and s > 2]
    return {"name": name, "background": background, "mbps": mbps, "state_mb": state_mb,
            "blocked_s": statistics.median(r["save_blocked_s"] for r in saves),
            "step_s": statistics.median(others) if others else None,
            "step_in_flight_s": statistics.median(steps[s] for s in in_flight) if in_flight else None}


def _state_mb(ck: str) -> float:
    latest = open(os.path.join(ck, "latest")).read().strip()
    d = os.path.join(ck, latest)
    return sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d) if n.endswith(".safetensors")) / 1e6


def _in_flight_steps(log: str, a) -> set[int]:
    """Steps logged between "saving ... in the background" and its "saved checkpoint ... (in the background"."""
    steps, flying = set(), False
    for line in log.splitlines():
        if "in the background (" in line:
            flying = True
        elif "(in the background," in line:
            flying = False
        elif flying and line.startswith("iteration") and "/" in line.split("|")[0]:
            steps.add(int(line.split("/")[0].split()[-1]))
    return steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save-interval", type=int, default=4)
    p.add_argument("--mbps", type=float, default=200.0, help="the slowed writer's bandwidth per rank")
    p.add_argument("--json", help="append the results here")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        data_dir = data(work)
        results = [run(work, data_dir, f"{mode}{'-' + str(int(mbps)) if mbps else ''}", a, mode == "async", mbps)
                   for mbps in (None, a.mbps) for mode in ("sync", "async")]
    print(f"checkpoint state {results[0]['state_mb']:.0f} MB in all ({results[0]['state_mb'] / 2:.0f} MB per rank "
          f"file); 2 ranks, ZeRO-3, fp32, a save every {a.save_interval} steps")
    print(f"{'run':<14}{'loop held per save':>20}{'step (no save)':>16}{'step, save in flight':>22}")
    for r in results:  # a median over no step (every step had a save in flight, or none did) prints "-"
        step, fly = (f"{r[k]:.3f} s" if r[k] is not None else "-" for k in ("step_s", "step_in_flight_s"))
        print(f"{r['name']:<14}{r['blocked_s']:>18.3f} s{step:>16}{fly:>22}")
    for mbps, sync, asyn in ((None, results[0], results[1]), (a.mbps, results[2], results[3])):
        share = asyn["blocked_s"] / sync["blocked_s"]
        where = f"writer at {mbps:.0f} MB/s" if mbps else "local disk"
        bar = f" (issue 33's bar: <= {BAR:.0%}: {'met' if share <= BAR else 'NOT met'})" if mbps else ""
        print(f"async / sync loop held, {where}: {share:.1%}{bar}")
    if a.json:
        with open(a.json, "a") as f:
            for r in results:
                f.write(json.dumps({"bench": "async_save", **r}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
