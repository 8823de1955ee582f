"""Train a byte-level BPE tokenizer (HF tokenizers) or load any HF fast tokenizer, and find its EOD id."""
from __future__ import annotations

import json
import os
from typing import Iterable

from common.files import atomic_path, write_json

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_EOS_CANDIDATES = (EOD_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")


def train_bpe(texts: Iterable[str], vocab_size: int, output_dir: str, min_frequency: int = 2) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOD_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "tokenizer.json")
    with atomic_path(path) as tmp:
        tok.save(tmp)
    # What transformers.AutoTokenizer needs to load this directory (used by the HF export).
    write_json(os.path.join(output_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN, "bos_token": EOD_TOKEN,
        "pad_token": PAD_TOKEN, "unk_token": None, "model_max_length": 1_000_000_000, "add_bos_token": False})
    write_json(os.path.join(output_dir, "special_tokens_map.json"),
               {"eos_token": EOD_TOKEN, "bos_token": EOD_TOKEN, "pad_token": PAD_TOKEN})
    return path


def resolve(path: str) -> str:
    """A tokenizer.json path, or a directory holding one -> the tokenizer.json path."""
    candidate = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        raise FileNotFoundError(f"--tokenizer {path}: no tokenizer.json there; pass a tokenizer.json file or a "
                                f"directory with one (train one with `python -m data_prep train-tokenizer`)")
    return candidate


def load(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(resolve(path))


def eod_id(tokenizer, tokenizer_path: str) -> int:
    """The tokenizer's end-of-document id: its configured eos_token, else a well-known special token."""
    config = os.path.join(os.path.dirname(resolve(tokenizer_path)), "tokenizer_config.json")
    names = []
    if os.path.exists(config):
        with open(config) as f:
            eos = json.load(f).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos:
            names.append(eos)
    for name in names + list(_EOS_CANDIDATES):
        tid = tokenizer.token_to_id(name)
        if tid is not None:
            return tid
    raise ValueError(f"--tokenizer {tokenizer_path}: found no end-of-document token (looked for eos_token in "
                     f"tokenizer_config.json and {', '.join(_EOS_CANDIDATES)}); add one to the tokenizer")


class Encoder:
    """Texts -> token ids for prepare, with gigatoken when it reproduces the tokenizer, HF tokenizers otherwise.

    gigatoken (Rust, what Megatron-LM's tools/preprocess_data_fast.py uses) encodes the same byte-level BPE
    ~24x faster than tokenizers' encode_batch_fast on 2 cores, with identical ids (docs/FINDINGS.md). Identical
    is checked, never assumed: `check(texts)` encodes with both, and prepare runs it on the first work unit and
    every --verify-every-th after, stopping the run at the first difference (so shards stay byte-identical to
    the HF path, and so to Megatron's own preprocess_data). `backend`: "auto" (gigatoken if it loads the
    tokenizer), "gigatoken" or "tokenizers".
    """

    def __init__(self, path: str, backend: str = "auto"):
        self.path = resolve(path)
        self._hf = None
        self.giga = None
        if backend not in ("auto", "gigatoken", "tokenizers"):
            raise ValueError(f"--tokenizer-backend {backend!r}: use auto, gigatoken or tokenizers")
        if backend != "tokenizers":
            try:
                import gigatoken

                self.giga = gigatoken.Tokenizer(self.path)
            except Exception as e:  # a tokenizer gigatoken does not support: fall back, or say so
                if backend == "gigatoken":
                    raise ValueError(f"--tokenizer-backend gigatoken: gigatoken cannot load {self.path} ({e}); "
                                     f"use --tokenizer-backend tokenizers") from None
        self.backend = "gigatoken" if self.giga is not None else "tokenizers"

    @property
    def hf(self):
        if self._hf is None:
            self._hf = load(self.path)
        return self._hf

    def encode(self, texts: list[str]):
        """-> (all ids back to back as uint32, per-text lengths as int64)."""
        import numpy as np

        if not texts:
            return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64)
        if self.giga is not None:
            return _flat(self.giga.encode_batch(texts, parallel=False))  # our workers are the parallelism
        encodings = self.hf.encode_batch_fast(texts, add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        flat = np.fromiter((i for e in encodings for i in e.ids), dtype=np.uint32, count=int(lengths.sum()))
        return flat, lengths

    def check(self, texts: list[str]) -> str | None:
        """None if gigatoken and tokenizers give the same ids for every text, else where they first differ."""
        if self.giga is None or not texts:
            return None
        flat, lengths = self.encode(texts)
        diff = first_difference(flat, lengths, self.hf.encode_batch_fast(texts, add_special_tokens=False))
        return None if diff is None else f"text {diff[0]} ({len(texts[diff[0]])} characters): {diff[1]}"


def first_difference(flat, lengths, encodings) -> tuple[int, str] | None:
    """Where gigatoken's ids (flat + lengths) first differ from tokenizers' encodings: (text index, what)."""
    offset = 0
    for i, (n, e) in enumerate(zip(lengths.tolist(), encodings)):
        got, want = flat[offset:offset + n].tolist(), e.ids
        offset += n
        if got != want:
            k = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            return i, f"token {k} is {got[k:k + 3]} from gigatoken, {want[k:k + 3]} from tokenizers"
    return None


def _flat(ids):
    """gigatoken's awkward array of token lists -> (flat uint32 ids, int64 lengths), read straight from its
    offsets and content buffers (ak.flatten / ak.num cost as much as the encode itself on 256 KB units)."""
    import awkward as ak
    import numpy as np

    layout = ids.layout
    if isinstance(layout, ak.contents.ListOffsetArray) and isinstance(layout.content, ak.contents.NumpyArray):
        offsets = np.asarray(layout.offsets.data)
        flat = np.asarray(layout.content.data)[offsets[0]:offsets[-1]]
        return flat.astype(np.uint32, copy=False), np.diff(offsets).astype(np.int64)
    return ak.flatten(ids).to_numpy().astype(np.uint32, copy=False), ak.num(ids).to_numpy().astype(np.int64)
