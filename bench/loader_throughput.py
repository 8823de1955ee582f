"""Training-side data loading: index build time and loader throughput from page-cached shards.

Writes a synthetic dataset (random token ids, log-normal document lengths) of --tokens tokens as Megatron
.bin/.idx shards, then
  1. builds megatron's GPTDataset indices (document / sample / shuffle index) for one epoch at --seq-length,
     cold (empty cache) and again from the cache, through pretrain.data.build_datasets as training does;
  2. reads every .bin once so the shards are page-cached, then times the trainer's micro-batch iterator
     (pretrain.data.micro_batches: sampler, DataLoader workers, collate) for each --num-workers, and reports
     tokens/s for one rank.

  python bench/loader_throughput.py                      # 100M tokens, seq 2048, micro-batch 4
  python bench/loader_throughput.py --tokens 2e6 --batches 20   # seconds, for CI
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.report import emit  # noqa: E402

from data_prep.indexed import IndexedWriter  # noqa: E402


def write_synthetic(out: str, tokens: int, shards: int, vocab: int, eod: int, seed: int = 0):
    """`tokens` random ids in `shards` shards, documents ending in EOD. -> (shard prefixes, documents)."""
    rng = np.random.default_rng(seed)
    docs, prefixes = 0, []
    per_shard = tokens // shards
    for s in range(shards):
        prefixes.append(os.path.join(out, f"shard-{s:05d}"))
        w = IndexedWriter(prefixes[-1], np.uint16 if vocab < 65500 else np.int32)
        left = per_shard
        while left > 0:  # in blocks of ~4M tokens, to bound memory
            lengths = np.maximum(2, rng.lognormal(6.5, 1.0, size=4096).astype(np.int64))  # median ~665 tokens
            if lengths.sum() > left:  # the last block ends exactly at the shard's token count
                lengths = lengths[np.cumsum(lengths) <= left]
                lengths = np.append(lengths, left - lengths.sum()) if lengths.sum() < left else lengths
            flat = rng.integers(0, vocab, size=int(lengths.sum()), dtype=np.int64)
            flat[np.cumsum(lengths) - 1] = eod
            w.add_many(flat, lengths.tolist())
            left -= int(lengths.sum())
            docs += len(lengths)
        w.close()
    return prefixes, docs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=100e6)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--batches", type=int, default=300, help="micro-batches timed per pass")
    p.add_argument("--repeat", type=int, default=5, help="timed passes per worker count; the median is reported")
    p.add_argument("--num-workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--dir", help="where to write the dataset (default: a temporary directory, removed after)")
    p.add_argument("--json", help="append the results as one JSON line to this file")
    a = p.parse_args(argv)

    from pretrain.data import DataConfig, build_datasets, micro_batches

    work = a.dir or tempfile.mkdtemp(prefix="bench-loader-")
    os.makedirs(work, exist_ok=True)
    result = {"tokens": int(a.tokens), "seq_length": a.seq_length, "micro_batch_size": a.micro_batch_size}
    try:
        t0 = time.perf_counter()
        prefixes, result["documents"] = write_synthetic(work, int(a.tokens), a.shards, a.vocab_size, eod=0)
        result["write_s"] = round(time.perf_counter() - t0, 2)
        cfg = DataConfig(data_path=prefixes, split="98,1,1", seq_length=a.seq_length, seed=1234,
                         cache_dir=os.path.join(work, "cache"), vocab_size=a.vocab_size, eod_id=0)
        train_samples = int(a.tokens * 0.98) // (a.seq_length + 1)  # one epoch of the train split
        samples = (train_samples, max(1, train_samples // 100), max(1, train_samples // 100))
        for name in ("index_build_cold_s", "index_load_cached_s"):
            t0 = time.perf_counter()
            train, _, _ = build_datasets(cfg, samples)
            result[name] = round(time.perf_counter() - t0, 3)
        result["train_samples"] = len(train)
        print(f"{a.tokens / 1e6:.0f}M tokens, {result['documents']} documents in {a.shards} shards "
              f"(written in {result['write_s']} s); GPTDataset index for {len(train)} samples of {a.seq_length}: "
              f"built in {result['index_build_cold_s']} s, loaded from cache in {result['index_load_cached_s']} s",
              flush=True)

        for f in sorted(os.listdir(work)):  # page-cache the shards
            if f.endswith(".bin"):
                with open(os.path.join(work, f), "rb") as fh:
                    while fh.read(64 << 20):
                        pass
        per_batch = a.micro_batch_size * a.seq_length
        for workers in a.num_workers:
            it = micro_batches(train, 0, a.micro_batch_size, 0, 1, num_workers=workers)
            for _ in range(min(10, a.batches)):  # worker start-up and first fetches are not steady state
                next(it)
            rates = []
            for _ in range(a.repeat):  # one pass of 300 batches takes ~0.1 s at num_workers=0: noisy alone
                n, t0 = 0, time.perf_counter()
                for batch in it:
                    assert batch["tokens"].shape == (a.micro_batch_size, a.seq_length)
                    n += 1
                    if n == a.batches:
                        break
                rates.append(n / (time.perf_counter() - t0))
            rate = sorted(rates)[len(rates) // 2]
            tps = rate * per_batch
            result[f"workers_{workers}_tokens_per_s"] = round(tps)
            print(f"num_workers={workers}: {tps / 1e6:.2f}M tokens/s per rank "
                  f"({rate:.0f} micro-batches/s of {a.micro_batch_size}x{a.seq_length}, median of {a.repeat} passes)",
                  flush=True)
    finally:
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)
    return emit(result, a.json)


if __name__ == "__main__":
    sys.exit(main())
