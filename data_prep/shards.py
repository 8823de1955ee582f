"""The shards of one rank and their commit/resume protocol.

A shard is committed by writing, in this order: its .bin/.idx (atomically, by IndexedWriter), a .hashes.npy of
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
from data_prep.indexed import IndexedWriter, read_index

FINISHED = -1  # the input position a run's last commit records: nothing left to read


class ShardSet:
    """The shards of one rank: the one being written, and the committed ones."""

    def __init__(self, directory: str, rank: int, dtype):
        self.dir, self.rank, self.dtype = directory, rank, dtype
        self.index = 0
        self.writer: IndexedWriter | None = None
        self.hashes: list[np.ndarray] = []  # per unit: numpy, not one Python int per document
        self.sigs: list[np.ndarray] = []
        self.committed: list[dict] = []

    def prefix(self, i: int) -> str:
        return os.path.join(self.dir, f"shard-r{self.rank:03d}-{i:05d}")

    def add(self, flat: np.ndarray, lengths: list[int], hashes: list[int], sigs: np.ndarray | None) -> None:
        """Documents (each already ending in EOD) back to back in `flat`, their exact hashes and (--dedup near)
        their MinHash signatures."""
        if self.writer is None:
            self.writer = IndexedWriter(self.prefix(self.index), self.dtype)
        self.writer.add_many(flat, lengths)
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
        save_npy(f"{prefix}.hashes.npy", np.concatenate(self.hashes) if self.hashes else np.zeros(0, np.uint64))
        if self.sigs:
            save_npy(f"{prefix}.minhash.npy", np.concatenate(self.sigs))
        shard = {"path": os.path.basename(prefix), **info}
        write_json(f"{prefix}.state.json", {"shard": shard, "cursor": cursor, "counts": counts})
        self.committed.append(shard)
        self.index += 1
        self.writer, self.hashes, self.sigs = None, [], []

    def abort(self) -> None:
        """Remove the open shard's temporary files (a failed or interrupted run)."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None

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
