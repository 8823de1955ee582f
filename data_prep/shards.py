"""The shards of one rank and their commit/resume protocol.

A shard is committed by writing, in this order: its .bin/.idx (atomically, by IndexedWriter), with --format
chat|instruction its loss mask (LOSS_MASK: an indexed dataset of uint8, one per token, the same documents with the
same lengths, so the token index's document i is the mask's document i), a .hashes.npy of
its documents' exact-dedup hashes (and .minhash.npy signatures with --dedup near), and last its .state.json,
atomically, holding the input position (chunk count) and the running counts at that point. A rerun verifies
every committed shard (document count and .bin sha256), restores the dedup state from them, and continues from
the recorded input position, so the final output equals an uninterrupted run's. A state file is only ever
written after everything it vouches for is on disk.
"""
from __future__ import annotations

import json
import os

import numpy as np

from common.files import file_sha256, save_npy, write_json
from data_prep.indexed import IndexedWriter, read_index, write_subset

FINISHED = -1  # the input position a run's last commit records: nothing left to read
LOSS_MASK = "-lossmask"  # a shard prefix + this: its loss mask's prefix (not a Megatron .bin of tokens)


def mask_prefix(prefix: str) -> str:
    return prefix + LOSS_MASK


def write_shard_subset(src_dir: str, shard: dict, dst_dir: str, dst_path: str, keep: np.ndarray) -> dict:
    """The documents of `shard` (in src_dir) that `keep` marks, as shard `dst_path` in dst_dir: new indexes over the
    same .bin files, its loss mask's too (data_prep.indexed.write_subset) -> the new shard's manifest entry."""
    info = write_subset(os.path.join(src_dir, shard["path"]), os.path.join(dst_dir, dst_path), keep)
    entry = {**shard, "path": dst_path, **info}
    if "loss_mask" in shard:  # the same documents of the mask
        name = mask_prefix(dst_path)
        sub = write_subset(os.path.join(src_dir, shard["loss_mask"]["path"]), os.path.join(dst_dir, name), keep)
        entry["loss_mask"] = {**shard["loss_mask"], "path": name, "supervised_tokens": sub["ones"]}
    return entry


class ShardSet:
    """The shards of one rank: the one being written, and the committed ones."""

    def __init__(self, directory: str, rank: int, dtype):
        self.dir, self.rank, self.dtype = directory, rank, dtype
        self.index = 0
        self.writer: IndexedWriter | None = None
        self.mask_writer: IndexedWriter | None = None
        self.hashes: list[np.ndarray] = []  # per unit: numpy, not one Python int per document
        self.sigs: list[np.ndarray] = []
        self.committed: list[dict] = []

    def prefix(self, i: int) -> str:
        return os.path.join(self.dir, f"shard-r{self.rank:03d}-{i:05d}")

    def add(self, flat: np.ndarray, lengths: list[int], hashes: list[int], sigs: np.ndarray | None,
            loss_mask: np.ndarray | None = None) -> None:
        """Documents (each already ending in EOD) back to back in `flat`, their exact hashes, (--dedup near)
        their MinHash signatures and (chat/instruction) their loss mask, aligned with `flat`."""
        if self.writer is None:
            self.writer = IndexedWriter(self.prefix(self.index), self.dtype)
            if loss_mask is not None:
                self.mask_writer = IndexedWriter(mask_prefix(self.prefix(self.index)), np.uint8)
        self.writer.add_many(flat, lengths)
        if self.mask_writer is not None:
            self.mask_writer.add_many(loss_mask, lengths)
        self.hashes.append(np.asarray(hashes, dtype=np.uint64))
        if sigs is not None:
            self.sigs.append(sigs)

    @property
    def open_tokens(self) -> int:
        return self.writer.tokens if self.writer else 0

    def commit(self, cursor: int, counts: dict) -> None:
        if self.writer is None:
            return
        prefix = self.prefix(self.index)
        info = self.writer.close()
        if self.mask_writer is not None:
            mask = self.mask_writer.close()
            info["loss_mask"] = {"path": os.path.basename(mask_prefix(prefix)), "bin_sha256": mask["bin_sha256"],
                                 "supervised_tokens": int(self.mask_writer.ones)}
        save_npy(f"{prefix}.hashes.npy", np.concatenate(self.hashes) if self.hashes else np.zeros(0, np.uint64))
        if self.sigs:
            save_npy(f"{prefix}.minhash.npy", np.concatenate(self.sigs))
        shard = {"path": os.path.basename(prefix), **info}
        write_json(f"{prefix}.state.json", {"shard": shard, "cursor": cursor, "counts": counts})
        self.committed.append(shard)
        self.index += 1
        self.writer, self.mask_writer, self.hashes, self.sigs = None, None, [], []

    def abort(self) -> None:
        """Remove the open shard's temporary files (a failed or interrupted run)."""
        for writer in (self.writer, self.mask_writer):
            if writer is not None:
                writer.abort()
        self.writer = self.mask_writer = None

    def restore(self, fingerprint: dict, seen) -> tuple[int, dict]:
        """Verify committed shards of an earlier run with the same fingerprint; restore the exact-dedup state into
        `seen` (near duplicates are found over the whole output at the end); -> (input position, counts) to
        continue from."""
        state_path = os.path.join(self.dir, f".prepare-r{self.rank:03d}.json")
        if os.path.exists(state_path):
            with open(state_path) as f:
                previous = json.load(f)
            if previous != fingerprint:
                raise ValueError(f"{self.dir} holds output of a run {_difference(previous, fingerprint)}; use a new "
                                 f"--output directory (or delete this one) to start over")
        write_json(state_path, fingerprint)
        cursor, counts = 0, {}
        while os.path.exists(f"{self.prefix(self.index)}.state.json"):
            prefix = self.prefix(self.index)
            with open(f"{prefix}.state.json") as f:
                state = json.load(f)
            verify_shard(prefix, state["shard"])
            seen.add(np.load(f"{prefix}.hashes.npy"))
            self.committed.append(state["shard"])
            cursor, counts = state["cursor"], state["counts"]
            self.index += 1
        return cursor, counts


def verify_shard(prefix: str, shard: dict) -> None:
    """A committed shard must be intact: document count from the index, and the .bin's size and sha256."""
    idx = read_index(prefix)
    if len(idx["lengths"]) != shard["documents"]:
        raise ValueError(f"{prefix}.idx: {len(idx['lengths'])} documents, the commit record says "
                         f"{shard['documents']}; delete the output directory and rerun")
    if file_sha256(f"{prefix}.bin") != shard["bin_sha256"]:
        raise ValueError(f"{prefix}.bin: checksum differs from its commit record; delete it and rerun")
    if "loss_mask" in shard:
        mask = os.path.join(os.path.dirname(prefix), shard["loss_mask"]["path"])
        if not np.array_equal(read_index(mask)["lengths"], idx["lengths"]) or \
                file_sha256(f"{mask}.bin") != shard["loss_mask"]["bin_sha256"]:
            raise ValueError(f"{mask}: the loss mask differs from its commit record or from its shard's documents; "
                             f"delete the output directory and rerun")


def _difference(previous: dict, now: dict) -> str:
    """What changed between an interrupted run and its rerun, in words."""
    before, after = {f[0]: f[1:] for f in previous.get("files", [])}, {f[0]: f[1:] for f in now.get("files", [])}
    if before != after:
        added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
        changed = sorted(f for f in set(before) & set(after) if before[f] != after[f])
        parts = [f"{label} {', '.join(fs[:3])}{' ...' if len(fs) > 3 else ''}"
                 for label, fs in (("added", added), ("removed", removed), ("changed", changed)) if fs]
        return "over other inputs (since then: " + "; ".join(parts) + ")"
    keys = sorted(k for k in set(previous) | set(now) if previous.get(k) != now.get(k))
    return f"with other options ({', '.join(keys)} differ)"
