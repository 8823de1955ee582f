"""Megatron indexed-dataset files (.bin + .idx), as megatron.core.datasets.indexed_dataset reads them.

Written by hand rather than with megatron's IndexedDatasetBuilder so that data_prep never imports torch (a
multi-second import in every worker process) and so that both files appear atomically (temp + rename).
Layout (little-endian): magic b"MMIDIDX\\x00\\x00", version u64 = 1, dtype code u8, sequence_count u64,
document_count u64 (= documents + 1), sequence_lengths i32[], sequence_pointers i64[] (byte offsets into .bin),
document_indices i64[] (starting at 0). One sequence per document.
"""
from __future__ import annotations

import hashlib
import os
import struct

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
               np.uint16: 8}


def token_dtype(vocab_size: int):
    """uint16 when every id fits (as Megatron's tool chooses), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedWriter:
    """Append documents; `close()` writes the index and renames both files into place."""

    def __init__(self, prefix: str, dtype):
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        self._bin_tmp = f"{prefix}.bin.tmp"
        self._bin = open(self._bin_tmp, "wb")
        self._sha = hashlib.sha256()
        self._lengths: list[np.ndarray] = []  # per add_many call: numpy, not one Python int per document
        self.tokens = 0
        self.ones = 0  # of a uint8 loss mask: the supervised tokens

    def add(self, ids: np.ndarray) -> None:
        self.add_many(ids, [len(ids)])

    def add_many(self, flat: np.ndarray, lengths: list[int]) -> None:
        """Several documents at once: `flat` holds them back to back."""
        data = np.ascontiguousarray(flat, dtype=self.dtype).tobytes()
        self._bin.write(data)
        self._sha.update(data)
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.tokens += len(flat)
        if self.dtype == np.uint8:
            self.ones += int(np.count_nonzero(flat))

    def close(self) -> dict:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * self.dtype.itemsize
        idx_tmp = f"{self.prefix}.idx.tmp"
        _write_idx(idx_tmp, self.dtype, lengths, pointers)
        os.replace(self._bin_tmp, f"{self.prefix}.bin")
        os.replace(idx_tmp, f"{self.prefix}.idx")
        return {"documents": len(lengths), "tokens": int(self.tokens), "bin_sha256": self._sha.hexdigest()}

    def abort(self) -> None:
        self._bin.close()
        for p in (self._bin_tmp, f"{self.prefix}.idx.tmp"):
            if os.path.exists(p):
                os.remove(p)


def _write_idx(path: str, dtype: np.dtype, lengths: np.ndarray, pointers: np.ndarray) -> None:
    doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", DTYPE_CODES[dtype.type]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(np.asarray(lengths, dtype=np.int32).tobytes())
        f.write(np.asarray(pointers, dtype=np.int64).tobytes())
        f.write(doc_idx.tobytes())
        f.flush()
        os.fsync(f.fileno())


def write_subset(src: str, dst: str, keep: np.ndarray) -> dict:
    """The documents of shard `src` that `keep` marks, as shard `dst`: a new index over the same .bin (a hard
    link; a copy where the filesystem has none), so that removing duplicates never rewrites token data. Megatron
    reads sequences at the pointers the index gives, so the skipped documents' bytes are simply never read."""
    idx = read_index(src)
    keep = np.asarray(keep, dtype=bool)
    bin_tmp = f"{dst}.bin.tmp"
    if os.path.lexists(bin_tmp):
        os.remove(bin_tmp)
    # A rerun finds dst.bin already linked to src.bin; renaming a second link of the same file over it would do
    # nothing and leave the .tmp behind (POSIX rename(2): "if oldpath and newpath are existing hard links referring
    # to the same file, rename() does nothing").
    if not (os.path.exists(f"{dst}.bin") and os.path.samefile(f"{src}.bin", f"{dst}.bin")):
        try:
            os.link(f"{src}.bin", bin_tmp)
        except OSError:
            import shutil

            shutil.copyfile(f"{src}.bin", bin_tmp)
        os.replace(bin_tmp, f"{dst}.bin")
    _write_idx(f"{dst}.idx.tmp", idx["dtype"], idx["lengths"][keep], idx["pointers"][keep])
    os.replace(f"{dst}.idx.tmp", f"{dst}.idx")
    info = {"documents": int(keep.sum()), "tokens": int(idx["lengths"][keep].astype(np.int64).sum())}
    if idx["dtype"] == np.uint8:  # a loss mask (data_prep/shards.py): its supervised tokens
        lengths = idx["lengths"].astype(np.int64)
        data = np.memmap(f"{dst}.bin", dtype=np.uint8, mode="r") if lengths.sum() else np.zeros(0, np.uint8)
        info["ones"] = int(np.count_nonzero(np.asarray(data)[np.repeat(keep, lengths)])) if len(data) else 0
    return info


def read_index(prefix: str) -> dict:
    """Parse an .idx (header and arrays) without torch; raises ValueError naming the file when malformed."""
    path = f"{prefix}.idx"
    with open(path, "rb") as f:
        data = f.read()
    if data[:9] != MAGIC:
        raise ValueError(f"{path}: not a Megatron indexed dataset index (bad magic)")
    version, = struct.unpack_from("<Q", data, 9)
    code, = struct.unpack_from("<B", data, 17)
    n_seq, n_doc = struct.unpack_from("<QQ", data, 18)
    off = 34
    need = off + n_seq * 4 + n_seq * 8 + n_doc * 8
    if version != 1 or len(data) < need:
        raise ValueError(f"{path}: truncated or unsupported index (version {version}, {len(data)} < {need} bytes)")
    lengths = np.frombuffer(data, np.int32, n_seq, off)
    pointers = np.frombuffer(data, np.int64, n_seq, off + 4 * n_seq)
    docs = np.frombuffer(data, np.int64, n_doc, off + 12 * n_seq)
    dtype = next(np.dtype(t) for t, c in DTYPE_CODES.items() if c == code)
    return {"dtype": dtype, "lengths": lengths, "pointers": pointers, "document_indices": docs}
