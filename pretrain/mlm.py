"""Masked-language-model pretraining (--objective mlm): BERT's masking applied on the fly to the same packed samples
the decoder trains on, so an encoder needs no data stage of its own.

Per sample, every position that does not hold a special token (the tokenizer's added special tokens: end of
document, padding, the mask token itself, ...) is chosen with probability `prob` (a Bernoulli draw per position,
as transformers' DataCollatorForLanguageModeling and Megatron's BERT do). A chosen position's input becomes the
mask token with probability `replace`, a random ordinary token with probability `random`, and stays as it was
otherwise (BERT: 0.15, 80% / 10% / 10%). The label is the original token at every position; the loss counts the
chosen positions only (loss_mask).

The draw is seeded by (run seed, split, sample index) alone: the same sample gets the same mask on every TP and
PP rank, under any DP size, in any data-loader worker, and after a resume at any step (the sampler hands out the
same sample indices: pretrain/data.py). Nothing is kept between samples, so there is no state to checkpoint.

The model is the decoder's (pretrain/model.py) with bidirectional attention, and its output layer is the MLM head
exactly as EuroBERT defines it (EuroBertForMaskedLM: final RMSNorm, then a bias-free linear over the vocabulary),
so an MLM checkpoint exports as a Hugging Face EuroBERT (pretrain/hf.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLIT_SEED = {"train": 0, "valid": 1, "test": 2}  # each split draws its own masks


@dataclass(frozen=True)
class MaskingConfig:
    mask_id: int
    special_ids: tuple[int, ...]  # never chosen (the mask id and EOD among them)
    vocab_size: int  # the tokenizer's; random replacements are drawn from its ordinary tokens
    prob: float = 0.15
    replace: float = 0.8  # of the chosen: -> mask token
    random: float = 0.1  # of the chosen: -> a random ordinary token (the rest stay unchanged)
    seed: int = 1234

    def __post_init__(self):
        if not 0 < self.prob < 1:
            raise ValueError(f"--mask-prob {self.prob}: must be in (0, 1)")
        if self.replace < 0 or self.random < 0 or self.replace + self.random > 1:
            raise ValueError(f"--mask-replace-prob {self.replace} and --mask-random-prob {self.random}: each must be "
                             f">= 0 and together <= 1 (the rest of the chosen tokens stay unchanged)")
        if self.mask_id not in self.special_ids:
            raise ValueError(f"mask id {self.mask_id} must be one of the special ids (never chosen itself)")

    def ordinary_ids(self) -> np.ndarray:
        ids = np.ones(self.vocab_size, dtype=bool)
        ids[[i for i in self.special_ids if i < self.vocab_size]] = False
        return np.flatnonzero(ids)


def mask_sample(tokens: np.ndarray, cfg: MaskingConfig, index: int, split: str = "train",
                ordinary: np.ndarray | None = None) -> dict:
    """One sample's [s] token ids -> {"tokens": the masked input, "labels": the originals, "loss_mask": 1.0 where
    chosen}. Deterministic in (cfg.seed, split, index)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    ordinary = cfg.ordinary_ids() if ordinary is None else ordinary
    rng = np.random.default_rng([cfg.seed, SPLIT_SEED[split], index])
    draw = rng.random((2, tokens.size))  # [chosen?, what it becomes]
    chosen = (draw[0] < cfg.prob) & ~np.isin(tokens, cfg.special_ids)
    masked = tokens.copy()
    masked[chosen & (draw[1] < cfg.replace)] = cfg.mask_id
    randomised = chosen & (draw[1] >= cfg.replace) & (draw[1] < cfg.replace + cfg.random)
    masked[randomised] = ordinary[rng.integers(0, ordinary.size, int(randomised.sum()))]
    return {"tokens": masked, "labels": tokens, "loss_mask": chosen.astype(np.float32)}


class MaskedDataset:
    """Wraps a megatron GPTDataset (samples of seq_length + 1 tokens as tokens/labels): sample i's first seq_length
    tokens, masked by `mask_sample` with index i."""

    def __init__(self, dataset, cfg: MaskingConfig, split: str):
        self.dataset, self.cfg, self.split = dataset, cfg, split
        self._ordinary = cfg.ordinary_ids()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        tokens = np.asarray(self.dataset[index]["tokens"])
        return mask_sample(tokens, self.cfg, int(index), self.split, self._ordinary)


def wrap(datasets: tuple, cfg: MaskingConfig) -> tuple:
    """(train, valid, test) -> the same, masked (None stays None)."""
    return tuple(None if ds is None else MaskedDataset(ds, cfg, split)
                 for ds, split in zip(datasets, ("train", "valid", "test")))
