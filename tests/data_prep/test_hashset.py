"""data_prep.hashset: exact first-occurrence semantics against a Python set, with runs spilled to disk."""
import numpy as np

import data_prep.hashset as hashset


def test_first_seen_equals_a_python_set_with_spilled_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(hashset, "_SPILL", 1 << 12)  # tiny runs, so that merging and spilling happen
    s = hashset.HashSet(spill_dir=str(tmp_path / "spill"), expected=1000)
    rng = np.random.default_rng(0)
    distinct = rng.integers(0, 2**63, 60_000, dtype=np.uint64)
    stream = np.concatenate([distinct, distinct[::5], rng.integers(0, 2**63, 10_000, dtype=np.uint64)])
    rng.shuffle(stream)
    ref = set()
    for i in range(0, len(stream), 512):
        unit = stream[i:i + 512]
        want = []
        for h in unit.tolist():
            want.append(h not in ref)
            ref.add(h)
        assert s.first_seen(unit).tolist() == want, i
    assert s.count == len(ref) and any(isinstance(r, np.memmap) for r in s.runs)
    assert s.nbytes_in_memory() < 8 * len(ref)  # most of it lives on disk
    s.close()
    assert not (tmp_path / "spill").exists()
