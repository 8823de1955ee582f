"""Every benchmark in one command, and one results table.

Runs here: data_prep end to end vs the raw tokenizer limit (bench/data_prep_throughput.py), the training loader
and index build (bench/loader_throughput.py) and, when a GPU is present, the GPU throughput benchmark
(bench/gpu_throughput.py) and the planner's memory check (pretrain.plan vs measured peak). GPU rows that were
not measured in this run come from the recorded results (bench/results_h100.jsonl), marked with their date.

  python bench/run_all.py                    # full sizes (a few minutes on 2 cores without a GPU)
  python bench/run_all.py --quick            # tiny sizes: checks that everything still runs
  python bench/run_all.py --update-readme    # also replace the table in README.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common.files import write_text  # noqa: E402

RECORDED = os.path.join(ROOT, "bench", "results_h100.jsonl")
BEGIN, END = "<!-- results-table:begin -->", "<!-- results-table:end -->"


def _run(script: str, args: list[str], work: str) -> dict:
    out = os.path.join(work, os.path.basename(script) + ".jsonl")
    res = subprocess.run([sys.executable, os.path.join("bench", script), *args, "--json", out], cwd=ROOT,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"bench/{script} failed:\n{res.stderr[-3000:]}")
    with open(out) as f:
        return [json.loads(line) for line in f][-1]


def _where() -> str:
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), {datetime.date.today()}"


def _kernels(r: dict) -> str:
    """The opt-in kernels a GPU record was measured with."""
    return ", ".join(k for k in ("compile", "fuse_swiglu") if r.get(k))


def _gpu_rows(records: list[dict], where: str) -> list[tuple[str, str, str]]:
    rows = []
    tagged = [r for r in records if isinstance(r.get("ours"), dict) and r["ours"].get("mfu")]
    if not tagged:
        return rows
    best = max(tagged, key=lambda r: r["ours"]["mfu"] if r["model"] == "1b" and r["seq"] == 2048 else 0)
    o = best["ours"]
    opts = _kernels(best)
    rows.append((f"1b seq {best['seq']}, best measured: micro-batch {best['micro_batch']} x {best['grad_accum']} "
                 f"accumulation, ZeRO-{best['zero']}, recompute {best['recompute']}" + (f", {opts}" if opts else ""),
                 f"{o['tokens_per_s']:,} tok/s, {o['mfu']:.1%} MFU, {o['peak_mem_gb']} GiB",
                 f"{best['device']}, {best.get('date', '?')}{where}"))
    paired = [r for r in tagged if isinstance(r.get("baseline"), dict)]
    for r in sorted(paired, key=lambda r: (-r["params_M"], r["seq"]))[:6]:
        b = r["baseline"]
        opts = _kernels(r)
        caveat = "" if r.get("separate_processes") else " (old method: baseline in ours' process, uncompiled)"
        rows.append((f"{r['model']} seq {r['seq']} mb {r['micro_batch']}x{r['grad_accum']} {r['recompute']}"
                     + (f" ({opts})" if opts else "") + f": ours vs HF Llama loop{caveat}",
                     f"{r['ours']['tokens_per_s']:,} vs {b['tokens_per_s']:,} tok/s ({r['ours_over_baseline']:.2f}x); "
                     f"MFU {r['ours']['mfu']:.1%} vs {b['mfu']:.1%}",
                     f"{r['device']}, {r.get('date', '?')}{where}"))
    return rows


def _planner_rows(records: list[dict], where: str) -> list[tuple[str, str, str]]:
    """The planner's peak memory against measured single-GPU peaks: in sample, and leave-one-out for the one
    coefficient that was set from these same peaks (the live logits, pretrain.plan "logits_alive")."""
    from pretrain.config import preset
    from pretrain.plan import ACTIVATION_COEFFICIENTS, PlanInput, plan

    runs, seen = [], set()
    for r in records:
        o = r.get("ours")
        if not isinstance(o, dict) or not o.get("peak_mem_gb") or r.get("compile") or r.get("fuse_swiglu"):
            continue  # the planner's coefficients are for the default kernels
        key = (r["model"], r["seq"], r["micro_batch"], r["zero"], r["recompute"], r.get("grad_accum", 1))
        if key in seen or key[-1] != 1:
            continue
        seen.add(key)
        runs.append((PlanInput(model=preset(r["model"]), nodes=1, gpus_per_node=1, zero=r["zero"],
                               micro_batch_size=r["micro_batch"], seq_length=r["seq"], recompute=r["recompute"],
                               reduce_bucket_size=5e8, prefetch_bucket_size=5e8), o["peak_mem_gb"]))
    if not runs:
        return []
    head = ACTIVATION_COEFFICIENTS["cuda"]["head"]
    stored = head["logits_alive"]

    def errors(coef, which):
        head["logits_alive"] = coef
        try:
            return [plan(runs[i][0])["memory_gib"]["peak"] / runs[i][1] - 1 for i in which]
        finally:
            head["logits_alive"] = stored

    fitted = errors(stored, range(len(runs)))
    grid = [x / 4 for x in range(0, 33)]
    held_out = []
    for i in range(len(runs)):  # refit the coefficient without run i, then predict run i
        others = [j for j in range(len(runs)) if j != i]
        best = min(grid, key=lambda c: sum(abs(e) for e in errors(c, others)))
        held_out += errors(best, [i])
    worst = lambda xs: max(xs, key=abs)  # noqa: E731
    return [("pretrain.plan peak memory vs measured (ours, default kernels, one GPU each)",
             f"{len(runs)} configs; calibrated to them: mean {sum(fitted) / len(fitted):+.1%}, worst "
             f"{worst(fitted):+.1%}; leave-one-out: mean absolute error {sum(map(abs, held_out)) / len(held_out):.1%}, "
             f"worst {worst(held_out):+.1%}", f"H100 records{where}")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CI): checks the benchmarks still run")
    ap.add_argument("--update-readme", action="store_true")
    a = ap.parse_args(argv)
    import torch

    work = tempfile.mkdtemp(prefix="bench-all-")
    where = _where()
    rows: list[tuple[str, str, str]] = []

    dp_args = ["--mb", "2", "--vocab-size", "400", "--rounds", "1", "--sizes", "4"] if a.quick else \
        ["--sizes", "70", "1024"]
    dp = _run("data_prep_throughput.py", dp_args, work)
    for n in (1, 2):
        r = dp.get(f"workers_{n}")
        if r:
            mbs = {k: dp["corpus_mb"] / r[f"{k}_s"] for k in ("anchor", "prepare", "raw", "near")}
            rows.append((f"data_prep prepare, {n} worker(s), {dp['corpus_mb']} MB prose JSONL (default cleaning + "
                         f"exact dedup; raw: cleaning and dedup off)",
                         f"{mbs['prepare']:.1f} MB/s = {r['prepare_vs_anchor']:.2f}x the gigatoken encode_files + "
                         f".bin anchor ({mbs['anchor']:.1f} MB/s); raw {mbs['raw']:.1f} MB/s = "
                         f"{r['raw_vs_anchor']:.2f}x", where))
            rows.append((f"data_prep prepare --dedup near, {n} worker(s)",
                         f"{mbs['near']:.1f} MB/s = {r['near_vs_exact']:.2f}x prepare with exact dedup", where))
            rows.append((f"tokenizer alone, {n} thread(s), same documents",
                         f"gigatoken {dp['corpus_mb'] / r['gigatoken_encode_s']:.0f} MB/s, HF tokenizers "
                         f"{dp['corpus_mb'] / r['tokenizers_encode_s']:.1f} MB/s", where))

    sizes = sorted((float(k.split("_")[1][:-2]), v) for k, v in dp.items() if k.startswith("prepare_") and
                   k.endswith("mb"))
    if sizes:
        rows.append(("data_prep prepare peak RSS (its largest process, 2 workers) as the input grows",
                     ", ".join(f"{mb:g} MB: {v['peak_rss_mib']:.0f} MiB" for mb, v in sizes), where))
    nd = _run("near_dedup_recall.py", ["--originals", "200" if a.quick else "2000", "--layouts"], work)
    default = next(k for k in nd if "x" in k and "accept" not in k)  # the layout --dedup near runs
    r = nd[default]
    rows.append((f"--dedup near recall by true Jaccard, {nd['originals']} originals + 5 variants each (default "
                 f"LSH {default} bands x rows)",
                 f"J 0.8-0.9: {r['recall_0.8_0.9']:.3f}, J >= 0.9: {r['recall_0.9_1.0']:.3f}, J 0.7-0.8: "
                 f"{r['recall_0.7_0.8']:.3f}; {r['false_positives']} false positives", where))

    ld_args = ["--tokens", "3e5", "--shards", "1", "--seq-length", "128", "--batches", "5"] if a.quick else []
    ld = _run("loader_throughput.py", ld_args, work)
    rows.append((f"GPTDataset index build, {ld['tokens'] / 1e6:.0f}M tokens, seq {ld['seq_length']}",
                 f"{ld['index_build_cold_s']} s cold, {ld['index_load_cached_s']} s from cache", where))
    for key in sorted(k for k in ld if k.startswith("workers_")):
        n = key.split("_")[1]
        rows.append((f"training loader, seq {ld['seq_length']} x micro-batch {ld['micro_batch_size']}, "
                     f"num_workers={n}, page-cached", f"{ld[key] / 1e6:.2f}M tok/s per rank", where))

    records = []
    if torch.cuda.is_available():
        gpu_args = (["--model", "tiny", "--seq-length", "128", "--steps", "2", "--warmup", "1"] if a.quick else
                    ["--model", "1b", "--micro-batch-size", "8", "--grad-accum", "8", "--compile", "--fuse-swiglu"])
        records.append(_run("gpu_throughput.py", gpu_args, work))
        gpu_where = ""
    else:
        gpu_where = " (recorded)"
        if os.path.exists(RECORDED):
            with open(RECORDED) as f:
                records = [json.loads(line) for line in f]
    rows += _gpu_rows(records, gpu_where)
    rows += _planner_rows(records, gpu_where)

    table = "\n".join(["| benchmark | measured | where, when |", "|---|---|---|"] +
                      [f"| {w} | {m} | {c} |" for w, m, c in rows])
    print(table)
    if a.update_readme:
        path = os.path.join(ROOT, "README.md")
        with open(path) as f:
            text = f.read()
        if BEGIN not in text or END not in text:
            raise SystemExit(f"README.md has no {BEGIN} ... {END} markers to replace")
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        write_text(path, f"{head}{BEGIN}\n{table}\n{END}{tail}")
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
