"""Stream documents out of raw corpora, one Record at a time, in a deterministic order.

Formats: .jsonl / .json lines (plain, .gz, .zst), .parquet, .txt (a document per file or per blank-line block),
Hugging Face datasets saved with `save_to_disk` (a directory with dataset_info.json) and bare .arrow files.
Memory stays bounded: files are read line by line or record batch by record batch.

JSON lines travel unparsed (bytes) so that parsing happens in the worker processes, not in the reader.
Bad input becomes a Record with a `drop` reason, counted in the manifest; `strict=True` raises instead.
"""
from __future__ import annotations

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


class InputError(Exception):
    """Input that makes the run meaningless (or any bad input under --strict); names file and line."""


@dataclass
class Record:
    source: str  # file path
    line: int  # 1-based line (JSONL), row (Parquet/Arrow) or block number (text)
    raw: bytes | None = None  # an unparsed JSON line
    text: str | None = None  # already-extracted text
    drop: str | None = None  # reason, when the record is bad input


def expand_inputs(inputs: list[str], text_suffixes: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                  include: tuple[str, ...] = ()) -> list[str]:
    """Files, directories (recursively) and globs -> a sorted, de-duplicated list of supported files.
    `text_suffixes` adds extensions read as plain text (e.g. ".py", ".md"); `exclude` drops paths matching any
    of these fnmatch patterns (e.g. "*/site-packages/*"); `include`, when given, keeps only matching paths."""
    files: list[str] = []
    suffixes = SUPPORTED + tuple(text_suffixes)
    for item in inputs:
        if any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise InputError(f"--input {item!r}: the glob matches no file")
            for m in matches:
                files += _expand_one(m, suffixes, exclude)
        elif os.path.isdir(item):
            files += _expand_one(item, suffixes, exclude)
        elif os.path.exists(item):
            if not os.access(item, os.R_OK):
                raise InputError(f"--input {item}: file is not readable (permission denied)")
            files.append(item)
        else:
            raise InputError(f"--input {item}: no such file or directory")
    seen, out = set(), []
    for f in files:
        if any(fnmatch.fnmatch(f, pat) for pat in exclude):
            continue
        if include and not any(fnmatch.fnmatch(f, pat) for pat in include):
            continue
        st = os.stat(f)  # the same file named twice (or through a link) is read once; cheaper than realpath
        key = (st.st_dev, st.st_ino)
        if key not in seen:
            seen.add(key)
            out.append(f)
    if not out:
        raise InputError(f"--input {' '.join(inputs)}: no supported files found (supported: {', '.join(SUPPORTED)}"
                         f", and directories written by datasets.save_to_disk)")
    return out


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
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not _pruned(os.path.join(root, d), exclude))
        if "dataset_info.json" in names or "state.json" in names:
            found.append(root)
            dirs[:] = []
            continue
        found += [os.path.join(root, n) for n in sorted(names) if n.endswith(suffixes)]
    return found


def _open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def _lines(path: str) -> Iterator[bytes]:
    with _open_binary(path) as f:
        yield from io.BufferedReader(f, buffer_size=1 << 20) if path.endswith(".zst") else f


def read_jsonl(path: str, strict: bool) -> Iterator[Record]:
    n = 0
    try:
        for n, line in enumerate(_lines(path), start=1):
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


def _truncated(path: str, line: int, e: Exception, strict: bool) -> None:
    if strict:
        raise InputError(f"{path}:{line}: compressed stream is truncated or corrupt ({e}); re-download the file "
                         f"or drop --strict to keep the documents before the damage") from e


def read_text(path: str, per_block: bool, strict: bool) -> Iterator[Record]:
    with _open_binary(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
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


def read_arrow_table_batches(path: str, text_key: str, strict: bool) -> Iterator[Record]:
    """Parquet files, bare .arrow files and save_to_disk directories, one record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        pf = pq.ParquetFile(path)
        columns = pf.schema_arrow.names
        batches = pf.iter_batches(batch_size=1024, columns=[text_key] if text_key in columns else None)
    else:
        files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "**", "*.arrow"),
                                                                     recursive=True))
        batches = _arrow_batches(files)
        first = next(batches, None)
        columns = first.schema.names if first is not None else [text_key]
        batches = _chain([first] if first is not None else [], batches)
    if text_key not in columns:
        msg = (f"{path}: no column {text_key!r} (columns: {', '.join(columns)}); pass --text-key with the "
               f"column that holds the text")
        if strict:
            raise InputError(msg)
        yield Record(path, 0, drop="missing_text_column")
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
    del pa


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


def read_file(path: str, text_key: str = "text", txt_mode: str = "file", strict: bool = False) -> Iterator[Record]:
    if os.path.isdir(path) or path.endswith((".parquet", ".arrow")):
        yield from read_arrow_table_batches(path, text_key, strict)
    elif path.endswith(TEXT_SUFFIXES) or not path.endswith(JSONL_SUFFIXES):
        yield from read_text(path, per_block=txt_mode == "block", strict=strict)
    else:
        yield from read_jsonl(path, strict)
