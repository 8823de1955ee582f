"""How well does pretrain.steptime predict step times? Two checks, each printing predicted next to measured.

1. H100 (no GPU needed): the one-GPU runs in bench/results_h100.jsonl (default kernels, ZeRO-1) fix the device's
   compute efficiency by layer width and its optimizer time per parameter (least squares); each run is then
   predicted by a fit without it (leave-one-out).
2. CPU (this machine, gloo): gloo's all-reduce latency and bandwidth and its send/recv latency between 2 local
   processes are measured, and one core's matmul rate; one-process runs of tests/workers/train_layout.py at 1 and
   4 micro-batches per step fix the host cost per layer pass and per step, and ZeRO-3 runs at two widths its
   hooks' cost; then every multi-process layout the suite runs (DP 2 under ZeRO 0/1/3, TP 2, PP 2, TP 2 x PP 2,
   TP 2 x DP 2 ZeRO-3) is predicted and measured (median of steps 3-10). The model is the suite's tiny preset
   widened (WIDE) so compute matters; --shape tiny runs the suite's own (host and latency bound).

  python bench/steptime_validation.py [--skip-cpu] [--shape wide|tiny] [--layouts N] [--shipped] [--json out.jsonl]

What the CPU check covers: the pipeline schedule, TP/PP/ZeRO traffic (counts checked call for call by
tests/pretrain/test_steptime.py), ranks sharing 2 cores, fp32 compute on one core each; not a GPU's
bf16 efficiency (the H100 check) nor NCCL (no multi-GPU runs yet).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pretrain import steptime  # noqa: E402
from pretrain.config import preset  # noqa: E402
from pretrain.engine import zero_auto  # noqa: E402

WORKER = os.path.join(ROOT, "tests", "workers", "train_layout.py")


# ------------------------------------------------------------------------------------------------ H100
def h100_rows() -> list[dict]:
    rows = {}
    with open(os.path.join(ROOT, "bench", "results_h100.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["zero"] != 1 or r.get("compile") or r.get("fuse_swiglu"):
                continue
            key = (r["model"], r["seq"], r["micro_batch"], r.get("grad_accum", 1), r["recompute"])
            rows.setdefault(key, []).append(r["ours"]["step_s"])
    return [{"model": k[0], "seq": k[1], "mb": k[2], "accum": k[3], "recompute": k[4],
             "step_s": statistics.mean(v), "repeats": len(v)} for k, v in sorted(rows.items())]


def _terms(row) -> tuple[int, float, float, float]:
    """(hidden, seconds per unit of 1/efficiency, constant seconds, optimizer parameters) of a row's prediction
    under a device with efficiency 1 and no optimizer cost: the model is linear in 1/efficiency and in the
    optimizer's seconds per parameter."""
    cfg = preset(row["model"], seq_length=row["seq"])
    unit = dataclass_device(efficiency=1.0, opt=0.0)
    s = steptime.StepInput(cfg=cfg, tp=1, pp=1, dp=1, zero=1, micro_batch_size=row["mb"],
                           grad_accum=row["accum"], recompute=row["recompute"], gpus_per_node=1, device="_fit")
    steptime.DEVICES["_fit"] = unit
    b = steptime.step_time(s)["breakdown_s"]
    from pretrain.plan import rank_params

    return cfg.hidden_size, b["compute"], row["accum"] * cfg.num_layers, rank_params(cfg, 1, 1)["per_gpu"]


def dataclass_device(efficiency: float, opt: float):
    import dataclasses

    return dataclasses.replace(steptime.DEVICES["h100"], efficiency=((1, efficiency),), optimizer_s_per_param=opt,
                               layer_overhead_s=0.0)


def fit_h100(rows) -> dict:
    """Efficiency by width as e_max * h / (h + h0), e_max <= 0.8 (small matmuls run further from peak, one curve),
    and the optimizer's seconds per parameter: least squares, linear in (1 / e_max, optimizer) for each h0 of a
    grid; the best h0 wins. Three numbers for all rows, so a row left out is predicted from the others' curve."""
    best = None
    for h0 in np.geomspace(50, 20000, 120):
        a, y = [], []
        for r in rows:
            h, flop_s, _, params = _terms(r)
            a.append([flop_s / (h / (h + h0)), params])
            y.append(r["step_s"])
        x, *_ = np.linalg.lstsq(np.array(a), np.array(y), rcond=None)
        err = float(np.sum((np.array(a) @ x - np.array(y)) ** 2))
        # e_max <= 0.8: no dense bf16 matmul reaches more of an H100's peak (cuBLAS ~75-80% at large shapes)
        if x[0] >= 1 / 0.8 and x[1] >= 0 and (best is None or err < best[0]):
            best = (err, h0, 1 / x[0], x[1])
    _, h0, e_max, opt = best
    widths = (512, 768, 1024, 2048, 4096, 8192, 16384)
    return {"efficiency": {w: e_max * w / (w + h0) for w in widths}, "opt": float(opt), "h0": float(h0),
            "e_max": float(e_max)}


def _zero3_host_cost() -> float:
    """Seconds per layer pass that ZeRO-3 adds on one GPU (nothing to send): its step minus ZeRO-1's, same run."""
    by = {}
    with open(os.path.join(ROOT, "bench", "results_h100.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("grad_accum", 1) == 1 and not r.get("compile") and not r.get("fuse_swiglu") and \
                    (r["model"], r["seq"], r["micro_batch"], r["recompute"]) == ("1b", 2048, 4, "none"):
                by.setdefault(r["zero"], []).append(r["ours"]["step_s"])
    return (statistics.mean(by[3]) - statistics.mean(by[1])) / preset("1b").num_layers


def predict_h100(fit: dict, row) -> float:
    import dataclasses

    pts = tuple(sorted(fit["efficiency"].items()))
    steptime.DEVICES["_fit"] = dataclasses.replace(steptime.DEVICES["h100"], efficiency=pts,
                                                   optimizer_s_per_param=fit["opt"], layer_overhead_s=0.0)
    cfg = preset(row["model"], seq_length=row["seq"])
    return steptime.step_time(steptime.StepInput(
        cfg=cfg, tp=1, pp=1, dp=1, zero=1, micro_batch_size=row["mb"], grad_accum=row["accum"],
        recompute=row["recompute"], gpus_per_node=1, device="_fit"))["step_s"]


def h100_check() -> list[dict]:
    rows = h100_rows()
    full = fit_h100(rows)
    z3 = _zero3_host_cost()
    print("H100, one GPU (bench/results_h100.jsonl, default kernels, ZeRO-1): fitted efficiency by width "
          + ", ".join(f"{w}: {e:.3f}" for w, e in sorted(full["efficiency"].items()))
          + f" (e_max {full['e_max']:.3f}, h0 {full['h0']:.0f}); optimizer {full['opt']:.2e} s/parameter; "
          f"ZeRO-3 host cost {z3 * 1e3:.1f} ms per layer pass (DP 1)")
    out = []
    for i, r in enumerate(rows):
        loo = fit_h100(rows[:i] + rows[i + 1:])
        pred = predict_h100(loo, r)
        out.append({**r, "predicted_s": round(pred, 4), "error": round(pred / r["step_s"] - 1, 4),
                    "in_sample_s": round(predict_h100(full, r), 4)})
    _table("H100 leave-one-out", out, lambda r: f"{r['model']} seq {r['seq']} mb {r['mb']} x {r['accum']} "
                                                f"{r['recompute']}")
    return out


# ------------------------------------------------------------------------------------------------ CPU
# The model the CPU check trains: the test suite's tiny preset widened until a step is mostly compute (a few
# hundred ms), so the FLOP, bandwidth and bubble terms are exercised and the VM's scheduling noise (+-40% on the
# tiny model's 10-30 ms steps, run to run) is small beside it. --shape tiny runs the suite's own model.
WIDE = {"hidden_size": 256, "ffn_hidden_size": 704, "num_layers": 4, "seq_length": 256}


def run_worker(nproc: int, *flags, shape: dict, steps: int = 10) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        cfg = ["--cfg", *(f"{k}={v}" for k, v in shape.items())] if shape else []
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", WORKER,
               *map(str, flags), *cfg, "--steps", str(steps), "--out", out]
        _run(cmd)
        with open(out) as f:
            r = json.load(f)
    times = [r["step_s"][str(s)] for s in range(3, steps + 1)]
    return {"median_s": statistics.median(times), "times": times}


def matmul_rate(cfg) -> float:
    """FLOP/s of one core on the model's own matmul shapes (fp32, one thread, as the workers run)."""
    import torch

    torch.set_num_threads(1)
    x = torch.randn(2 * cfg.seq_length, cfg.hidden_size)
    w = torch.randn(cfg.hidden_size, 2 * cfg.ffn_hidden_size)
    for _ in range(3):
        x @ w
    reps, t0 = 20, time.perf_counter()
    for _ in range(reps):
        x @ w
    return 2 * x.shape[0] * x.shape[1] * w.shape[1] * reps / (time.perf_counter() - t0)


GLOO = """
import os, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
def timed(n, reps):
    t = torch.ones(n)
    for _ in range(3): dist.all_reduce(t)
    dist.barrier(); t0 = time.perf_counter()
    for _ in range(reps): dist.all_reduce(t)
    return (time.perf_counter() - t0) / reps
def p2p(reps):  # ping-pong: one way = half a round trip (DeepSpeed's pipe engine sends with dist.send/recv)
    t, peer = torch.ones(256), 1 - dist.get_rank()
    dist.barrier(); t0 = time.perf_counter()
    for _ in range(reps):
        if dist.get_rank() == 0:
            dist.send(t, peer); dist.recv(t, peer)
        else:
            dist.recv(t, peer); dist.send(t, peer)
    return (time.perf_counter() - t0) / reps / 2
small, big, one_way = timed(256, 200), timed(1 << 20, 20), p2p(200)
if dist.get_rank() == 0:
    print(small, big, one_way)
dist.barrier()
dist.destroy_process_group()  # gloo's threads otherwise abort the exit now and then
"""


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    """A torchrun job, retried: --standalone's rendezvous port can collide with a port in TIME_WAIT."""
    for _ in range(3):
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)
        if res.returncode == 0:
            return res
    raise RuntimeError(f"{' '.join(map(str, cmd))} failed 3 times:\n{res.stderr[-3000:]}")


def measure_gloo() -> steptime.Link:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(GLOO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", f.name]
    runs = sorted((tuple(map(float, _run(cmd).stdout.split()[-3:])) for _ in range(3)))
    os.unlink(f.name)
    small, big, one_way = runs[1]  # the median of 3 (ordered by latency)
    nbytes = 4 * (1 << 20)
    # all-reduce of 2 ranks: bus bytes = 2 (n-1)/n x buffer = the buffer
    return steptime.Link(bus_gbs=nbytes / (big - small) / 1e9, latency_s=small, p2p_latency_s=one_way)


LAYOUTS = [  # (ranks, worker flags): what tests/pretrain/test_parallel_equivalence.py runs
    (2, ["--zero", 0]), (2, ["--zero", 1]), (2, ["--zero", 3]), (2, ["--tp", 2]), (2, ["--pp", 2, "--zero", 1]),
    (4, ["--tp", 2, "--pp", 2, "--zero", 1]), (4, ["--tp", 2, "--zero", 3]),
]


def _flags_to_input(nproc, flags, cfg, accum_total=4, mb=2):
    f = dict(zip(flags[::2], flags[1::2]))
    tp, pp, zero = int(f.get("--tp", 1)), int(f.get("--pp", 1)), int(f.get("--zero", 0))
    dp = nproc // (tp * pp)
    return steptime.StepInput(cfg=cfg, tp=tp, pp=pp, dp=dp, zero=zero, micro_batch_size=mb,
                              grad_accum=accum_total // (mb * dp), gpus_per_node=nproc, device="cpu",
                              reduce_bucket=zero_auto("reduce_bucket_size", cfg.hidden_size))  # the worker's "auto"


def cpu_check(n_layouts: int | None = None, shape: dict | None = WIDE, shipped: bool = False) -> list[dict]:
    """Calibrate on one process (FLOP rate of the model's matmuls; host cost per layer pass, per step and of
    ZeRO-3's hooks from 1 and 4 micro-batches per step), measure gloo between 2 processes, then predict each
    multi-process layout of the test suite and measure it. shipped: no calibration, the constants
    pretrain/steptime.py ships (what `python -m pretrain.plan --gpu cpu` predicts with)."""
    cfg = preset("tiny", **(shape or {}))
    if shipped:
        print(f"\nCPU model {shape or 'tiny'}: the shipped constants (pretrain/steptime.py DEVICES['cpu'], "
              f"LINKS['gloo-loopback']), no refit")
        title = "CPU, 2 cores, gloo (shipped constants)"
    else:
        calibrate(cfg, shape)
        title = "CPU, 2 cores, gloo (calibrated on one process)"
    out = []
    for nproc, flags in LAYOUTS[:n_layouts]:
        measured = run_worker(nproc, *flags, shape=shape)["median_s"]
        pred = steptime.step_time(_flags_to_input(nproc, flags, cfg))
        out.append({"ranks": nproc, "layout": " ".join(map(str, flags)), "shape": shape or "tiny",
                    "constants": "shipped" if shipped else "refit", "step_s": round(measured, 4),
                    "predicted_s": round(pred["step_s"], 4), "error": round(pred["step_s"] / measured - 1, 4),
                    "breakdown_s": {k: round(v, 4) for k, v in pred["breakdown_s"].items()}})
    _table(title, out, lambda r: f"{r['ranks']} ranks {r['layout']}")
    return out


def calibrate(cfg, shape: dict | None) -> None:
    """Refit DEVICES['cpu'] and LINKS['gloo-loopback'] on this machine (printed; pretrain/steptime.py ships typical
    values of such fits)."""
    import dataclasses

    link = measure_gloo()
    steptime.LINKS["gloo-loopback"] = link
    rate = matmul_rate(cfg)
    one = {g: run_worker(1, "--global-batch-size", g, shape=shape)["median_s"] for g in (2, 8)}  # 1, 4 micro
    # ZeRO-3's hooks, nothing sent: a fixed cost per layer pass and one per parameter, from this width and the
    # tiny preset's
    z3 = {}
    for name, sh in (("this", shape), ("tiny", None))[:2 if shape else 1]:
        c = preset("tiny", **(sh or {}))
        z0 = run_worker(1, "--global-batch-size", 8, shape=sh)["median_s"] if sh != shape else one[8]
        z3[name] = ((run_worker(1, "--zero", 3, "--global-batch-size", 8, shape=sh)["median_s"] - z0)
                    / (4 * c.num_layers), c.layer_params() - 2 * c.hidden_size)
    per_param = max(0.0, (z3["this"][0] - z3["tiny"][0]) / (z3["this"][1] - z3["tiny"][1])) \
        if shape else 0.0
    base = dataclasses.replace(steptime.DEVICES["cpu"], peak_tflops=rate / 1e12, efficiency=((64, 1.0),),
                               layer_overhead_s=0.0, step_overhead_s=0.0, optimizer_s_per_param=0.0,
                               zero3_layer_overhead_s=0.0, zero3_s_per_layer_param=0.0)
    steptime.DEVICES["cpu"] = base
    flops_micro = steptime._compute(_flags_to_input(1, [], cfg, accum_total=2), base, 1.0)
    per_micro = (one[8] - one[2]) / 3
    per_step = one[2] - per_micro
    fitted = dataclasses.replace(base, layer_overhead_s=max(0.0, per_micro - flops_micro) / cfg.num_layers,
                                 step_overhead_s=per_step, zero3_s_per_layer_param=per_param,
                                 zero3_layer_overhead_s=z3["this"][0] - per_param * z3["this"][1])
    steptime.DEVICES["cpu"] = fitted
    print(f"\nCPU model {shape or 'tiny'}: matmul {rate / 1e9:.1f} GFLOP/s per core; gloo all-reduce latency "
          f"{link.latency_s * 1e6:.0f} us, send/recv {link.p2p_latency_s * 1e6:.0f} us, bus {link.bus_gbs:.2f} GB/s; "
          f"one process: {per_micro * 1e3:.1f} ms per micro-batch ({flops_micro * 1e3:.1f} ms of it FLOPs), "
          f"{per_step * 1e3:.1f} ms per step -> host cost {fitted.layer_overhead_s * 1e3:.2f} ms per layer pass, "
          f"ZeRO-3 hooks {fitted.zero3_layer_overhead_s * 1e3:.2f} ms more + {per_param * 1e9:.1f} ns per parameter of "
          f"the layer")


def _table(title, rows, name) -> None:
    print(f"\n{title}\n| run | measured s | predicted s | error |\n|---|---|---|---|")
    for r in rows:
        print(f"| {name(r)} | {r['step_s']:.4f} | {r['predicted_s']:.4f} | {r['error']:+.1%} |")
    errs = [abs(r["error"]) for r in rows]
    print(f"mean |error| {statistics.mean(errs):.1%}, worst {max(errs):.1%}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--layouts", type=int, help="only the first N CPU layouts (the test suite's smoke run)")
    ap.add_argument("--shape", choices=("wide", "tiny"), default="wide",
                    help="the CPU model: the tiny preset widened so compute dominates (default), or as the suite "
                         "runs it")
    ap.add_argument("--shipped", action="store_true",
                    help="predict with the constants pretrain/steptime.py ships, no calibration (what the plan "
                         "prints; tests/bench/test_bench.py holds its bound)")
    ap.add_argument("--json", help="append the rows here")
    a = ap.parse_args()
    t0 = time.time()
    rows = [{"check": "h100", **r} for r in h100_check()]
    if not a.skip_cpu:
        rows += [{"check": "cpu", **r} for r in cpu_check(a.layouts, WIDE if a.shape == "wide" else None,
                                                          a.shipped)]
    if a.json:
        with open(a.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "date": time.strftime("%Y-%m-%d")}) + "\n")
    print(f"\n({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
