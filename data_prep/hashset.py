"""A set of 64-bit document hashes for exact dedup that stays small: 10^9 documents in about 1.5 GB of memory.

A Python set of ints costs ~70 bytes per document (70 GB per billion) and merge used to rebuild the global one
in a single process. Here hashes live in sorted numpy runs (a log-structured merge: a new run is merged into
the previous one while it is not smaller, so a rank holds O(log n) runs), spilled to .npy files in a work
directory once large and searched there through memory maps, behind a Bloom filter in memory (~1.2 bytes per
document) that answers "never seen" for most new documents without touching the runs. The answer is exact: the
Bloom filter only decides when to look, never what is kept.

`first_seen(hashes)` takes one work unit's hashes in input order and says, for each, whether this is its first
occurrence (earlier units and earlier in the same unit both count), then remembers them all.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

_SPILL = 1 << 22  # runs of at least this many hashes (32 MB) live on disk, memory-mapped


class HashSet:
    def __init__(self, spill_dir: str | None = None, expected: int = 1 << 24, bits_per_item: int = 10):
        self._dir = spill_dir
        self._owned_dir = None
        self.runs: list[np.ndarray] = []  # sorted, disjoint; the newest last
        self.count = 0
        self._k = 7  # hash functions, ~optimal for 10 bits per item (false positives ~1%)
        self._bits_per_item = bits_per_item
        self._bloom = np.zeros(0, dtype=np.uint64)
        self._grow_bloom(max(expected, 1 << 16))

    # ----------------------------------------------------------------------------------- Bloom filter
    def _grow_bloom(self, capacity: int) -> None:
        """(Re)build the filter for `capacity` items from the runs (it doubles as the set grows)."""
        words = 1 << max(6, int(np.ceil(np.log2(capacity * self._bits_per_item / 64))))
        self._capacity, self._bloom = capacity, np.zeros(words, dtype=np.uint64)
        for run in self.runs:
            for part in np.array_split(run, max(1, len(run) // _SPILL)):
                self._bloom_add(np.asarray(part))

    def _positions(self, h: np.ndarray) -> np.ndarray:
        """k bit positions per hash, by double hashing (the hashes are already uniform 64-bit values)."""
        nbits = np.uint64(len(self._bloom) * 64)
        h1, h2 = h, (h >> np.uint64(17)) | np.uint64(1)
        i = np.arange(self._k, dtype=np.uint64)[:, None]
        return (h1[None, :] + i * h2[None, :]) % nbits  # wraps modulo 2**64 first: still well mixed

    def _bloom_add(self, h: np.ndarray) -> None:
        pos = self._positions(h).ravel()
        np.bitwise_or.at(self._bloom, (pos >> np.uint64(6)).astype(np.int64),
                         np.left_shift(np.uint64(1), pos & np.uint64(63)))

    def _bloom_maybe(self, h: np.ndarray) -> np.ndarray:
        pos = self._positions(h)
        words = self._bloom[(pos >> np.uint64(6)).astype(np.int64)]
        return ((words >> (pos & np.uint64(63))) & np.uint64(1)).astype(bool).all(axis=0)

    # ----------------------------------------------------------------------------------- membership
    def contains(self, h: np.ndarray) -> np.ndarray:
        h = np.asarray(h, dtype=np.uint64)
        found = np.zeros(len(h), dtype=bool)
        maybe = np.flatnonzero(self._bloom_maybe(h)) if len(h) else np.zeros(0, dtype=np.int64)
        if len(maybe):
            q = h[maybe]
            for run in self.runs:
                i = np.searchsorted(run, q)
                hit = (i < len(run)) & (run[np.minimum(i, len(run) - 1)] == q)
                found[maybe[hit]] = True
        return found

    def first_seen(self, h) -> np.ndarray:
        """For each hash of one unit, in input order: True at its first occurrence ever. Then remembers all."""
        h = np.asarray(h, dtype=np.uint64)
        if len(h) == 0:
            return np.zeros(0, dtype=bool)
        _, first_index = np.unique(h, return_index=True)
        first = np.zeros(len(h), dtype=bool)
        first[first_index] = True  # first within the unit...
        first &= ~self.contains(h)  # ...and never seen before it
        self.add(h[first])
        return first

    def add(self, h: np.ndarray) -> None:
        """Remember hashes known to be new and distinct."""
        if len(h) == 0:
            return
        run = np.sort(np.asarray(h, dtype=np.uint64))
        self.count += len(run)
        if self.count > self._capacity:
            self.runs.append(run)
            self._compact()
            self._grow_bloom(2 * self.count)
            return
        self._bloom_add(run)
        self.runs.append(run)
        self._compact()

    def _compact(self) -> None:
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            b, a = self.runs.pop(), self.runs.pop()
            self.runs.append(self._merge(a, b))
            self._remove_unused_files()

    def _merge(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Two sorted runs of distinct hashes -> one; on disk, in blocks, once it is large."""
        n = len(a) + len(b)
        if n < _SPILL:
            merged = np.concatenate([a, b])
            merged.sort()
            return merged
        if self._dir is None:
            self._dir = self._owned_dir = tempfile.mkdtemp(prefix="dedup-hashes-")
        os.makedirs(self._dir, exist_ok=True)
        self._serial = getattr(self, "_serial", 0) + 1
        path = os.path.join(self._dir, f"run-{self._serial:06d}.npy")
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint64, shape=(n,))
        i = j = k = 0
        while i < len(a) or j < len(b):
            # everything up to the smaller of the two blocks' last values can be written now
            pivot = min(a[min(i + _SPILL, len(a)) - 1] if i < len(a) else np.uint64(2**64 - 1),
                        b[min(j + _SPILL, len(b)) - 1] if j < len(b) else np.uint64(2**64 - 1))
            i2 = i + int(np.searchsorted(a[i:i + _SPILL], pivot, side="right"))
            j2 = j + int(np.searchsorted(b[j:j + _SPILL], pivot, side="right"))
            block = np.concatenate([np.asarray(a[i:i2]), np.asarray(b[j:j2])])
            block.sort()
            out[k:k + len(block)] = block
            i, j, k = i2, j2, k + len(block)
        out.flush()
        del out
        return np.load(path, mmap_mode="r")

    def _remove_unused_files(self) -> None:
        if not self._dir or not os.path.isdir(self._dir):
            return
        live = {os.path.abspath(r.filename) for r in self.runs if isinstance(r, np.memmap) and r.filename}
        for name in os.listdir(self._dir):
            path = os.path.abspath(os.path.join(self._dir, name))
            if name.startswith("run-") and path not in live:
                os.remove(path)

    def nbytes_in_memory(self) -> int:
        return self._bloom.nbytes + sum(r.nbytes for r in self.runs if not isinstance(r, np.memmap))

    def close(self) -> None:
        """Forget everything and remove the spilled runs (ours, whether the directory was given or not)."""
        self.runs = []
        self._remove_unused_files()
        if self._owned_dir:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
        elif self._dir and os.path.isdir(self._dir) and not os.listdir(self._dir):
            os.rmdir(self._dir)
