"""Training data: data_prep shards -> blended, split, shuffled GPT samples -> each rank's micro-batches.

Samples come from megatron-core's BlendedMegatronDatasetBuilder / GPTDataset (seq_length + 1 tokens across
document boundaries, deterministic shuffle by seed, as many epochs as needed, C++ index helpers).

What we add around it:
- Index caches are built by one rank when the cache directory is shared between nodes, by one rank per node
  when it is node-local (detected with a probe file). Megatron's builder lets only global rank 0 build, so a
  node-local cache makes other nodes' ranks look for files nobody wrote. Builders run with megatron seeing a
  single process; an all-reduce of their status is the barrier, so a failing builder makes every rank fail with
  its error (and a dead one makes them fail at the process-group timeout) instead of waiting forever.
- Every .npy in the cache directory is checked to hold a plain array before megatron opens it: megatron loads
  them with numpy.load(allow_pickle=True) (docs/FINDINGS.md, "Data"), so a pickled object array placed there by
  anyone who can write the directory would run code on every rank. A file that is not a plain array stops the
  run, naming it; the cache is never trusted past its headers.
- A sampler driven by consumed_samples: DP rank r's m-th micro-batch of a step takes samples
  consumed + (m * dp + r) * b ... + b. The global order does not depend on DP, so resuming at k with another DP
  size sees exactly the samples an uninterrupted run would have seen from k on.
"""
from __future__ import annotations

import contextlib
import os
import socket
import uuid
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from data_prep import manifest
from pretrain.signals import shield_worker, stop_signals_blocked


class DataError(ValueError):
    """Bad --data-path / shard, naming the file at fault."""


# ------------------------------------------------------------------------------------------- inputs
def parse_data_path(items: list[str]) -> list[tuple[float, str]]:
    """`[w1] path1 [w2] path2 ...` -> [(weight, path)]. Without weights, paths weigh by their token counts."""
    if not items:
        raise DataError("--data-path is empty")
    try:
        float(items[0])
        weighted = True
    except ValueError:
        weighted = False
    if not weighted:
        return [(float("nan"), p) for p in items]
    if len(items) % 2:
        raise DataError(f"--data-path {' '.join(items)}: give weight/path pairs, e.g. 0.7 dirA 0.3 dirB")
    out = []
    for w, p in zip(items[::2], items[1::2]):
        try:
            out.append((float(w), p))
        except ValueError:
            raise DataError(f"--data-path: {w!r} is not a weight (expected weight/path pairs)") from None
    return out


def shard_prefixes(path: str) -> list[tuple[str, int]]:
    """A data_prep output directory (its manifest) or a single shard prefix -> [(prefix, tokens)]."""
    if os.path.isdir(path):
        try:
            return manifest.shards(path)
        except manifest.ManifestError as e:
            raise DataError(str(e)) from None
    check_shard(path)
    from data_prep.indexed import read_index

    return [(path, int(read_index(path)["lengths"].sum()))]


def check_shard(prefix: str) -> None:
    """Fail fast, naming the shard, when a .bin/.idx is missing or truncated."""
    from data_prep.indexed import read_index

    for ext in (".idx", ".bin"):
        if not os.path.exists(prefix + ext):
            raise DataError(f"shard {prefix}{ext} is missing; rerun data_prep or fix --data-path")
    try:
        idx = read_index(prefix)
    except ValueError as e:
        raise DataError(f"shard {prefix}.idx is corrupt: {e}") from None
    lengths, pointers = idx["lengths"].astype(np.int64), idx["pointers"]
    # A deduplicated shard's index skips documents of a .bin it shares (data_prep.indexed.write_subset): the
    # .bin must reach as far as the last sequence the index points at.
    need = int((pointers + lengths * idx["dtype"].itemsize).max()) if len(lengths) else 0
    have = os.path.getsize(prefix + ".bin")
    if have < need:
        raise DataError(f"shard {prefix}.bin is truncated or wrong: {have} bytes, its index needs {need}; "
                        f"rerun data_prep for it")


def blend(data_path: list[str]) -> tuple[list[str], list[float]]:
    """Weights per directory are spread over its shards by token count."""
    prefixes, weights = [], []
    for weight, path in parse_data_path(data_path):
        shards = shard_prefixes(path)
        total = sum(t for _, t in shards)
        if total == 0:
            raise DataError(f"{path}: its shards hold no tokens")
        for prefix, tokens in shards:
            check_shard(prefix)
            prefixes.append(prefix)
            weights.append(tokens if weight != weight else weight * tokens / total)  # nan: by tokens
    s = sum(weights)
    return prefixes, [w / s for w in weights]


# ------------------------------------------------------------------------------------------- datasets
class _Tokenizer:
    """The little of a tokenizer megatron's GPTDataset uses."""

    def __init__(self, vocab_size: int, eod: int):
        # No pad token in packed pretraining data: -1 never matches, so no real token is masked as padding.
        self.vocab_size, self.eod, self.pad = vocab_size, eod, -1
        self.unique_identifiers = {"class": "data_prep", "vocab_size": vocab_size, "eod": eod}


@dataclass
class DataConfig:
    data_path: list[str]
    split: str = "98,1,1"
    seq_length: int = 2048
    seed: int = 1234
    cache_dir: str | None = None  # default: <first data dir>/.index_cache
    num_workers: int = 2
    vocab_size: int = 0
    eod_id: int = 0
    valid_data_path: list[str] | None = None
    test_data_path: list[str] | None = None


@contextlib.contextmanager
def _megatron_sees_one_process():
    """megatron's dataset code builds only where get_rank() == 0; we decide who builds, so hide the group."""
    # blended_dataset.py calls get_rank() without asking is_initialized() first, so both are hidden.
    originals = torch.distributed.is_initialized, torch.distributed.get_rank
    torch.distributed.is_initialized = lambda: False
    torch.distributed.get_rank = lambda *a, **k: 0
    try:
        yield
    finally:
        torch.distributed.is_initialized, torch.distributed.get_rank = originals


def _cache_is_shared(cache_dir: str) -> bool:
    """True when every node sees the files global rank 0 writes into cache_dir."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = os.path.join(cache_dir, f".probe-{token[0]}")
    if dist.get_rank() == 0:
        with open(probe, "w") as f:
            f.write(socket.gethostname())
    dist.barrier()
    seen = torch.tensor([1.0 if os.path.exists(probe) else 0.0])
    dist.all_reduce(seen, op=dist.ReduceOp.MIN)
    dist.barrier()
    if dist.get_rank() == 0:
        os.remove(probe)
    return bool(seen.item())


def _is_builder(shared: bool) -> bool:
    if not dist.is_initialized():
        return True
    if shared:
        return dist.get_rank() == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0


def build_datasets(cfg: DataConfig, num_samples: tuple[int, int, int]):
    """-> (train, valid, test) megatron datasets (None where no samples are asked for)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if cfg.valid_data_path or cfg.test_data_path:
        blend_per_split = [blend(cfg.data_path), blend(cfg.valid_data_path) if cfg.valid_data_path else None,
                           blend(cfg.test_data_path) if cfg.test_data_path else None]
        blend_kw = {"blend_per_split": blend_per_split}
    else:
        blend_kw = {"blend": blend(cfg.data_path), "split": cfg.split}
        _check_split_sizes(blend_kw["blend"][0], cfg.split, num_samples)
    cache = cfg.cache_dir or os.path.join(_first_dir(cfg.data_path), ".index_cache")
    os.makedirs(cache, exist_ok=True)
    gpt_cfg = GPTDatasetConfig(
        random_seed=cfg.seed, sequence_length=cfg.seq_length, path_to_cache=cache,
        tokenizer=_Tokenizer(cfg.vocab_size, cfg.eod_id), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, mmap_bin_files=True, **blend_kw)
    check_cache_arrays(cache)
    shared = _cache_is_shared(cache)
    builder = _is_builder(shared)

    def build():
        with _megatron_sees_one_process():
            return BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, gpt_cfg).build()

    datasets, error = None, None
    if builder:
        try:
            datasets = build()
        except Exception as e:  # reported to every rank below
            error = e
    if dist.is_initialized():
        ok = torch.tensor([0.0 if error else 1.0])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # the barrier: builders are done (or failed)
        if ok.item() == 0:
            raise DataError(f"building the dataset index cache in {cache} failed on a builder rank"
                            + (f": {error}" if error else " (see its log)")) from error
    elif error:
        raise error
    if datasets is None:
        datasets = build()  # cache hits: only loads the index files
    return datasets


def check_cache_arrays(cache_dir: str) -> None:
    """Refuse an index cache holding anything megatron's numpy.load(allow_pickle=True) would unpickle: every .npy
    must have a valid header of a plain (non-object) dtype. Only headers are read."""
    from numpy.lib import format as npy

    for name in sorted(os.listdir(cache_dir)):
        if not name.endswith(".npy"):
            continue
        path = os.path.join(cache_dir, name)
        try:
            with open(path, "rb") as f:
                read = npy.read_array_header_1_0 if npy.read_magic(f) == (1, 0) else npy.read_array_header_2_0
                _, _, dtype = read(f)
        except (OSError, ValueError) as e:
            raise DataError(f"index cache file {path} is not a valid .npy ({e}); delete {cache_dir} (it is "
                            f"rebuilt) and rerun") from None
        if dtype.hasobject:
            raise DataError(f"index cache file {path} holds pickled Python objects ({dtype}), which megatron would "
                            f"unpickle (and so run) on load; megatron's index builder never writes these. Delete "
                            f"{cache_dir}, check who can write there, and rerun (or pass --data-cache-dir to a "
                            f"directory only this run writes)")


def _check_split_sizes(prefixes: list[str], split: str, num_samples) -> None:
    """megatron splits every shard by --split; a shard whose valid or test part holds no document makes its
    GPTDataset loop forever (_get_num_epochs adds zero-token epochs until it reaches the request). Refuse it."""
    from megatron.core.datasets.utils import Split
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    from data_prep.indexed import read_index

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prefixes:
        n_docs = len(read_index(prefix)["lengths"])
        for part, bounds in zip(Split, matrix):
            if bounds is None or not num_samples[part.value]:
                continue
            beg, end = (int(round(b * float(n_docs))) for b in bounds)
            if end <= beg:
                raise DataError(
                    f"shard {prefix} has {n_docs} documents, none of which fall in the {part.name} part of --split "
                    f"{split}; use bigger shards (data_prep --shard-size), a larger {part.name} share, or "
                    f"--valid-data-path/--test-data-path")


def _first_dir(data_path: list[str]) -> str:
    return manifest.data_dir(parse_data_path(data_path)[0][1])


# ------------------------------------------------------------------------------------------- sampling
class MicroBatchSampler:
    """Yields this DP rank's micro-batches of sample indices from `consumed_samples` on."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int):
        self.total, self.consumed = total_samples, consumed_samples
        self.b, self.rank, self.dp = micro_batch_size, dp_rank, dp_size

    def __iter__(self):
        step = self.b * self.dp
        start = self.consumed
        while start + step <= self.total:
            first = start + self.rank * self.b
            yield list(range(first, first + self.b))
            start += step

    def __len__(self):
        return max(0, (self.total - self.consumed) // (self.b * self.dp))


def _collate(samples: list[dict]) -> dict:
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples])).long() if isinstance(
        samples[0]["tokens"], np.ndarray) else torch.stack([s["tokens"] for s in samples]).long()
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long()
    loss_mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).float()
    batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}
    if "document_ids" in samples[0]:  # --objective sft: which conversation each token belongs to
        batch["document_ids"] = torch.stack([torch.as_tensor(s["document_ids"]) for s in samples]).int()
    return batch


def micro_batches(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                  num_workers: int = 2, cycle: bool = False):
    """An iterator of this rank's micro-batches (dicts of [b, s] tensors). `cycle` restarts at 0 (eval)."""
    while True:
        sampler = MicroBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                             collate_fn=_collate, pin_memory=torch.cuda.is_available(),
                                             persistent_workers=False,
                                             # a stop signal sent to every process must reach the rank, not kill
                                             # its workers first (pretrain/signals.py)
                                             worker_init_fn=shield_worker if num_workers else None)
        with stop_signals_blocked():  # the workers fork here, born shielded (pretrain/signals.py)
            batches = iter(loader)
        yield from batches
        if not cycle:
            return
        consumed_samples = 0
