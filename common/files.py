"""Files that appear whole or not at all, and file checksums. Shared by data_prep, pretrain and bench.

Everything the project writes for a reader to trust (manifests, tokenizer configs, shard records, checkpoint
pointers and metadata, exports, plots) goes through `atomic_path` / `atomic_dir`: the content is written under a
temporary name, flushed to disk, then renamed into place, so a reader (or a rerun after a kill, a full disk or a
power cut) never sees half a file. On failure the temporary is removed: we never leave debris we wrote.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil


class NoSpaceError(OSError):
    """The disk (or quota) holding `path` is full; says so in words instead of a bare errno."""

    def __init__(self, path: str, cause: OSError | None = None):
        super().__init__(errno.ENOSPC, f"no space left on the filesystem of {path}: free space (or quota) there "
                                       f"and rerun; what was being written has been removed")
        self.path = path
        self.__cause__ = cause


def is_no_space(e: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also when it arrives wrapped (torch.save reports a full disk as a RuntimeError
    carrying "basic_ios::clear" or "No space left on device")."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "basic_ios::clear" in text or "Disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(directory or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".tmp"):
    """Yield a temporary path next to `path`; when the block succeeds the file is fsynced and renamed to `path`,
    when it fails the temporary is removed (a full disk becomes NoSpaceError naming `path`)."""
    tmp = path + suffix
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path))
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if is_no_space(e) and not isinstance(e, NoSpaceError):
            raise NoSpaceError(path, e if isinstance(e, OSError) else None) from e
        raise


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield an empty temporary directory beside `path`; on success it replaces `path`, which must not exist or
    must be a directory the caller has decided may be replaced (the old one is moved aside, then removed)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.abspath(path).rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        old = None
        if os.path.lexists(path):
            old = os.path.abspath(path).rstrip("/") + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(parent)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_no_space(e) and not isinstance(e, NoSpaceError):
            raise NoSpaceError(path, e if isinstance(e, OSError) else None) from e
        raise


def check_output_dir(output: str, marker: str, inputs: list[str]) -> None:
    """Refuse an output directory we might destroy: one that is, contains or lies inside an input, or that is
    not empty without `marker` (the file our tool leaves in what it writes, so that rewriting a previous output
    of the same tool is allowed). `atomic_dir` then replaces it only once the new content is complete."""
    out = os.path.realpath(output)
    for item in inputs:
        src = os.path.realpath(item)
        if out == src or out.startswith(src + os.sep) or src.startswith(out + os.sep):
            raise ValueError(f"--output {output} is, contains or lies inside the input {item}; choose a directory "
                             f"outside it")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, marker)):
        raise ValueError(f"--output {output} is not empty and was not written by this tool (no {marker}); choose a "
                         f"new or empty directory, nothing was changed")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output {output} is a file; choose a directory")


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path: str, obj) -> None:
    """Sorted keys: the same object always gives the same bytes (outputs are compared byte for byte)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def save_npy(path: str, arr) -> None:
    import numpy as np

    with atomic_path(path, suffix=".tmp.npy") as tmp:
        np.save(tmp, arr)


def file_digest(path: str, h) -> str:
    """Hex digest of a file's bytes through the hash object `h` (hashlib's or xxhash's), read in 8 MB blocks."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str) -> str:
    return file_digest(path, hashlib.sha256())


def file_xxh3(path: str) -> str:
    """xxh3-128: checkpoint checksums (fast enough to verify every resume; not a defence against tampering)."""
    import xxhash

    return file_digest(path, xxhash.xxh3_128())
