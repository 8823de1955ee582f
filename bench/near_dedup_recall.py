"""Recall and false positives of `--dedup near`, against ground truth computed exactly.

Originals: distinct documents of the prose corpus (bench/corpus.py). For each original, variants are made by
replacing a fraction of its words with words from other documents (a light edit, as between copies of a page), and
their true Jaccard similarity to the original is computed exactly over the same token shingles the MinHash uses
(data_prep/minhash.py). Each variant is put after its original, and the clustering pass
(minhash.duplicates) runs over all of them together. Reported per true-Jaccard bucket: the fraction of variants
removed (recall); and the number of originals removed (false positives: they are all distinct documents).

  python bench/near_dedup_recall.py [--originals 2000] [--threshold 0.8] [--layouts 32x4 16x8 14x8]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.corpus import documents  # noqa: E402
from bench.report import emit  # noqa: E402

BUCKETS = ((0.5, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.0001))


def _tokenizer(texts: list[str]) -> str:
    from data_prep.tokenizer import train_bpe

    out = tempfile.mkdtemp(prefix="bench-nd-")
    train_bpe(texts[:2000], 16000, out)
    return out


def build(n_originals: int, seed: int = 0):
    """-> (texts in order, for each text: index of its original or -1, true Jaccard with it or None)."""
    from data_prep.clean import normalize

    rng = random.Random(seed)
    pool = [normalize(d) for d, _ in zip(documents(), range(n_originals * 2))]
    pool = [d for d in pool if len(d.split()) >= 80][:n_originals]
    vocab = [w for d in pool[:200] for w in d.split()]
    texts, origin = [], []
    for doc in pool:
        first = len(texts)
        texts.append(doc)
        origin.append(-1)
        words = doc.split(" ")
        for frac in (0.005, 0.01, 0.02, 0.03, 0.05):
            texts.append(" ".join(rng.choice(vocab) if rng.random() < frac else w for w in words))
            origin.append(first)
    return pool, texts, origin


def measure(texts, origin, tok: str, threshold: float, layouts: list[tuple[int, int]], num_perm: int) -> dict:
    from data_prep.minhash import duplicates, jaccard, lsh_params, signatures
    from data_prep.tokenizer import Encoder

    flat, lengths = Encoder(tok).encode(texts)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    ids = [flat[starts[i]:starts[i + 1]] for i in range(len(texts))]
    truth = [None if o < 0 else jaccard(ids[i], ids[o]) for i, o in enumerate(origin)]
    sig = signatures(flat, lengths, num_perm)
    out = {"documents": len(texts), "originals": origin.count(-1), "threshold": threshold}
    for (bands, rows), accept in [(lsh_params(threshold, num_perm), None), (lsh_params(threshold, num_perm),
                                                                            threshold)] + [(x, None) for x in layouts]:
        dup = duplicates(sig, threshold, bands, rows, accept)
        removed = [i for i, o in enumerate(origin) if o < 0 and dup[i]]
        # an original removed is a false positive unless the corpus itself holds a near copy of it
        nearest = {i: max(jaccard(ids[i], ids[k]) for k, o in enumerate(origin) if o < 0 and k < i)
                   for i in removed}
        row = {"false_positives": sum(j < 0.5 for j in nearest.values()),
               "originals_removed_true_j": sorted(round(j, 2) for j in nearest.values())}
        for lo, hi in BUCKETS:
            members = [i for i, j in enumerate(truth) if j is not None and lo <= j < hi]
            row[f"recall_{lo:.1f}_{min(hi, 1):.1f}"] = round(float(np.mean([dup[i] for i in members])), 3) \
                if members else None
            row[f"n_{lo:.1f}_{min(hi, 1):.1f}"] = len(members)
        name = f"{bands}x{rows}" + ("" if accept is None else f" accept {accept}")
        out[name] = row
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--originals", type=int, default=2000)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--layouts", nargs="*", default=["14x8", "16x8", "32x4"], help="BANDSxROWS to compare")
    p.add_argument("--json")
    a = p.parse_args(argv)
    pool, texts, origin = build(a.originals)
    tok = _tokenizer(pool)
    layouts = [tuple(int(x) for x in s.split("x")) for s in a.layouts]
    return emit(measure(texts, origin, tok, a.threshold, layouts, a.num_perm), a.json)


if __name__ == "__main__":
    sys.exit(main())
