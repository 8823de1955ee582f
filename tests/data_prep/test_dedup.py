"""data_prep.dedup: exact (first occurrence wins, across files) and near duplicates."""
import random

from conftest import expected_ids, make_doc, read_back, run_prepare, write_jsonl


# ----------------------------------------------------------------------------------------------- dedup
def test_exact_dedup_across_files_first_occurrence_wins(tmp_path, tokenizer_dir, texts):
    write_jsonl(tmp_path / "a.jsonl", texts[:6])
    write_jsonl(tmp_path / "b.jsonl", [texts[0] + "  ", texts[7], texts[2]])  # same after normalisation
    man = run_prepare([tmp_path], tokenizer_dir, tmp_path / "out")
    assert man["counts"]["dropped"] == {"exact_duplicate": 2}
    assert read_back(tmp_path / "out") == expected_ids(tokenizer_dir, texts[:6] + [texts[7]])


def test_near_dedup_catches_90_percent_copy_and_keeps_distinct(tmp_path, tokenizer_dir):
    rng = random.Random(5)
    originals = [make_doc(rng, 300) for _ in range(8)]
    words = originals[0].split(" ")
    keep = len(words) * 9 // 10  # 90% of the text shared, the last 10% rewritten (Jaccard of 5-grams ~0.8)
    near_copy = " ".join(words[:keep] + [f"new{i}" for i in range(len(words) - keep)])
    write_jsonl(tmp_path / "a.jsonl", originals + [near_copy])
    man = run_prepare([tmp_path / "a.jsonl"], tokenizer_dir, tmp_path / "out", dedup="near",
                      near_threshold=0.7)
    assert man["counts"]["dropped"] == {"near_duplicate": 1}
    assert man["counts"]["documents_kept"] == 8  # every distinct document survives
    man_exact = run_prepare([tmp_path / "a.jsonl"], tokenizer_dir, tmp_path / "out2", dedup="exact")
    assert man_exact["counts"]["documents_kept"] == 9
