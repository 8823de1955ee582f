"""prepare: readers -> clean/filter -> dedup -> tokenize -> indexed shards + manifest.

Determinism: records are cut into fixed-size chunks in input order; workers clean, hash and tokenize whole
chunks (Pool.imap keeps order); the main process makes every keep/drop decision in input order and writes.
So the output is byte-identical whatever --workers is.

Resume: shards are committed and restored by data_prep/shards.py; a rerun skips the consumed chunks and
continues, and the final output equals an uninterrupted run's. The manifest it ends with is data_prep/manifest.py's
contract with the trainer.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from common.files import file_sha256
from data_prep import manifest, readers, tokenizer as tok
from data_prep.clean import FilterConfig, clean, parse_json_line
from data_prep.dedup import MinHasher, NearDupIndex, exact_hash
from data_prep.indexed import token_dtype
from data_prep.shards import FINISHED, ShardSet

log = logging.getLogger("data_prep")


@dataclass
class PrepareOptions:
    inputs: list[str]
    tokenizer: str
    output: str
    workers: int = 1
    text_key: str = "text"
    txt_mode: str = "file"  # "file": one document per .txt file; "block": per blank-line-separated block
    text_suffixes: tuple[str, ...] = ()  # more extensions read as plain text (".py", ".md", ...)
    exclude: tuple[str, ...] = ()  # fnmatch patterns of paths to leave out
    include: tuple[str, ...] = ()  # if given, only paths matching one of these patterns
    shard_tokens: int = 256 * 2**20  # a shard is closed at the first chunk boundary past this many tokens
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: str = "exact"  # none | exact | near (near also does exact)
    near_threshold: float = 0.8
    num_perm: int = 128
    strict: bool = False
    rank: int = 0
    world_size: int = 1
    chunk_docs: int = 512  # a work unit closes at this many records...
    chunk_bytes: int = 2**18  # ...or past this many bytes of input, whichever comes first (small units leave
    # less time with a core idle at the end: 0.15-0.2 s of a 6 s run on 2 cores, against 0.3-0.45 s with 1 MB)
    progress: bool | None = None  # None: a bar on a terminal, log lines otherwise

    def fingerprint(self) -> dict:
        """What determines the output (the worker count does not)."""
        d = asdict(self)
        for k in ("workers", "progress", "output"):
            d.pop(k)
        return json.loads(json.dumps(d))  # as it reads back from disk (tuples become lists)


# ------------------------------------------------------------------------------------------ worker side
_W: dict = {}


# Workers are threads first, processes second. The tokenizer releases the GIL while it encodes (90% of the work),
# so up to THREADS_PER_PROCESS threads share one process and one tokenizer: no process start-up, no pickling,
# one BPE cache. Cleaning and numpy packing hold the GIL (~10% of the work), so wider runs use several processes
# of that many threads each. On 2 cores, 2 threads beat 2 processes by ~10% end to end.
THREADS_PER_PROCESS = 4


def _init_worker(opts: PrepareOptions, threads: int = 1, tokenizer=None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # our threads/processes are the parallelism, not rayon's
    _W["threads"] = ThreadPoolExecutor(threads, thread_name_prefix="prepare") if threads > 1 else None
    _W["tok"] = tokenizer or tok.load(opts.tokenizer)
    path = tok.resolve(opts.tokenizer)
    _W["eod"] = tok.eod_id(_W["tok"], path)
    _W["dtype"] = token_dtype(_W["tok"].get_vocab_size(with_added_tokens=True))
    _W["opts"] = opts
    _W["minhash"] = MinHasher(opts.num_perm) if opts.dedup == "near" else None


def _process_chunk(records: list[readers.Record]):
    """-> (per-record outcomes, token ids of the kept documents, each followed by EOD, in the shard dtype).
    An outcome is a drop reason (str) or (exact hash, minhash signature or None, token count with EOD).
    The worker does the per-token work (EOD, dtype) so that the main process only slices and writes."""
    opts: PrepareOptions = _W["opts"]
    outcomes, texts = [], []
    for rec in records:
        if rec.drop:
            outcomes.append(rec.drop)
            continue
        text, reason = (rec.text, None) if rec.raw is None else parse_json_line(rec.raw, opts.text_key)
        if reason is None:
            text, reason = clean(text, opts.filters)
        if reason is not None:
            if opts.strict and reason in ("bad_json", "bad_text_field", "bad_utf8"):
                raise readers.InputError(f"{rec.source}:{rec.line}: {reason.replace('_', ' ')} (--strict)")
            outcomes.append(reason)
            continue
        sig = _W["minhash"].signature(text) if _W["minhash"] is not None else None
        outcomes.append([exact_hash(text), sig, 0])
        texts.append(text)
    encodings = _W["tok"].encode_batch_fast(texts, add_special_tokens=False) if texts else []
    ids, lengths, eod = [], [], _W["eod"]
    for e in encodings:
        doc = e.ids  # a new Python list on every access: take it once
        ids += doc
        ids.append(eod)
        lengths.append(len(doc) + 1)
    flat = np.array(ids, dtype=_W["dtype"])
    it = iter(lengths)
    for o in outcomes:
        if isinstance(o, list):
            o[2] = next(it)
    return outcomes, flat


def _process_chunks(chunks: list[list[readers.Record]]) -> list:
    """A worker process's unit: several chunks, one per thread, results in order."""
    if _W["threads"] is None:
        return [_process_chunk(c) for c in chunks]
    return list(_W["threads"].map(_process_chunk, chunks))


def _in_order_on_threads(chunks, executor: ThreadPoolExecutor, window: int):
    """Like executor.map, but reads ahead only `window` chunks (map would read the whole input first)."""
    pending: deque = deque()
    for chunk in chunks:
        pending.append(executor.submit(_process_chunk, chunk))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _groups(items, size: int):
    while group := list(itertools.islice(items, size)):
        yield group


# ------------------------------------------------------------------------------------------ main side
def _records(files: list[str], opts: PrepareOptions, empty_files: list[str]):
    for path in files:
        n = 0
        for rec in readers.read_file(path, opts.text_key, opts.txt_mode, opts.strict):
            n += 1
            yield rec
        if n == 0:
            if opts.strict:
                raise readers.InputError(f"{path}: empty file (--strict)")
            empty_files.append(path)


def _chunks(records, max_records: int, max_bytes: int):
    """Work units of whole records, cut by count and by size (so a unit of large files does not leave one worker
    busy while the others idle). Depends only on the input, which keeps output and resume points independent
    of the worker count."""
    chunk, size = [], 0
    for rec in records:
        chunk.append(rec)
        size += len(rec.raw if rec.raw is not None else rec.text or "")
        if len(chunk) >= max_records or size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def files_for_rank(files: list[str], rank: int, world_size: int) -> list[str]:
    """Contiguous blocks of the sorted inputs, so that rank order is input order (merge relies on it)."""
    n = len(files)
    return files[rank * n // world_size:(rank + 1) * n // world_size]


class _Progress:
    def __init__(self, enabled: bool | None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar, self.t0, self.last = None, time.time(), 0.0
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(unit=" docs", smoothing=0.1)

    def update(self, docs: int, total_docs: int, tokens: int) -> None:
        elapsed = max(time.time() - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(docs)
            self.bar.set_postfix_str(f"{tokens / elapsed / 1e6:.2f}M tok/s")
        elif time.time() - self.last > 10:
            self.last = time.time()
            log.info("%d docs read, %.0f docs/s, %.2fM tokens/s", total_docs, total_docs / elapsed,
                     tokens / elapsed / 1e6)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def prepare(opts: PrepareOptions) -> dict:
    if opts.dedup not in ("none", "exact", "near"):
        raise ValueError(f"--dedup must be none, exact or near, got {opts.dedup!r}")
    files = files_for_rank(readers.expand_inputs(opts.inputs, tuple(opts.text_suffixes), tuple(opts.exclude),
                                                 tuple(opts.include)), opts.rank,
                           opts.world_size)
    os.makedirs(opts.output, exist_ok=True)
    tokenizer_path = tok.resolve(opts.tokenizer)
    pool, processes = None, -(-opts.workers // THREADS_PER_PROCESS)
    threads = -(-opts.workers // processes)
    if processes > 1:  # started first: the workers' start-up overlaps the set-up below
        import multiprocessing as mp

        # forkserver: workers fork from a clean single-threaded server that has imported this module once,
        # instead of each re-importing everything (spawn was 0.2 s slower on a 6.5 s run on 2 cores), and
        # without fork's hazards in a parent that has threads (numpy's BLAS pool, a caller's threads).
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["data_prep.pipeline"])
        pool = ctx.Pool(processes, initializer=_init_worker, initargs=(opts, threads))
    try:
        return _prepare(opts, files, tokenizer_path, pool, threads)
    finally:
        if pool is not None:
            pool.terminate()
        if _W.get("threads") is not None:
            _W.pop("threads").shutdown(cancel_futures=True)


def _prepare(opts: PrepareOptions, files: list[str], tokenizer_path: str, pool, threads: int) -> dict:
    tokenizer = tok.load(tokenizer_path)
    eod = tok.eod_id(tokenizer, tokenizer_path)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    shard_set = ShardSet(opts.output, opts.rank, token_dtype(vocab))
    near = NearDupIndex(opts.near_threshold, opts.num_perm) if opts.dedup == "near" else None
    seen: set[int] = set()
    cursor, counts = shard_set.restore(opts.fingerprint(), seen, near)
    counts = Counter(counts)
    if cursor == FINISHED:
        log.info("%d committed shard(s) already hold the whole input; verified, rewriting the manifest",
                 shard_set.index)
    elif cursor:
        log.info("resuming after %d committed shard(s), at input chunk %d", shard_set.index, cursor)

    empty_files: list[str] = []
    records = _records(files, opts, empty_files)
    # Skipped chunks are still read (not tokenized): the reader counts empty files as it goes.
    skip = sys.maxsize if cursor == FINISHED else cursor
    chunks = itertools.islice(_chunks(records, opts.chunk_docs, opts.chunk_bytes), skip, None)
    if pool is not None:
        results = itertools.chain.from_iterable(pool.imap(_process_chunks, _groups(chunks, threads)))
    else:
        _init_worker(opts, threads, tokenizer)
        results = (map(_process_chunk, chunks) if _W["threads"] is None
                   else _in_order_on_threads(chunks, _W["threads"], window=2 * threads))
    try:
        _keep_or_drop(opts, results, cursor, shard_set, counts, seen, near)
    except BaseException:
        shard_set.abort()
        raise
    counts["empty_files"] += len(empty_files)
    return _write_manifest(opts, shard_set, counts, tokenizer_path, vocab, eod, files)


def _keep_or_drop(opts: PrepareOptions, results, cursor: int, shard_set: ShardSet, counts: Counter, seen: set,
                  near: NearDupIndex | None) -> None:
    """Every keep/drop decision, in input order (so the output does not depend on the worker count)."""
    progress = _Progress(opts.progress)
    tokens_done = 0
    try:
        for chunk_index, (outcomes, flat) in enumerate(results, start=cursor):
            keep = np.ones(len(flat), dtype=bool)  # token mask; documents dropped here are cleared
            lengths, hashes, sigs = [], [], []
            offset = 0
            for o in outcomes:
                counts["read"] += 1
                if isinstance(o, str):
                    counts["dropped:" + o] += 1
                    continue
                h, sig, n = o
                offset += n
                reason = _duplicate(opts, h, sig, seen, near)
                if reason:
                    counts["dropped:" + reason] += 1
                    keep[offset - n:offset] = False
                    continue
                lengths.append(n)
                hashes.append(h)
                sigs.append(sig)
            if lengths:
                shard_set.add(flat if keep.all() else flat[keep], lengths, hashes, sigs)
            kept_tokens = sum(lengths)
            counts["kept"] += len(lengths)
            counts["tokens"] += kept_tokens
            tokens_done += kept_tokens
            progress.update(len(outcomes), counts["read"], tokens_done)
            if shard_set.open_tokens >= opts.shard_tokens:
                shard_set.commit(chunk_index + 1, dict(counts))
        shard_set.commit(FINISHED, dict(counts))
    finally:
        progress.close()


def _duplicate(opts: PrepareOptions, h: int, sig, seen: set, near: NearDupIndex | None) -> str | None:
    """"exact_duplicate" / "near_duplicate" for a document seen before (in input order), else None (and the
    document is remembered)."""
    if opts.dedup == "none":
        return None
    if h in seen:
        return "exact_duplicate"
    if near is not None and near.seen_similar(sig):
        return "near_duplicate"
    seen.add(h)
    return None


def _write_manifest(opts, shard_set: ShardSet, counts: Counter, tokenizer_path, vocab, eod, files) -> dict:
    dropped = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("dropped:")}
    read, kept = counts["read"], counts["kept"]
    if read != kept + sum(dropped.values()):
        raise RuntimeError(f"accounting error: read {read} != kept {kept} + dropped {sum(dropped.values())}")
    man = {
        "format": manifest.FORMAT,
        "shards": list(shard_set.committed),
        "tokenizer": {"path": os.path.abspath(tokenizer_path), "vocab_size": vocab, "eod_id": eod,
                      "sha256": file_sha256(tokenizer_path)},
        "options": {**opts.fingerprint(), "filters": opts.filters.to_dict(), "tokenizer": None},
        "inputs": files,
        "counts": {"documents_read": read, "documents_kept": kept, "tokens": counts["tokens"],
                   "dropped": dropped, "empty_files": counts["empty_files"]},
        "rank": opts.rank,
        "world_size": opts.world_size,
    }
    manifest.write(opts.output, man, opts.rank, opts.world_size)
    return man
