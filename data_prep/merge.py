"""Combine per-rank outputs: one manifest, exact dedup made global, optionally one .bin/.idx prefix.

Ranks own contiguous blocks of the sorted inputs, so walking ranks in order walks the input in order; a
document whose hash already appeared in an earlier rank is a cross-rank duplicate and is removed (its shard
is rewritten). The result holds the same tokens as a single-process run (with --dedup exact).
"""
from __future__ import annotations

import glob
import os

import numpy as np

from data_prep import manifest as manifest_file
from data_prep.indexed import IndexedWriter, read_index


def _documents(prefix: str):
    idx = read_index(prefix)
    data = np.memmap(f"{prefix}.bin", dtype=idx["dtype"], mode="r")
    item = idx["dtype"].itemsize
    for ptr, n in zip(idx["pointers"], idx["lengths"]):
        yield data[ptr // item: ptr // item + n]


def merge(directory: str, into: str | None = None) -> dict:
    paths = sorted(glob.glob(os.path.join(directory, "manifest-r*.json")))
    if not paths:
        raise FileNotFoundError(f"{directory}: no manifest-r*.json; run `prepare` with --world-size > 1 first")
    manifests = [manifest_file.read(directory, os.path.basename(p)) for p in paths]
    world = manifests[0]["world_size"]
    ranks = sorted(m["rank"] for m in manifests)
    if ranks != list(range(world)):
        missing = sorted(set(range(world)) - set(ranks))
        raise ValueError(f"{directory}: manifests of ranks {missing} are missing (world size {world}); rerun those "
                         f"ranks before merging")
    base = {k: v for k, v in manifests[0]["options"].items() if k != "rank"}
    for m in manifests[1:]:
        if {k: v for k, v in m["options"].items() if k != "rank"} != base or \
                m["tokenizer"]["sha256"] != manifests[0]["tokenizer"]["sha256"]:
            raise ValueError(f"{directory}: rank {m['rank']} ran with different options or tokenizer")
    dedup = base.get("dedup", "exact") != "none"
    seen: set[int] = set()
    counts = {"documents_read": 0, "documents_kept": 0, "tokens": 0, "dropped": {}, "empty_files": 0}
    shards, writer, merged = [], None, []
    if into:
        writer = IndexedWriter(os.path.join(directory, into), np.dtype(_dtype_of(directory, manifests)))
    for m in sorted(manifests, key=lambda m: m["rank"]):
        c = m["counts"]
        counts["documents_read"] += c["documents_read"]
        counts["empty_files"] += c["empty_files"]
        for reason, n in c["dropped"].items():
            counts["dropped"][reason] = counts["dropped"].get(reason, 0) + n
        for shard in m["shards"]:
            prefix = os.path.join(directory, shard["path"])
            hashes = np.load(f"{prefix}.hashes.npy")
            keep = []
            for h in hashes.tolist():
                keep.append(not (dedup and h in seen))
                seen.add(h)
            n_dup = keep.count(False)
            if n_dup:
                counts["dropped"]["exact_duplicate"] = counts["dropped"].get("exact_duplicate", 0) + n_dup
            docs = [d for d, k in zip(_documents(prefix), keep) if k]
            counts["documents_kept"] += len(docs)
            counts["tokens"] += int(sum(len(d) for d in docs))
            if writer is not None:
                for d in docs:
                    writer.add(d)
            elif n_dup:
                shards.append(_rewrite(prefix, docs, shard))
            else:
                shards.append(shard)
    if writer is not None:
        info = writer.close()
        shards = [{"path": into, **info}]
        merged = [m["rank"] for m in manifests]
    if counts["documents_read"] != counts["documents_kept"] + sum(counts["dropped"].values()):
        raise RuntimeError("accounting error while merging: read != kept + dropped")
    manifest = {**manifests[0], "shards": shards, "counts": counts, "rank": None, "world_size": world,
                "inputs": [f for m in manifests for f in m["inputs"]], "merged_ranks": merged or ranks}
    manifest_file.write(directory, manifest, rank=0, world_size=1)
    return manifest


def _dtype_of(directory: str, manifests) -> str:
    for m in manifests:
        for s in m["shards"]:
            return str(read_index(os.path.join(directory, s["path"]))["dtype"])
    return "uint16"


def _rewrite(prefix: str, docs, shard) -> dict:
    """A copy of the shard without its cross-rank duplicates. Rank outputs stay untouched, so merging again
    (say with --into) sees the same inputs."""
    writer = IndexedWriter(prefix + "-global", read_index(prefix)["dtype"])
    for d in docs:
        writer.add(d)
    return {"path": shard["path"] + "-global", **writer.close()}
