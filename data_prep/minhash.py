"""Near-duplicate detection at corpus scale: MinHash signatures in the workers, clusters across all ranks.

Shingles are runs of SHINGLE consecutive token ids (the tokenizer has already split the text, so no Python
word loop is needed), hashed with numpy over a whole work unit at once. Signatures use one-permutation hashing
(Li, Owen & Zhang 2012): each shingle hash is hashed once more, its top bits choose one of `num_perm` buckets and
the bucket keeps its smallest value; empty buckets (short documents) take the next non-empty bucket's value
(Shrivastava 2017's densification). The fraction of equal buckets estimates the Jaccard similarity of two
documents' shingle sets as num_perm independent permutations would, at the cost of one.

Clustering is global and order-defined, so the survivors do not depend on how the input was split over ranks:
documents are numbered in input order (rank order is input order); signatures are cut into `bands` bands of
`rows` values; documents whose band values collide are candidates, and a candidate pair whose signatures agree
on at least `threshold` of their buckets is joined (union-find). Each cluster keeps its first document.
"""
from __future__ import annotations

import os

import numpy as np

SHINGLE = 8  # token ids per shingle (about five words of English)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-mixed 64-bit hash of each value."""
    h = h ^ (h >> np.uint64(30))
    h = h * _M1
    h = h ^ (h >> np.uint64(27))
    h = h * _M2
    return h ^ (h >> np.uint64(31))


def signatures(flat: np.ndarray, lengths: np.ndarray, num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """[documents, num_perm] uint32 MinHash signatures of documents given back to back as token ids."""
    bits = int(np.log2(num_perm))
    if 1 << bits != num_perm:
        raise ValueError(f"--num-perm {num_perm}: use a power of two")
    n_docs, k = len(lengths), SHINGLE
    sig = np.full((n_docs, num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    if n_docs == 0 or len(flat) == 0:
        return _densify(sig)
    ids = flat.astype(np.uint64) + np.uint64(1)
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    # every window of k tokens of the flat array, hashed with contiguous slices (no gathers); windows that run
    # past their document's end are dropped, documents shorter than k get one shingle of all their tokens
    doc_h, doc_of = [], []
    if len(ids) >= k:
        h = np.full(len(ids) - k + 1, np.uint64(seed))
        for j in range(k):
            h = h * np.uint64(0x100000001B3) + ids[j:len(ids) - k + 1 + j]
        owner = np.repeat(np.arange(n_docs), lengths)[:len(h)]
        keep = np.arange(len(h)) + k <= ends[owner]
        doc_h.append(h[keep])
        doc_of.append(owner[keep])
    for d in np.flatnonzero((lengths < k) & (lengths > 0)):
        h = np.full(1, np.uint64(seed))  # arrays wrap silently; numpy scalars would warn
        for t in ids[ends[d] - lengths[d]:ends[d]]:
            h = h * np.uint64(0x100000001B3) + t
        doc_h.append(h)
        doc_of.append(np.array([d]))
    h, doc = _mix(np.concatenate(doc_h)), np.concatenate(doc_of)
    bucket = (h >> np.uint64(64 - bits)).astype(np.int64)
    np.minimum.at(sig, (doc, bucket), (h & np.uint64(0xFFFFFFFF)).astype(np.uint32))
    return _densify(sig)


def _densify(sig: np.ndarray) -> np.ndarray:
    """Empty buckets take the value of the next non-empty one to the right (circularly), mixed with the distance
    travelled, so that two documents agree on an empty bucket only as often as on the bucket it borrows from."""
    empty = sig == np.iinfo(np.uint32).max
    if not empty.any():
        return sig
    n, k = sig.shape
    idx = np.where(~empty, np.arange(k), k * 2)
    nxt = np.minimum.accumulate(np.concatenate([idx, idx + k], axis=1)[:, ::-1], axis=1)[:, ::-1][:, :k]
    src = nxt % k
    dist = (nxt - np.arange(k)).astype(np.uint64)
    borrowed = sig[np.arange(n)[:, None], src].astype(np.uint64)
    mixed = (_mix(borrowed + dist * np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    all_empty = empty.all(axis=1)
    out = np.where(empty, mixed, sig)
    out[all_empty] = 0
    return out


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands x rows (b * r <= num_perm) for a candidate probability of at least 0.99 at `threshold`, with as
    few candidates below it as that allows (every candidate is verified against the threshold anyway)."""
    best = None
    for r in range(1, num_perm + 1):
        b = num_perm // r
        p_at = 1 - (1 - threshold ** r) ** b
        if p_at >= 0.99:
            best = (b, r)
    return best or (num_perm, 1)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[documents, bands] uint64: each band's rows (band b: columns b*rows .. b*rows + rows - 1) in one key."""
    keys = np.zeros((len(sig), bands), dtype=np.uint64)
    for j in range(rows):
        keys = _mix(keys ^ np.asarray(sig[:, j:bands * rows:rows]).astype(np.uint64) ^ np.uint64(j))
    return keys


def accept_level(threshold: float, num_perm: int) -> float:
    """The bucket agreement that joins a candidate pair: two standard errors of the estimate below the
    threshold, so that pairs whose true Jaccard is at the threshold are not lost to the estimate's noise half of the
    time (bench/near_dedup_recall.py measures what this costs and gains)."""
    return threshold - 2 * (threshold * (1 - threshold) / num_perm) ** 0.5


def duplicates(sig: np.ndarray, threshold: float, bands: int, rows: int, accept: float | None = None) -> np.ndarray:
    """For documents in input order: True where the document is a near duplicate of an earlier one in its
    cluster (candidates by band collision, joined when their signatures agree on >= `accept` of their buckets:
    by default accept_level(threshold)). One band at a time: memory is ~24 bytes per document beside the
    signatures (which may be memory-mapped)."""
    n = len(sig)
    accept = accept_level(threshold, sig.shape[1]) if accept is None else accept
    parent = np.arange(n)

    def find(x):
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for band in range(bands):
        key = band_keys(sig[:, band * rows:(band + 1) * rows], 1, rows)[:, 0]
        order = np.lexsort((np.arange(n), key))
        k = key[order]
        same = np.flatnonzero(k[1:] == k[:-1]) + 1  # positions whose key equals the previous one's
        if not len(same):
            continue
        group_start = np.maximum.accumulate(np.where(np.concatenate([[True], k[1:] != k[:-1]]),
                                                     np.arange(n), 0))
        a, b = order[group_start[same]], order[same]  # each member against its group's first (earliest) document
        agree = (sig[a] == sig[b]).mean(axis=1) >= accept
        for x, y in zip(a[agree].tolist(), b[agree].tolist()):
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)  # the earliest document is every cluster's root
    while True:  # pointer jumping: every document points at its cluster's root
        up = parent[parent]
        if np.array_equal(up, parent):
            break
        parent = up
    return parent != np.arange(n)


def near_keep_masks(directory: str, shards: list[dict], threshold: float, bands: int | None, rows: int | None,
                    num_perm: int, base_keep: list[np.ndarray] | None = None) -> tuple[list[np.ndarray], int]:
    """Over shards (in input order) whose .minhash.npy hold their documents' signatures: per shard, which
    documents survive near-duplicate removal (all but the first of each cluster), and how many were removed.
    `base_keep`: documents already removed (merge's global exact dedup) take no part."""
    if bands is None or rows is None:
        bands, rows = lsh_params(threshold, num_perm)
    if bands * rows > num_perm:
        raise ValueError(f"--near-bands {bands} x --near-rows {rows} exceeds --num-perm {num_perm}")
    parts, sizes = [], []
    for i, shard in enumerate(shards):
        sig = np.load(os.path.join(directory, shard["path"] + ".minhash.npy"), mmap_mode="r")
        if len(sig) != shard["documents"]:
            raise ValueError(f"{shard['path']}.minhash.npy has {len(sig)} signatures for {shard['documents']} "
                             f"documents; rerun prepare with --dedup near for this output")
        mask = base_keep[i] if base_keep is not None else np.ones(len(sig), dtype=bool)
        parts.append(np.asarray(sig)[mask])
        sizes.append(mask)
    every = np.concatenate(parts) if parts else np.zeros((0, num_perm), dtype=np.uint32)
    dup = duplicates(every, threshold, bands, rows)
    out, at = [], 0
    for mask in sizes:
        keep = mask.copy()
        n = int(mask.sum())
        keep[np.flatnonzero(mask)] = ~dup[at:at + n]
        out.append(keep)
        at += n
    return out, int(dup.sum())


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The true Jaccard similarity of two documents' token shingle sets (for tests and the benchmark)."""
    def shingles(ids):
        ids = [int(x) for x in ids]
        k = min(SHINGLE, len(ids))
        return {tuple(ids[i:i + k]) for i in range(max(len(ids) - SHINGLE + 1, 1))}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / max(len(sa | sb), 1)
