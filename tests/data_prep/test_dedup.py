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


def variant(rng, text: str, every: int) -> str:
    """The text with every `every`-th word replaced by another common word (a light edit, as of a copy)."""
    from conftest import WORDS

    words = text.split(" ")
    return " ".join(rng.choice(WORDS) if i % every == every // 2 else w for i, w in enumerate(words))


def token_jaccard(tokenizer_dir, a: str, b: str) -> float:
    from data_prep.clean import normalize
    from data_prep.minhash import jaccard
    from data_prep.tokenizer import Encoder

    flat, lengths = Encoder(tokenizer_dir).encode([normalize(a), normalize(b)])
    return jaccard(flat[:lengths[0]], flat[lengths[0]:])


def test_near_dedup_removes_a_light_copy_and_keeps_distinct(tmp_path, tokenizer_dir):
    rng = random.Random(5)
    originals = [make_doc(rng, 300) for _ in range(8)]
    near_copy = variant(rng, originals[0], 100)
    j = token_jaccard(tokenizer_dir, originals[0], near_copy)
    assert 0.75 < j < 0.95, j  # a near duplicate at the threshold this test uses, not an exact one
    write_jsonl(tmp_path / "a.jsonl", originals[:4] + [near_copy] + originals[4:])
    man = run_prepare([tmp_path / "a.jsonl"], tokenizer_dir, tmp_path / "out", dedup="near",
                      near_threshold=0.7)
    assert man["counts"]["dropped"] == {"near_duplicate": 1}
    assert man["counts"]["documents_kept"] == 8  # every distinct document survives
    assert read_back(tmp_path / "out") == expected_ids(tokenizer_dir, originals)  # the copy is the one gone
    man_exact = run_prepare([tmp_path / "a.jsonl"], tokenizer_dir, tmp_path / "out2", dedup="exact")
    assert man_exact["counts"]["documents_kept"] == 9


def test_near_output_directory_holds_only_the_product(tmp_path, tokenizer_dir):
    """A glob over the output of `--dedup near` (a Megatron prefix list made with `ls *.idx`) reads exactly the
    manifest's documents: the shards as first written (with the copies), their hashes and signatures live in
    near-input/. A rerun of the finished run resumes from there and changes no byte."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    rng = random.Random(6)
    originals = [make_doc(rng, 300) for _ in range(12)]
    copies = [variant(rng, originals[i], 100) for i in (0, 5, 9)]
    write_jsonl(tmp_path / "a.jsonl", originals[:6] + copies[:1] + originals[6:] + copies[1:])
    kw = dict(dedup="near", near_threshold=0.7, shard_tokens=1000, chunk_docs=3)
    man = run_prepare([tmp_path / "a.jsonl"], tokenizer_dir, tmp_path / "out", **kw)
    assert man["counts"]["dropped"] == {"near_duplicate": 3} and len(man["shards"]) > 2
    out = tmp_path / "out"
    globbed = sorted(p.name[:-4] for p in out.glob("*.idx"))
    assert globbed == sorted(s["path"] for s in man["shards"])
    docs = [IndexedDataset(str(out / prefix)) for prefix in globbed]
    assert sum(len(d) for d in docs) == man["counts"]["documents_kept"] == 12
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(
        [f"{p}.{ext}" for p in globbed for ext in ("bin", "idx")] + ["manifest.json"])
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert run_prepare([tmp_path / "a.jsonl"], tokenizer_dir, out, **kw) == man
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
