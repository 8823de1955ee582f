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
from data_prep.hashset import HashSet
from data_prep.indexed import IndexedWriter, read_index


def _kept(prefix: str, keep: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The tokens of the documents `keep` marks, back to back, and their lengths (numpy over the memory map)."""
    idx = read_index(prefix)
    lengths = idx["lengths"].astype(np.int64)
    data = np.memmap(f"{prefix}.bin", dtype=idx["dtype"], mode="r") if lengths.sum() else np.zeros(0, idx["dtype"])
    if keep.all():
        return np.asarray(data), lengths.tolist()
    return np.asarray(data)[np.repeat(keep, lengths)], lengths[keep].tolist()


def _rank_manifests(directory: str) -> list[dict]:
    """Every rank's manifest, checked to be complete and made with the same options and tokenizer."""
    paths = sorted(glob.glob(os.path.join(directory, "manifest-r*.json")))
    if not paths:
        raise FileNotFoundError(f"{directory}: no manifest-r*.json; run `prepare` with --world-size > 1 first")
    manifests = sorted((manifest_file.read(directory, os.path.basename(p)) for p in paths), key=lambda m: m["rank"])
    world = manifests[0]["world_size"]
    ranks = [m["rank"] for m in manifests]
    if ranks != list(range(world)):
        missing = sorted(set(range(world)) - set(ranks))
        raise ValueError(f"{directory}: manifests of ranks {missing} are missing (world size {world}); rerun those "
                         f"ranks before merging")
    base = {k: v for k, v in manifests[0]["options"].items() if k != "rank"}
    for m in manifests[1:]:
        if {k: v for k, v in m["options"].items() if k != "rank"} != base or \
                m["tokenizer"]["sha256"] != manifests[0]["tokenizer"]["sha256"]:
            raise ValueError(f"{directory}: rank {m['rank']} ran with different options or tokenizer")
    return manifests


def merge(directory: str, into: str | None = None) -> dict:
    manifests = _rank_manifests(directory)
    dedup = manifests[0]["options"].get("dedup", "exact") != "none"
    counts = {"documents_read": 0, "documents_kept": 0, "tokens": 0, "dropped": {}, "empty_files": 0}
    for m in manifests:
        counts["documents_read"] += m["counts"]["documents_read"]
        counts["empty_files"] += m["counts"]["empty_files"]
        for reason, n in m["counts"]["dropped"].items():
            counts["dropped"][reason] = counts["dropped"].get(reason, 0) + n
    writer = IndexedWriter(os.path.join(directory, into), np.dtype(_dtype_of(directory, manifests))) if into \
        else None
    seen, shards = HashSet(spill_dir=os.path.join(directory, ".merge-dedup")), []
    try:
        for m in manifests:  # rank order is input order
            for shard in m["shards"]:
                prefix = os.path.join(directory, shard["path"])
                hashes = np.load(f"{prefix}.hashes.npy")
                keep = seen.first_seen(hashes) if dedup else np.ones(len(hashes), dtype=bool)
                if not keep.all():
                    counts["dropped"]["exact_duplicate"] = counts["dropped"].get("exact_duplicate", 0) + \
                        int((~keep).sum())
                tokens, lengths = _kept(prefix, keep)
                counts["documents_kept"] += len(lengths)
                counts["tokens"] += int(sum(lengths))
                if writer is not None:
                    writer.add_many(tokens, lengths)
                elif not keep.all():
                    shards.append(_rewrite(prefix, tokens, lengths, shard))
                else:
                    shards.append(shard)
    finally:
        seen.close()
    if writer is not None:
        shards = [{"path": into, **writer.close()}]
    if counts["documents_read"] != counts["documents_kept"] + sum(counts["dropped"].values()):
        raise RuntimeError("accounting error while merging: read != kept + dropped")
    manifest = {**manifests[0], "shards": shards, "counts": counts, "rank": None, "world_size": len(manifests),
                "inputs": [f for m in manifests for f in m["inputs"]],
                "merged_ranks": [m["rank"] for m in manifests],
                "drop_examples": {k: v for m in manifests for k, v in m.get("drop_examples", {}).items()}}
    manifest_file.write(directory, manifest, rank=0, world_size=1)
    return manifest


def _dtype_of(directory: str, manifests) -> str:
    for m in manifests:
        for s in m["shards"]:
            return str(read_index(os.path.join(directory, s["path"]))["dtype"])
    return "uint16"


def _rewrite(prefix: str, tokens: np.ndarray, lengths: list[int], shard) -> dict:
    """A copy of the shard without its cross-rank duplicates. Rank outputs stay untouched, so merging again
    (say with --into) sees the same inputs."""
    writer = IndexedWriter(prefix + "-global", read_index(prefix)["dtype"])
    if lengths:
        writer.add_many(tokens, lengths)
    return {"path": shard["path"] + "-global", **writer.close()}
