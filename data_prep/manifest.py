"""The contract between data_prep and its readers (pretrain, merge): one manifest.json per output directory.

    {"format": "megatron-indexed-dataset",
     "shards": [{"path": <prefix, relative to the directory>, "documents", "tokens", "bin_sha256"}, ...],
     "tokenizer": {"path", "vocab_size", "eod_id", "sha256"},
     "options": <what determined the output>, "inputs": [files], "rank", "world_size",
     "counts": {"documents_read", "documents_kept", "tokens", "dropped": {reason: n}, "empty_files"}}

A multi-rank run writes manifest-rNNN.json per rank; `data_prep merge` combines them into manifest.json. Every
reader of a data directory goes through this module, so the file name, the layout and the checks live here.
"""
from __future__ import annotations

import json
import os

from common.files import file_sha256, write_json

MANIFEST = "manifest.json"
FORMAT = "megatron-indexed-dataset"


class ManifestError(ValueError):
    """A data directory whose manifest is missing or unusable; names the file and the fix."""


def rank_manifest_name(rank: int) -> str:
    return f"manifest-r{rank:03d}.json"


def data_dir(path: str) -> str:
    """A data_prep output directory, or a shard prefix inside one -> the directory holding the manifest."""
    return path if os.path.isdir(path) else os.path.dirname(path)


def read(directory: str, name: str = MANIFEST) -> dict:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        raise ManifestError(f"{directory}: no {name}; pass a data_prep output directory (run `python -m data_prep "
                            f"prepare`, then `merge` after a multi-rank run) or a shard prefix")
    try:
        with open(path) as f:
            man = json.load(f)
        _check(man)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not a valid data_prep manifest ({e}); rerun data_prep for this "
                            f"directory") from None
    return man


def _check(man: dict) -> None:
    if not isinstance(man, dict) or not isinstance(man.get("shards"), list):
        raise ValueError("no shard list")
    for shard in man["shards"]:
        check_shard_name(shard["path"])
        int(shard["tokens"])


def check_shard_name(name: str) -> str:
    """Shard paths are plain names inside the directory: never absolute, never climbing out with '..'."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or os.sep in name or name in (".", ".."):
        raise ValueError(f"shard path {name!r} is not a plain file name inside the data directory")
    return name


def shards(directory: str) -> list[tuple[str, int]]:
    """-> [(shard prefix, tokens)] of a data directory, in manifest order."""
    return [(os.path.join(directory, s["path"]), int(s["tokens"])) for s in read(directory)["shards"]]


def tokenizer_path(paths: list[str]) -> str:
    """The tokenizer the first data directory with a manifest was made with."""
    for path in paths:
        directory = data_dir(path)
        if os.path.exists(os.path.join(directory, MANIFEST)):
            return read(directory)["tokenizer"]["path"]
    raise ManifestError(f"no --tokenizer given and none of --data-path {' '.join(paths)} has a {MANIFEST} "
                        f"naming one; pass --tokenizer")


def check_tokenizer(paths: list[str], tokenizer: str) -> None:
    """The tokenizer a run uses must be the one its data was tokenized with (same tokenizer.json bytes): other ids
    would train on silently wrong text."""
    digest = None
    for path in paths:
        directory = data_dir(path)
        if not os.path.exists(os.path.join(directory, MANIFEST)):
            continue
        made_with = read(directory)["tokenizer"]
        digest = digest or file_sha256(tokenizer)
        if made_with.get("sha256") not in (None, digest):
            raise ManifestError(f"{directory} was tokenized with {made_with['path']}, which differs from the "
                                f"tokenizer given ({tokenizer}); prepare the data with --tokenizer "
                                f"{os.path.dirname(tokenizer)} or pass the matching tokenizer")


def write(directory: str, manifest: dict, rank: int, world_size: int) -> str:
    name = MANIFEST if world_size == 1 else rank_manifest_name(rank)
    path = os.path.join(directory, name)
    write_json(path, manifest)
    return path
