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
