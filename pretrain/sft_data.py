"""Fine-tuning data (--objective sft): data_prep's conversations (--format chat|instruction) packed whole into
samples, with their loss masks and the document ids that keep attention inside each conversation.

Why not megatron's GPTDataset: it cuts the token stream into seq_length + 1 windows across document boundaries, so a
conversation would straddle two samples (its answer in one, its question in the other), and it has no loss mask
dataset. Megatron's --sft path packs whole conversations too (and torchtitan's and OLMo-core's packers); this one
reads data_prep's shards and their loss masks (data_prep/shards.py: an indexed dataset of uint8 with the same
documents) directly.

- **Packing** (`pack`): each epoch visits the conversations in a seeded permutation and places each in the first of
  the last OPEN_BINS samples it fits (first-fit over a window, O(conversations x OPEN_BINS)); a sample holds
  seq_length + 1 tokens, the rest is padding (counted and logged). A conversation longer than that cannot be packed
  whole: it is left out and counted (prepare with --max-tokens seq_length + 1 to keep or cut them there). Epochs
  are packed one after another until the run's samples are reached; the same seed packs the same samples on every
  rank and every rerun, so resuming at consumed_samples k sees what an uninterrupted run would.
- **Document ids** come from the index (which conversation each token belongs to), never from EOS/EOT ids, which
  templates use inside a conversation; padding is one more document. The model attends within a document and
  restarts positions at its start (pretrain/model.py document masking), so a packed conversation is computed
  exactly as it would be alone (tests/pretrain/test_sft.py).
- **Loss mask**: a label is supervised when the mask marks it (an answer token or its end-of-turn) and it belongs
  to the same conversation as its input; the loss divides by the global batch's supervised tokens
  (pretrain.step.global_loss_tokens, the objective's rule).
- **Split**: like megatron's, each shard's documents are cut into contiguous train/valid/test parts by --split;
  --valid-data-path/--test-data-path give whole directories instead.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from data_prep import manifest
from data_prep.indexed import read_index
from pretrain.data import DataConfig, DataError, parse_data_path

OPEN_BINS = 64  # samples still open to first-fit; more packs tighter and costs that much more per conversation


class Conversations:
    """Every conversation of some shards (or of a part of each, by --split), as (tokens, mask) views."""

    def __init__(self, shards: list[tuple[str, str]], parts: list[tuple[int, int]] | None = None):
        self.tokens, self.masks, self.where = [], [], []
        for s, (prefix, mask_prefix) in enumerate(shards):
            idx, midx = read_index(prefix), read_index(mask_prefix)
            if not np.array_equal(idx["lengths"], midx["lengths"]):
                raise DataError(f"{mask_prefix}: the loss mask's documents differ from {prefix}'s; rerun data_prep")
            tokens = np.memmap(f"{prefix}.bin", dtype=idx["dtype"], mode="r")
            masks = np.memmap(f"{mask_prefix}.bin", dtype=np.uint8, mode="r")
            beg, end = parts[s] if parts else (0, len(idx["lengths"]))
            self.tokens.append((tokens, idx["pointers"] // idx["dtype"].itemsize))
            self.masks.append((masks, midx["pointers"]))
            self.where += [(s, d, int(idx["lengths"][d])) for d in range(beg, end)]
        self.lengths = np.array([n for _, _, n in self.where], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.where)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, d, n = self.where[i]
        (tokens, starts), (masks, mstarts) = self.tokens[s], self.masks[s]
        return tokens[starts[d]:starts[d] + n], masks[mstarts[d]:mstarts[d] + n]


def pack(lengths: np.ndarray, capacity: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch: conversation indices (those that fit `capacity`) in a seeded order, first-fit into samples."""
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    bins: list[list[int]] = []
    room = np.zeros(0, dtype=np.int64)  # the free tokens of the open samples (the last OPEN_BINS of `bins`)
    for i in order[lengths[order] <= capacity]:
        n = lengths[i]
        fits = np.flatnonzero(room >= n)
        if len(fits):
            j = int(fits[0])
            bins[len(bins) - len(room) + j].append(int(i))
            room[j] -= n
        else:
            bins.append([int(i)])
            room = np.append(room, capacity - n)[-OPEN_BINS:]
    return bins


class PackedConversations(torch.utils.data.Dataset):
    """Samples of seq_length tokens (inputs), labels, loss_mask and document_ids, each a set of whole conversations
    (see the module's docstring)."""

    def __init__(self, conversations: Conversations, seq_length: int, seed: int, num_samples: int, pad_id: int,
                 name: str = "train"):
        self.conversations, self.seq_length, self.pad_id = conversations, seq_length, pad_id
        capacity = seq_length + 1
        fit = conversations.lengths <= capacity
        self.too_long = int((~fit).sum())
        if not fit.any():
            raise DataError(f"{name}: none of the {len(fit)} conversations fits --seq-length {seq_length} + 1 tokens "
                            f"(the longest has {int(conversations.lengths.max(initial=0))}); raise --seq-length or "
                            f"prepare with --max-tokens {capacity} --too-long truncate")
        self.samples = pack(conversations.lengths, capacity, seed, 0)
        self.per_epoch, self.epochs = len(self.samples), 1
        while len(self.samples) < num_samples:
            self.samples += pack(conversations.lengths, capacity, seed, self.epochs)
            self.epochs += 1
        self.padding = 1.0 - int(conversations.lengths[fit].sum()) / (self.per_epoch * capacity)

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self) -> str:
        return (f"{len(self.conversations) - self.too_long} conversations packed into "
                f"{self.per_epoch} samples per epoch "
                f"({self.padding:.1%} padding), {self.epochs} epoch(s) for {len(self)} samples"
                + (f"; {self.too_long} longer than --seq-length + 1 left out (prepare with --max-tokens)"
                   if self.too_long else ""))

    def __getitem__(self, i: int) -> dict:
        capacity = self.seq_length + 1
        tokens = np.full(capacity, self.pad_id, dtype=np.int64)
        mask = np.zeros(capacity, dtype=np.int64)
        doc = np.full(capacity, len(self.samples[i]), dtype=np.int32)  # padding: a document of its own
        at = 0
        for k, c in enumerate(self.samples[i]):
            ids, m = self.conversations.get(c)
            tokens[at:at + len(ids)], mask[at:at + len(ids)], doc[at:at + len(ids)] = ids, m, k
            at += len(ids)
        same = doc[1:] == doc[:-1]  # a label of the next conversation is never supervised
        return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": (mask[1:] * same).astype(np.float32),
                "document_ids": doc[:-1]}


# ------------------------------------------------------------------------------------------------ building
def conversation_shards(path: str) -> list[tuple[str, str]]:
    """A conversation directory -> [(token prefix, loss-mask prefix)], refused unless data_prep wrote a mask."""
    directory = manifest.data_dir(path)
    try:
        man = manifest.read(directory)
    except manifest.ManifestError as e:
        raise DataError(str(e)) from None
    fmt = man.get("data", {}).get("format", "text")
    if fmt == "text":
        raise DataError(f"--data-path {path} holds text documents (data_prep --format text), which have no loss mask;"
                        f" --objective sft trains on conversations: prepare them with --format chat or instruction")
    return [(os.path.join(directory, s["path"]), os.path.join(directory, s["loss_mask"]["path"]))
            for s in man["shards"]]


def _split_parts(shards: list[tuple[str, str]], split: str) -> list[list[tuple[int, int]] | None]:
    """Megatron's split of each shard's documents into contiguous train/valid/test parts."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    parts = [[] if bounds is not None else None for bounds in matrix]  # None: a part of share 0, never asked for
    for prefix, _ in shards:
        n = len(read_index(prefix)["lengths"])
        for k, bounds in enumerate(matrix):
            if bounds is not None:
                parts[k].append(tuple(int(round(b * float(n))) for b in bounds))
    return parts


def _paths(data_path: list[str]) -> list[str]:
    pairs = parse_data_path(data_path)
    if any(w == w for w, _ in pairs):  # a weight (not nan)
        raise DataError("--objective sft concatenates its --data-path directories; weights are not supported yet "
                        "(give the directories without weights)")
    return [p for _, p in pairs]


def build_datasets(cfg: DataConfig, num_samples: tuple[int, int, int], pad_id: int):
    """-> (train, valid, test) PackedConversations (None where no samples are asked for or the part is empty)."""
    shards = [s for p in _paths(cfg.data_path) for s in conversation_shards(p)]
    if cfg.valid_data_path or cfg.test_data_path:
        sources = [(shards, None)] + [([s for p in _paths(extra) for s in conversation_shards(p)], None)
                                      if extra else None for extra in (cfg.valid_data_path, cfg.test_data_path)]
    else:
        sources = [(shards, part) if part is not None else None for part in _split_parts(shards, cfg.split)]
    out = []
    for name, source, n in zip(("train", "valid", "test"), sources, num_samples):
        conversations = Conversations(*source) if source and n else None
        if conversations is None:  # not asked for (no samples), or no --valid/--test-data-path of its own
            out.append(None)
            continue
        if len(conversations) == 0:  # asked for and empty: refused, as the text path refuses it (pretrain/data.py)
            raise DataError(f"--data-path {' '.join(cfg.data_path)}: no conversation falls in the {name} part of "
                            f"--split {cfg.split}; use a larger {name} share, bigger shards or "
                            f"--valid-data-path/--test-data-path")
        out.append(PackedConversations(conversations, cfg.seq_length, cfg.seed + len(out), n, pad_id, name))
    return tuple(out)


def chat_template(data_path: list[str]) -> dict | None:
    """The chat template data_prep rendered the conversation directories with (manifest "data"), or None (text, or
    a bare prefix without a manifest). Directories rendered with different templates are refused: the export and
    --sample-prompt can carry one."""
    found = {}
    for _, path in parse_data_path(data_path):
        directory = manifest.data_dir(path)
        if not os.path.exists(os.path.join(directory, manifest.MANIFEST)):
            continue
        template = manifest.read(directory).get("data", {}).get("chat_template")
        if template:
            found.setdefault(template["sha256"], (path, template))
    if len(found) > 1:
        names = ", ".join(f"{p} ({t['name']})" for p, t in found.values())
        raise DataError(f"--data-path mixes conversations rendered with different chat templates: {names}; "
                        f"prepare them all with one (--chat-template)")
    return next(iter(found.values()))[1] if found else None


def data_formats(data_path: list[str]) -> set[str]:
    """The formats (text, chat, instruction) of the data directories with a manifest (a bare prefix: text)."""
    formats = set()
    for _, path in parse_data_path(data_path):
        directory = manifest.data_dir(path)
        if os.path.exists(os.path.join(directory, manifest.MANIFEST)):
            formats.add(manifest.read(directory).get("data", {}).get("format", "text"))
        else:
            formats.add("text")
    return formats
