"""The README's near-duplicate recall is guarded: `--dedup near` at its defaults (threshold 0.8, 128 permutations,
minhash.lsh_params' bands x rows), on a fixed seed, removes >= 99% of the variants at true Jaccard >= 0.9 and >= 97%
at 0.8-0.9, and no distinct document (bench/near_dedup_recall.py computes the truth exactly)."""
import pytest

pytestmark = pytest.mark.slow


def test_near_dedup_recall_and_false_positives_at_the_defaults():
    from bench.near_dedup_recall import _tokenizer, build, measure
    from data_prep.minhash import lsh_params

    pool, texts, origin = build(400, seed=0)
    result = measure(texts, origin, _tokenizer(pool), threshold=0.8, layouts=[], num_perm=128)
    bands, rows = lsh_params(0.8, 128)
    shipped = result[f"{bands}x{rows}"]  # what data_prep.minhash.near_duplicates runs
    assert shipped["n_0.9_1.0"] >= 500 and shipped["n_0.8_0.9"] >= 200, shipped  # enough variants to measure
    assert shipped["recall_0.9_1.0"] >= 0.99, shipped
    assert shipped["recall_0.8_0.9"] >= 0.97, shipped
    assert shipped["false_positives"] == 0, shipped
