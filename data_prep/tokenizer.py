"""Train a byte-level BPE tokenizer (HF tokenizers) or load any HF fast tokenizer, and find its EOD id."""
from __future__ import annotations

import json
import os
from typing import Iterable

from common.files import atomic_path, write_json

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MASK_TOKEN = "<|mask|>"  # masked-language-model input (EuroBERT's spelling); every tokenizer trained here has one
_EOS_CANDIDATES = (EOD_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")
_MASK_CANDIDATES = (MASK_TOKEN, "[MASK]", "<mask>")


def train_bpe(texts: Iterable[str], vocab_size: int, output_dir: str, min_frequency: int = 2,
              chat_template: str | None = None) -> str:
    """chat_template: a built-in template's name (data_prep/chat.py): its special tokens join the vocabulary and
    the template goes into tokenizer_config.json, where transformers' apply_chat_template finds it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from data_prep.chat import BUILTIN

    if chat_template is not None and chat_template not in BUILTIN:
        raise ValueError(f"--chat-template {chat_template}: train-tokenizer knows {', '.join(BUILTIN)}")
    chat = BUILTIN.get(chat_template, {})

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOD_TOKEN, PAD_TOKEN, MASK_TOKEN, *chat.get("special_tokens", [])],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "tokenizer.json")
    with atomic_path(path) as tmp:
        tok.save(tmp)
    # What transformers.AutoTokenizer needs to load this directory (used by the HF export).
    write_json(os.path.join(output_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN, "bos_token": EOD_TOKEN,
        "pad_token": PAD_TOKEN, "mask_token": MASK_TOKEN, "unk_token": None, "model_max_length": 1_000_000_000,
        "add_bos_token": False, **({"chat_template": chat["template"]} if chat else {})})
    write_json(os.path.join(output_dir, "special_tokens_map.json"),
               {"eos_token": EOD_TOKEN, "bos_token": EOD_TOKEN, "pad_token": PAD_TOKEN, "mask_token": MASK_TOKEN})
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


def _configured_token(tokenizer_path: str, key: str) -> str | None:
    """tokenizer_config.json's `key` (eos_token, mask_token, ...) beside the tokenizer.json, if any."""
    config = os.path.join(os.path.dirname(resolve(tokenizer_path)), "tokenizer_config.json")
    if not os.path.exists(config):
        return None
    with open(config) as f:
        value = json.load(f).get(key)
    return value.get("content") if isinstance(value, dict) else value


def _special_id(tokenizer, tokenizer_path: str, key: str, candidates: tuple[str, ...]) -> int | None:
    configured = _configured_token(tokenizer_path, key)
    for name in ([configured] if configured else []) + list(candidates):
        tid = tokenizer.token_to_id(name)
        if tid is not None:
            return tid
    return None


def eod_id(tokenizer, tokenizer_path: str) -> int:
    """The tokenizer's end-of-document id: its configured eos_token, else a well-known special token."""
    tid = _special_id(tokenizer, tokenizer_path, "eos_token", _EOS_CANDIDATES)
    if tid is None:
        raise ValueError(f"--tokenizer {tokenizer_path}: found no end-of-document token (looked for eos_token in "
                         f"tokenizer_config.json and {', '.join(_EOS_CANDIDATES)}); add one to the tokenizer")
    return tid


def mask_id(tokenizer, tokenizer_path: str) -> int:
    """The mask token's id (--objective mlm): tokenizer_config.json's mask_token, else a well-known spelling."""
    tid = _special_id(tokenizer, tokenizer_path, "mask_token", _MASK_CANDIDATES)
    if tid is None:
        raise ValueError(f"--objective mlm: the tokenizer {tokenizer_path} has no mask token (looked for mask_token "
                         f"in tokenizer_config.json and {', '.join(_MASK_CANDIDATES)}). Train one with `python -m "
                         f"data_prep train-tokenizer` (it adds {MASK_TOKEN}), or add a special mask token to this "
                         f"tokenizer and re-run data_prep with it")
    return tid


def special_token_ids(tokenizer, tokenizer_path: str) -> dict:
    """{bos,eos,pad,mask}_token_id as a Hugging Face config.json states them (None where the tokenizer has none)."""
    return {"bos_token_id": _special_id(tokenizer, tokenizer_path, "bos_token", ()),
            "eos_token_id": _special_id(tokenizer, tokenizer_path, "eos_token", _EOS_CANDIDATES),
            "pad_token_id": _special_id(tokenizer, tokenizer_path, "pad_token", (PAD_TOKEN,)),
            "mask_token_id": _special_id(tokenizer, tokenizer_path, "mask_token", _MASK_CANDIDATES)}


def special_ids(tokenizer) -> tuple[int, ...]:
    """Ids of every added token marked special (end of document, padding, mask, ...): never masked or drawn."""
    return tuple(sorted(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special))


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
