"""pretrain.data: blends, splits, determinism, exact resume across DP sizes, index cache building, bad shards."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import WORKERS, launch, prepare_corpus
from pretrain.data import DataConfig, DataError, MicroBatchSampler, blend, build_datasets, check_shard, \
    micro_batches


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory, tiny_tokenizer):
    a = prepare_corpus(tmp_path_factory.mktemp("A"), tiny_tokenizer, n_docs=600, seed=21)
    b = prepare_corpus(tmp_path_factory.mktemp("B"), tiny_tokenizer, n_docs=600, seed=22)
    return a, b


def _build(data_path, tmp_path, samples=(2000, 100, 100), seed=3, split="90,5,5", **kw):
    cfg = DataConfig(data_path=data_path, split=split, seq_length=32, seed=seed,
                     cache_dir=str(tmp_path / f"cache-{seed}-{abs(hash(tuple(data_path))) % 10**6}"),
                     vocab_size=400, eod_id=0, **kw)
    return build_datasets(cfg, samples)


def test_blend_weights_are_respected(two_corpora, tmp_path):
    a, b = two_corpora
    train, _, _ = _build(["0.7", a, "0.3", b], tmp_path, samples=(20000, 100, 100))
    # Which corpus each sample came from: megatron's blending index over our shard prefixes.
    prefixes, _ = blend(["0.7", a, "0.3", b])
    from_a = np.isin(train.dataset_index, [i for i, p in enumerate(prefixes) if p.startswith(a)])
    assert abs(from_a.mean() - 0.7) < 0.02, from_a.mean()


def test_splits_are_disjoint(two_corpora, tmp_path):
    a, _ = two_corpora
    train, valid, test = _build([a], tmp_path, split="80,10,10")

    def documents(ds):
        parts = ds.datasets if hasattr(ds, "datasets") else [ds]
        return {(p.dataset_path_prefix if hasattr(p, "dataset_path_prefix") else p.dataset.path_prefix, int(d))
                for p in parts for d in p.indices}

    tr, va, te = documents(train), documents(valid), documents(test)
    assert tr and va and te
    assert not (tr & va) and not (tr & te) and not (va & te)


def test_samples_are_deterministic_by_seed(two_corpora, tmp_path):
    a, b = two_corpora
    first = [_build([a, b], tmp_path / "x", seed=5)[0][i]["tokens"].tolist() for i in range(20)]
    again = [_build([a, b], tmp_path / "y", seed=5)[0][i]["tokens"].tolist() for i in range(20)]
    other = [_build([a, b], tmp_path / "z", seed=6)[0][i]["tokens"].tolist() for i in range(20)]
    assert first == again and first != other


def test_samples_are_seq_plus_one_tokens_across_documents(two_corpora, tmp_path):
    train, _, _ = _build([two_corpora[0]], tmp_path)
    s = train[0]
    assert s["tokens"].shape == s["labels"].shape == (32,)
    assert torch.equal(torch.as_tensor(s["tokens"])[1:], torch.as_tensor(s["labels"])[:-1])


def _global_batches(dataset, consumed, steps, mbs, dp, gbs):
    """The samples of each global step, gathered over DP ranks and micro-batches in the loader's order."""
    iters = [micro_batches(dataset, consumed, mbs, r, dp, num_workers=0) for r in range(dp)]
    out = []
    for _ in range(steps):
        step = []
        for _ in range(gbs // (mbs * dp)):
            for it in iters:
                step.append(next(it)["tokens"])
        out.append(torch.cat(step).tolist())
    return out


@pytest.mark.parametrize("dp_after", [2, 1])
def test_resume_at_k_sees_exactly_the_uninterrupted_batches(two_corpora, tmp_path, dp_after):
    train, _, _ = _build([two_corpora[0]], tmp_path)
    gbs, mbs, k_steps = 8, 2, 3
    full = _global_batches(train, 0, 6, mbs, 2, gbs)
    resumed = _global_batches(train, k_steps * gbs, 3, mbs if dp_after == 2 else 4, dp_after, gbs)
    assert [sorted(map(tuple, x)) for x in resumed] == [sorted(map(tuple, x)) for x in full[k_steps:]]
    if dp_after == 2:
        assert resumed == full[k_steps:]  # same layout: also the same order


def test_dp_ranks_get_distinct_micro_batches():
    a = list(MicroBatchSampler(100, 0, 2, 0, 2))
    b = list(MicroBatchSampler(100, 0, 2, 1, 2))
    assert a[0] == [0, 1] and b[0] == [2, 3]
    assert not set(sum(a, [])) & set(sum(b, []))
    assert len(list(MicroBatchSampler(100, 40, 2, 0, 2))) == 15


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["shared", "private"])
def test_index_cache_built_once_per_cache_directory(two_corpora, tmp_path, mode):
    data = two_corpora[0]
    cache = str(tmp_path / "cache") if mode == "shared" else str(tmp_path / "cache-RANK")
    env = {"SIMULATE_NODES": "1"} if mode == "private" else {}
    out = tmp_path / "report"
    launch(2, WORKERS / "build_index.py", data, cache, out, env=env)
    r0, r1 = (json.loads((tmp_path / f"report.{r}.json").read_text()) for r in (0, 1))
    assert r0["first"] == r1["first"] and r0["n"] == r1["n"]
    if mode == "shared":
        assert r0["shared"] and [r0["builder"], r1["builder"]] == [True, False]
    else:  # node-local caches: each "node" builds its own, nobody waits for files that will never appear
        assert not r0["shared"] and [r0["builder"], r1["builder"]] == [True, True]
        assert r0["cache_files"] == r1["cache_files"] and r0["cache_files"]


def test_missing_or_truncated_shard_fails_fast_naming_it(two_corpora, tmp_path):
    src = two_corpora[0]
    d = tmp_path / "copy"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns(".index_cache"))
    man = json.loads((d / "manifest.json").read_text())
    victim = d / (man["shards"][1]["path"] + ".bin")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) - 10)
    with pytest.raises(DataError, match=f"shard .*{man['shards'][1]['path']}.bin is truncated"):
        blend([str(d)])
    os.remove(victim)
    with pytest.raises(DataError, match=f"{man['shards'][1]['path']}.bin is missing"):
        check_shard(str(victim)[:-4])
    with pytest.raises(DataError, match="weight/path pairs"):
        blend(["0.5", str(d), "0.5"])


def test_a_shard_too_small_for_the_split_is_refused_not_hung(tiny_data, tmp_path):
    # megatron splits every shard; tiny_data's last shard has too few documents for a 1% test split, and
    # megatron's GPTDataset would loop forever building it.
    with pytest.raises(DataError, match="none of which fall in the test part of --split 98,1,1"):
        _build([tiny_data], tmp_path, split="98,1,1")


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_planted_in_the_index_cache_is_never_loaded(two_corpora, tmp_path):
    a, _ = two_corpora
    _build([a], tmp_path)  # builds the cache
    cache = next(tmp_path.glob("cache-*"))
    victim = sorted(cache.glob("*-document_index.npy"))[0]
    marker = tmp_path / "pwned"
    np.save(victim, np.array([_Payload(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=f"{victim.name} holds pickled Python objects"):
        _build([a], tmp_path)
    assert not marker.exists()
    # the check is what stops it: megatron itself would run the payload
    np.load(victim, allow_pickle=True)
    assert marker.exists()
    victim.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match=f"{victim.name} is not a valid .npy"):
        _build([a], tmp_path)
