"""Exact and near-duplicate detection.

Exact: a 64-bit BLAKE2b of the normalised text; the first occurrence in input order wins.
Near: MinHash over word 5-gram shingles, LSH banding to find candidates, and the signature agreement (an
estimate of Jaccard similarity) checked against the threshold before a document is dropped.

Signatures are computed in the worker processes (vectorised numpy, one document at a time; datasketch's
MinHash updates shingle by shingle in Python, an order of magnitude slower); the index lives in the main
process, which sees documents in input order, so the result does not depend on the number of workers.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

_MERSENNE = np.uint64((1 << 61) - 1)
_WORD = re.compile(r"\w+", re.UNICODE)


def exact_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands x rows (b * r <= num_perm) minimising false positives + false negatives around `threshold`,
    the usual S-curve integration (as datasketch does)."""
    xs = np.linspace(0.0, 1.0, 201)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - xs ** r) ** b
            fp = np.trapezoid(np.where(xs < threshold, p, 0.0), xs)
            fn = np.trapezoid(np.where(xs >= threshold, 1.0 - p, 0.0), xs)
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


class MinHasher:
    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        self.a = rng.integers(1, int(_MERSENNE), num_perm, dtype=np.uint64)
        self.b = rng.integers(0, int(_MERSENNE), num_perm, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        words = _WORD.findall(text.lower())
        n = self.ngram
        shingles = {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))} or {""}
        h = np.fromiter((int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
                         for s in shingles), dtype=np.uint64, count=len(shingles))
        h = h % _MERSENNE
        # (a*h + b) mod p for every permutation; uint64 products wrap, which keeps them well mixed.
        sig = ((h[:, None] * self.a[None, :] + self.b[None, :]) % _MERSENNE).min(axis=0)
        return sig.astype(np.uint32)


class NearDupIndex:
    """LSH index over kept documents' signatures; `seen_similar` also inserts the document when new."""

    def __init__(self, threshold: float, num_perm: int):
        self.threshold = threshold
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.tables: list[dict[bytes, int]] = [dict() for _ in range(self.bands)]
        self.signatures: list[np.ndarray] = []

    def _keys(self, sig: np.ndarray):
        r = self.rows
        return [sig[i * r:(i + 1) * r].tobytes() for i in range(self.bands)]

    def seen_similar(self, sig: np.ndarray) -> bool:
        keys = self._keys(sig)
        for table, key in zip(self.tables, keys):
            other = table.get(key)
            if other is not None and np.mean(self.signatures[other] == sig) >= self.threshold:
                return True
        doc = len(self.signatures)
        self.signatures.append(sig)
        for table, key in zip(self.tables, keys):
            table.setdefault(key, doc)
        return False
