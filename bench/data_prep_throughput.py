"""`data_prep prepare` against the fastest way to tokenize the same JSONL, all measured in one run.

Corpus: English prose JSONL built from the machine's documentation (bench/corpus.py, default 70 MB), a
byte-level BPE 32k trained on its first 20 MB by `data_prep train-tokenizer` (its throughput is reported too).
For each worker count N, as back-to-back rounds (the median round is reported; this VM's run-to-run noise is
several percent), wall time of a fresh process including start-up, in input MB/s:

  prepare                 `python -m data_prep prepare --workers N` (default cleaning + exact dedup)
  prepare, raw            the same with --no-normalize --dedup none (no cleaning, no dedup)
  prepare, near           the same with --dedup near (exact + MinHash clusters), against prepare (issue 22)
  gigatoken files + bin   gigatoken.encode_files(JsonlFileSource) + EOD + one .bin write, N threads: the work of
                          Megatron-LM's tools/preprocess_data_fast.py, the anchor
  gigatoken encode        gigatoken encode_batch of the already-extracted documents, N threads (tokenizer only)
  tokenizers encode       HF tokenizers encode_batch_fast of the same documents, N threads (the old anchor)

Targets (issue 14): prepare >= 0.5x and prepare raw >= 0.8x the anchor. Peak RSS of prepare (all its processes)
is reported per input size with --sizes (e.g. --sizes 70 1024): memory must stay flat as the input grows.

  python bench/data_prep_throughput.py [--mb 70] [--workers 1 2] [--rounds 3] [--sizes 70 1024]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.corpus import prose_jsonl  # noqa: E402
from bench.report import emit  # noqa: E402

ANCHOR = r"""
import sys, time, numpy as np
t0 = time.perf_counter()
import gigatoken
path, tok_path, out, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = gigatoken.Tokenizer(tok_path)
ids = tok.encode_files(gigatoken.JsonlFileSource([path], field="text"), parallel=threads > 1)
offsets = np.asarray(ids.layout.offsets.data)
flat = np.asarray(ids.layout.content.data)[offsets[0]:offsets[-1]].astype(np.uint16)
packed = np.insert(flat, offsets[1:] - offsets[0], 0)  # EOD after each document
with open(out, "wb") as f:
    f.write(packed.tobytes())
print(len(flat), time.perf_counter() - t0)
"""

ENCODE = r"""
import json, sys, time
backend, docs, tok_path = sys.argv[1], sys.argv[2], sys.argv[3]
texts = json.load(open(docs))
if backend == "gigatoken":
    import gigatoken
    tok = gigatoken.Tokenizer(tok_path)
    t0 = time.perf_counter(); n = len(tok.encode_batch(texts, parallel=True).layout.content)
else:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tok_path + "/tokenizer.json")
    t0 = time.perf_counter(); n = sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False))
print(n, time.perf_counter() - t0)
"""


def _timed(cmd: list[str], env: dict | None = None) -> tuple[float, str, int]:
    """-> (wall seconds, stdout, peak RSS in KiB of its largest process: itself or a worker it waited for) of a
    fresh process."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    return wall, stdout, usage.ru_maxrss


def prepare(corpus: str, tok: str, out: str, workers: int, raw: bool, near: bool = False) -> tuple[float, int]:
    flags = ["--no-normalize", "--dedup", "none", "--max-chars", str(10**9)] if raw else \
        ["--dedup", "near"] if near else []
    wall, _, rss = _timed([sys.executable, "-m", "data_prep", "prepare", "--input", corpus, "--tokenizer", tok,
                           "--output", out, "--workers", str(workers), "--progress", "log", *flags])
    return wall, rss


def anchor(corpus: str, tok: str, out: str, threads: int) -> float:
    wall, _, _ = _timed([sys.executable, "-c", ANCHOR, corpus, tok, out, str(threads)],
                        env={"RAYON_NUM_THREADS": str(threads)})
    return wall


def encode_only(backend: str, docs: str, tok: str, threads: int) -> float:
    """Seconds inside the encode call alone (no start-up), for the tokenizer limits."""
    _, out, _ = _timed([sys.executable, "-c", ENCODE, backend, docs, tok],
                       env={"RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"})
    return float(out.split()[1])


def _documents(corpus: str, docs_path: str) -> None:
    """The texts prepare tokenizes in the raw mode (the JSON field, as it is)."""
    import orjson

    with open(corpus, "rb") as f:
        texts = [orjson.loads(line)["text"] for line in f if line.strip()]
    with open(docs_path, "w") as f:
        json.dump(texts, f)


def measure(corpus: str, tok: str, work: str, workers: list[int], rounds: int) -> dict:
    mb = os.path.getsize(corpus) / 2**20
    docs = os.path.join(work, "docs.json")
    _documents(corpus, docs)
    results = {}
    for n in workers:
        runs = []
        for r in range(rounds):
            row = {"anchor_s": anchor(corpus, tok, os.path.join(work, "anchor.bin"), n)}
            row["prepare_s"], row["prepare_rss_kib"] = prepare(corpus, tok, os.path.join(work, f"p{n}{r}"), n, False)
            row["raw_s"], _ = prepare(corpus, tok, os.path.join(work, f"r{n}{r}"), n, True)
            row["near_s"], _ = prepare(corpus, tok, os.path.join(work, f"n{n}{r}"), n, False, near=True)
            row["gigatoken_encode_s"] = encode_only("gigatoken", docs, tok, n)
            row["tokenizers_encode_s"] = encode_only("tokenizers", docs, tok, n)
            row.update(prepare_vs_anchor=round(row["anchor_s"] / row["prepare_s"], 3),
                       raw_vs_anchor=round(row["anchor_s"] / row["raw_s"], 3),
                       near_vs_exact=round(row["prepare_s"] / row["near_s"], 3))
            runs.append(row)
            print(f"{n} worker(s), round {r + 1}: anchor {mb / row['anchor_s']:.1f} MB/s, prepare "
                  f"{mb / row['prepare_s']:.1f} MB/s ({row['prepare_vs_anchor']:.2f}x), raw {mb / row['raw_s']:.1f} "
                  f"MB/s ({row['raw_vs_anchor']:.2f}x), --dedup near {mb / row['near_s']:.1f} MB/s "
                  f"({row['near_vs_exact']:.2f}x exact); encode only: gigatoken {mb / row['gigatoken_encode_s']:.0f} "
                  f"MB/s, tokenizers {mb / row['tokenizers_encode_s']:.1f} MB/s", flush=True)
        median = sorted(runs, key=lambda x: x["prepare_vs_anchor"])[len(runs) // 2]
        results[f"workers_{n}"] = {**{k: round(v, 3) for k, v in median.items()},
                                   "prepare_vs_anchor_all": [x["prepare_vs_anchor"] for x in runs],
                                   "raw_vs_anchor_all": [x["raw_vs_anchor"] for x in runs],
                                   "near_vs_exact_all": [x["near_vs_exact"] for x in runs]}
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=70, help="corpus size")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--sizes", type=float, nargs="*", default=[], help="also: peak RSS of prepare at these MB")
    p.add_argument("--json", help="append the results as one JSON line to this file")
    a = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-dp-")
    corpus = os.path.join(work, "corpus.jsonl")
    info = prose_jsonl(corpus, a.mb)
    head = os.path.join(work, "head.jsonl")
    with open(corpus, "rb") as src, open(head, "wb") as dst:
        dst.writelines(line for line, _ in zip(src, range(max(1, info["documents"] * 20 // int(a.mb)))))
    tok = os.path.join(work, "tok")
    t, _, _ = _timed([sys.executable, "-m", "data_prep", "train-tokenizer", "--input", head, "--vocab-size",
                      str(a.vocab_size), "--output", tok])
    results = {"corpus_mb": round(info["bytes"] / 2**20, 1), "documents": info["documents"],
               "train_tokenizer_mb_per_s": round(os.path.getsize(head) / 2**20 / t, 2),
               **measure(corpus, tok, work, a.workers, a.rounds)}
    for size in a.sizes:  # memory as the input grows (2 workers)
        big = os.path.join(work, f"corpus-{size:g}.jsonl")
        prose_jsonl(big, size)
        wall, rss = prepare(big, tok, os.path.join(work, f"big-{size:g}"), 2, False)
        results[f"prepare_{size:g}mb"] = {"wall_s": round(wall, 2), "peak_rss_mib": round(rss / 1024, 1)}
        os.remove(big)
    return emit(results, a.json)


if __name__ == "__main__":
    sys.exit(main())
