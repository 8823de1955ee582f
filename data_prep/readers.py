"""Stream documents out of raw corpora, one Record at a time, in a deterministic order.

Formats: .jsonl / .json lines (plain, .gz, .zst), a .json file holding one JSON array of objects, .parquet, .txt
(a document per file or per blank-line block), Hugging Face datasets saved with `save_to_disk` (a directory with
dataset_info.json) and bare .arrow files. Memory stays bounded: files are read line by line or record batch by
record batch (a JSON array is read whole, and refused past 1 GiB).

JSON lines travel unparsed (bytes) so that parsing happens in the worker processes, not in the reader.
Bad input becomes a Record with a `drop` reason, counted in the manifest; `strict=True` raises instead. Input
that cannot be read at all (a symbolic-link loop, a permission error) is an InputError naming the path.
"""
from __future__ import annotations

import errno
import fnmatch
import glob
import gzip
import io
import os
from dataclasses import dataclass
from typing import Iterator

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst", ".ndjson")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst")
SUPPORTED = JSONL_SUFFIXES + TEXT_SUFFIXES + (".parquet", ".arrow")
BOM = b"\xef\xbb\xbf"
MAX_JSON_ARRAY = 1 << 30


class InputError(Exception):
    """Input that makes the run meaningless (or any bad input under --strict); names file and line."""


@dataclass
class Record:
    source: str  # file path
    line: int  # 1-based line (JSONL), row (Parquet/Arrow) or block number (text)
    raw: bytes | None = None  # an unparsed JSON line
    text: str | None = None  # already-extracted text
    drop: str | None = None  # reason, when the record is bad input


# ------------------------------------------------------------------------------------------ finding files
def expand_inputs(inputs: list[str], text_suffixes: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                  include: tuple[str, ...] = ()) -> list[str]:
    """Files, directories (recursively) and globs -> a sorted, de-duplicated list of supported files.
    `text_suffixes` adds extensions read as plain text (e.g. ".py", ".md"); `exclude` drops paths matching any
    of these fnmatch patterns (e.g. "*/site-packages/*"); `include`, when given, keeps only matching paths.
    Symbolic links to directories are not followed (a link loop would never end); links to files are."""
    files: list[str] = []
    suffixes = SUPPORTED + tuple(text_suffixes)
    for item in inputs:
        if any(ch in item for ch in "*?["):
            matches = _glob(item)
            if not matches:
                raise InputError(f"--input {item!r}: the glob matches no file")
            for m in matches:
                files += _expand_one(m, suffixes, exclude)
        elif os.path.isdir(item):
            files += _expand_one(item, suffixes, exclude)
        else:
            _check_readable(item, f"--input {item}")
            files.append(item)
    seen, out = set(), []
    for f in files:
        if any(fnmatch.fnmatch(f, pat) for pat in exclude):
            continue
        if include and not any(fnmatch.fnmatch(f, pat) for pat in include):
            continue
        st = _check_readable(f, f)  # the same file named twice (or through a link) is read once
        key = (st.st_dev, st.st_ino)
        if key not in seen:
            seen.add(key)
            out.append(f)
    if not out:
        raise InputError(f"--input {' '.join(inputs)}: no supported files found (supported: {', '.join(SUPPORTED)}"
                         f", and directories written by datasets.save_to_disk)")
    return out


def _check_readable(path: str, what: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"{what}: symbolic link loop (the link points back at itself); fix or remove it") \
                from None
        if e.errno == errno.ENOENT:
            raise InputError(f"{what}: no such file or directory"
                             + (" (a symbolic link to a missing file)" if os.path.islink(path) else "")) from None
        raise InputError(f"{what}: cannot be read ({e.strerror})") from None
    if not os.path.isdir(path) and not os.access(path, os.R_OK):
        raise InputError(f"{what}: file is not readable (permission denied)")
    return st


def _glob(pattern: str) -> list[str]:
    """glob.glob, except that '**' walks directories without following symbolic links to directories (Python
    3.11's recursive glob follows them, and a link loop makes it run until memory is exhausted)."""
    if "**" not in pattern:
        return sorted(glob.glob(pattern))
    head = pattern.split("**", 1)[0]
    root = head if head.endswith(os.sep) or not head else os.path.dirname(head)
    root = root or "."
    variants = {pattern, pattern.replace(f"**{os.sep}", "")}  # '**/' also matches no directory at all
    found = []
    for d, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + names):
            path = os.path.join(d, name)
            if any(fnmatch.fnmatch(path, v) for v in variants):
                found.append(path)
    return found


def _pruned(directory: str, exclude: tuple[str, ...]) -> bool:
    """A directory whose every path is excluded is not walked at all (a stdlib walk spent most of its time in
    site-packages only to drop it). Only patterns ending in "*" can exclude everything below a directory."""
    return any(pat.endswith("*") and fnmatch.fnmatch(directory + os.sep, pat) for pat in exclude)


def _expand_one(path: str, suffixes: tuple[str, ...], exclude: tuple[str, ...] = ()) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(os.path.join(path, "state.json")):
        return [path]  # a saved HF dataset is one input
    found = []
    for root, dirs, names in os.walk(path):  # followlinks=False: directory links are not entered
        dirs[:] = sorted(d for d in dirs if not _pruned(os.path.join(root, d), exclude))
        if "dataset_info.json" in names or "state.json" in names:
            found.append(root)
            dirs[:] = []
            continue
        found += [os.path.join(root, n) for n in sorted(names) if n.endswith(suffixes)]
    return found


# ------------------------------------------------------------------------------------------ compressed files
class _StrictZstd(io.RawIOBase):
    """zstandard's stream_reader reports a clean end of file when the data stops in the middle of a frame (so a
    truncated .zst reads as complete, docs/FINDINGS.md); this reader decodes frame by frame and, when the input
    ends inside one, ends the stream after the last complete data with `truncated` set (raising at once would lose
    the lines already decoded but still buffered), which the line reader turns into EOFError."""

    def __init__(self, path: str):
        import zstandard

        self._f = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._pending = b""
        self._in_frame = False
        self.truncated = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self._pending:
            data = self._f.read(1 << 20)
            if not data:
                self.truncated = self._in_frame
                return 0
            while data:
                self._in_frame = True
                self._pending += self._obj.decompress(data)
                if self._obj.eof:  # a frame ended; what follows (if anything) starts the next one
                    data, self._in_frame = self._obj.unused_data, False
                    self._obj = self._dctx.decompressobj()
                else:
                    data = b""
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def _open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(_StrictZstd(path), buffer_size=1 << 20)
    return open(path, "rb")


# ------------------------------------------------------------------------------------------ formats
def _lines(path: str) -> Iterator[bytes]:
    with _open_binary(path) as f:
        yield from f
        if getattr(getattr(f, "raw", None), "truncated", False):
            raise EOFError("the file ends in the middle of a zstd frame")


def read_jsonl(path: str, strict: bool) -> Iterator[Record]:
    n = 0
    try:
        for n, line in enumerate(_lines(path), start=1):
            if n == 1 and line.startswith(BOM):  # a UTF-8 byte-order mark is no part of the first record
                line = line[len(BOM):]
            if n == 1 and path.endswith((".json", ".json.gz", ".json.zst")) and line.lstrip().startswith(b"["):
                yield from read_json_array(path, strict)
                return
            if line.strip():
                yield Record(path, n, raw=line)
    except (EOFError, OSError, gzip.BadGzipFile) as e:
        _truncated(path, n + 1, e, strict)
        yield Record(path, n + 1, drop="truncated_file")
    except Exception as e:  # zstandard raises its own ZstdError
        if type(e).__name__ != "ZstdError":
            raise
        _truncated(path, n + 1, e, strict)
        yield Record(path, n + 1, drop="truncated_file")


def read_json_array(path: str, strict: bool) -> Iterator[Record]:
    """A .json file holding one array of objects: each element is a record (its raw JSON, parsed by workers)."""
    import orjson

    with _open_binary(path) as f:
        data = f.read(MAX_JSON_ARRAY + 1)
    if len(data) > MAX_JSON_ARRAY:
        raise InputError(f"{path}: a JSON array over 1 GiB is read whole into memory; convert it to JSON lines "
                         f"(one object per line, e.g. `jq -c '.[]' {path} > x.jsonl`)")
    try:
        items = orjson.loads(data[len(BOM):] if data.startswith(BOM) else data)
    except orjson.JSONDecodeError as e:
        if strict:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        yield Record(path, 1, drop="bad_json")
        return
    for i, item in enumerate(items, start=1):
        yield Record(path, i, raw=orjson.dumps(item))


def _truncated(path: str, line: int, e: Exception, strict: bool) -> None:
    if strict:
        raise InputError(f"{path}:{line}: compressed stream is truncated or corrupt ({e}); re-download the file "
                         f"or drop --strict to keep the documents before the damage") from e


def read_text(path: str, per_block: bool, strict: bool) -> Iterator[Record]:
    try:
        with _open_binary(path) as f:
            data = f.read()
    except (EOFError, OSError) as e:
        _truncated(path, 1, e, strict)
        yield Record(path, 1, drop="truncated_file")
        return
    try:
        text = data.decode("utf-8-sig")  # without a byte-order mark, if there is one
    except UnicodeDecodeError as e:
        if strict:
            raise InputError(f"{path}: invalid UTF-8 at byte {e.start}") from e
        yield Record(path, 1, drop="bad_utf8")
        return
    if not per_block:
        yield Record(path, 1, text=text)
        return
    block, start, lineno = [], 1, 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block:
            yield Record(path, start, text="\n".join(block))
            block = []
    if block:
        yield Record(path, start, text="\n".join(block))


def read_arrow_table_batches(path: str, text_key: str, strict: bool,
                             rows: tuple[str, ...] | None = None) -> Iterator[Record]:
    """Parquet files, bare .arrow files and save_to_disk directories, one record batch at a time. rows: these
    columns of each row (those present), as the raw JSON a JSON-lines reader gives (conversations: --format
    chat|instruction)."""
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        pf = pq.ParquetFile(path)
        columns = pf.schema_arrow.names
        wanted = [c for c in rows if c in columns] if rows else \
            [text_key] if text_key in columns else columns[:1]
        batches = pf.iter_batches(batch_size=1024, columns=wanted or columns[:1])
    else:
        files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "**", "*.arrow"),
                                                                     recursive=True))
        batches = _arrow_batches(files)
        first = next(batches, None)
        columns = first.schema.names if first is not None else [text_key]
        batches = _chain([first] if first is not None else [], batches)
    if rows:
        yield from _whole_rows(path, batches, rows)
        return
    if text_key not in columns:
        msg = (f"{path}: no column {text_key!r} (columns: {', '.join(columns)}); pass --text-key with the "
               f"column that holds the text")
        if strict:
            raise InputError(msg)
        row = 0
        for batch in batches:  # every row is a document lost, and counted as one
            for _ in range(batch.num_rows):
                row += 1
                yield Record(path, row, drop="missing_text_column")
        return
    row = 0
    for batch in batches:
        for value in batch.column(batch.schema.get_field_index(text_key)).to_pylist():
            row += 1
            if isinstance(value, str):
                yield Record(path, row, text=value)
            else:
                if strict:
                    raise InputError(f"{path}: row {row}: {text_key!r} is {type(value).__name__}, not a string")
                yield Record(path, row, drop="bad_text_field")


def _whole_rows(path: str, batches, columns: tuple[str, ...]) -> Iterator[Record]:
    """Each row's `columns` as JSON; a value JSON cannot hold (bytes, a decimal) is a bad row, counted."""
    import orjson

    row = 0
    for batch in batches:
        for value in batch.to_pylist():
            row += 1
            try:
                yield Record(path, row, raw=orjson.dumps({k: v for k, v in value.items() if k in columns}))
            except TypeError:  # orjson.JSONEncodeError
                yield Record(path, row, drop="bad_json")


def _arrow_batches(files):
    import pyarrow as pa

    for f in files:
        with pa.memory_map(f) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
                continue
            yield from reader


def _chain(first, rest):
    yield from first
    yield from rest


def read_file(path: str, text_key: str = "text", txt_mode: str = "file", strict: bool = False,
              rows: tuple[str, ...] | None = None) -> Iterator[Record]:
    if os.path.isdir(path) or path.endswith((".parquet", ".arrow")):
        yield from read_arrow_table_batches(path, text_key, strict, rows)
    elif path.endswith(TEXT_SUFFIXES) or not path.endswith(JSONL_SUFFIXES):
        yield from read_text(path, per_block=txt_mode == "block", strict=strict)
    else:
        yield from read_jsonl(path, strict)
