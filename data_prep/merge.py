"""Combine per-rank outputs: one manifest, exact and near dedup made global, optionally one .bin/.idx prefix.

Ranks own contiguous blocks of the sorted inputs, so walking ranks in order walks the input in order. A document
whose text already appeared in an earlier rank is a cross-rank exact duplicate; with --dedup near, the MinHash
clusters are then formed over every rank's surviving documents at once (data_prep/minhash.py), keeping each
cluster's first document. Shards lose their removed documents through a new index over the same .bin. The
result holds the same documents as a single-process run, whatever the number of ranks.
"""
from __future__ import annotations

import glob
import os

import numpy as np

from data_prep import manifest as manifest_file, minhash
from data_prep.hashset import HashSet
from data_prep.indexed import IndexedWriter, read_index
from data_prep.shards import LOSS_MASK, write_shard_subset


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
    if into is not None:
        manifest_file.check_shard_name(into)  # it becomes a shard path of the manifest
    manifests = _rank_manifests(directory)
    options = manifests[0]["options"]
    counts = {"documents_read": 0, "documents_kept": 0, "tokens": 0, "dropped": {}, "empty_files": 0}
    masked = "truncated" in manifests[0]["counts"]  # conversations: loss masks travel with the shards
    if masked:
        counts.update(truncated=sum(m["counts"]["truncated"] for m in manifests), supervised_tokens=0)
    for m in manifests:
        counts["documents_read"] += m["counts"]["documents_read"]
        counts["empty_files"] += m["counts"]["empty_files"]
        for reason, n in m["counts"]["dropped"].items():
            counts["dropped"][reason] = counts["dropped"].get(reason, 0) + n
    ranked = [shard for m in manifests for shard in m["shards"]]  # rank order is input order
    keep = _exact_keep(directory, ranked, options.get("dedup", "exact") != "none", counts)
    if options.get("dedup") == "near":
        keep, dropped = minhash.near_keep_masks(directory, ranked, options["near_threshold"],
                                                options.get("near_bands"), options.get("near_rows"),
                                                options["num_perm"], base_keep=keep)
        _count(counts, "near_duplicate", dropped)
    shards = _write(directory, ranked, keep, into, counts, np.dtype(_dtype_of(directory, manifests)))
    if counts["documents_read"] != counts["documents_kept"] + sum(counts["dropped"].values()):
        raise RuntimeError("accounting error while merging: read != kept + dropped")
    manifest = {**manifests[0], "shards": shards, "counts": counts, "rank": None, "world_size": len(manifests),
                "inputs": [f for m in manifests for f in m["inputs"]],
                "merged_ranks": [m["rank"] for m in manifests],
                "drop_examples": {k: v for m in manifests for k, v in m.get("drop_examples", {}).items()}}
    manifest_file.write(directory, manifest, rank=0, world_size=1)
    return manifest


def _count(counts: dict, reason: str, n: int) -> None:
    if n:
        counts["dropped"][reason] = counts["dropped"].get(reason, 0) + n


def _exact_keep(directory: str, shards: list[dict], dedup: bool, counts: dict) -> list[np.ndarray]:
    """Per shard: documents that are the first of their text across all ranks (streaming, data_prep.hashset)."""
    seen, keep = HashSet(spill_dir=os.path.join(directory, ".merge-dedup")), []
    try:
        for shard in shards:
            hashes = np.load(os.path.join(directory, shard["path"] + ".hashes.npy"))
            keep.append(seen.first_seen(hashes) if dedup else np.ones(len(hashes), dtype=bool))
            _count(counts, "exact_duplicate", int((~keep[-1]).sum()))
    finally:
        seen.close()
    return keep


def _write(directory: str, shards: list[dict], keep: list[np.ndarray], into: str | None, counts: dict,
           dtype) -> list[dict]:
    """The merged output: every kept document in one new prefix (--into), or each rank's shards as they are,
    re-indexed without the removed documents (data_prep.indexed.write_subset: the .bin is shared, not copied).
    Rank outputs stay untouched, so merging again (say with --into) sees the same inputs."""
    masked = bool(shards) and "loss_mask" in shards[0]
    writer = IndexedWriter(os.path.join(directory, into), dtype) if into else None
    mask_writer = IndexedWriter(os.path.join(directory, into + LOSS_MASK), np.uint8) if into and masked else None
    out = []
    for shard, mask in zip(shards, keep):
        prefix = os.path.join(directory, shard["path"])
        loss_mask = os.path.join(directory, shard["loss_mask"]["path"]) if masked else None
        if writer is not None:
            tokens, lengths = _kept(prefix, mask)
            if lengths:
                writer.add_many(tokens, lengths)
                if mask_writer is not None:
                    mask_writer.add_many(_kept(loss_mask, mask)[0], lengths)
            info = {"documents": len(lengths), "tokens": int(sum(lengths))}
        elif mask.all():
            info = shard
            out.append(shard)
        else:
            info = write_shard_subset(directory, shard, directory, shard["path"] + "-global", mask)
            out.append(info)
        counts["documents_kept"] += info["documents"]
        counts["tokens"] += info["tokens"]
    if writer is None:
        if masked:
            counts["supervised_tokens"] = sum(s["loss_mask"]["supervised_tokens"] for s in out)
        return out
    merged = {"path": into, **writer.close()}
    if mask_writer is not None:
        m = mask_writer.close()
        merged["loss_mask"] = {"path": into + LOSS_MASK, "bin_sha256": m["bin_sha256"],
                               "supervised_tokens": mask_writer.ones}
        counts["supervised_tokens"] = mask_writer.ones
    return [merged]


def _dtype_of(directory: str, manifests) -> str:
    for m in manifests:
        for s in m["shards"]:
            return str(read_index(os.path.join(directory, s["path"]))["dtype"])
    return "uint16"
