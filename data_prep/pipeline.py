"""prepare: readers -> clean/filter -> dedup -> tokenize -> indexed shards + manifest.

Determinism: records are cut into work units in input order (by count and bytes only); worker processes parse,
clean, hash, tokenize and pack whole units (data_prep/work.py; Pool.imap keeps order); the main process makes
every keep/drop decision in input order and writes. So the output is byte-identical whatever --workers is.

Workers are processes: with gigatoken, tokenizing is the small part, and parsing and cleaning hold the GIL.
Resume: shards are committed and restored by data_prep/shards.py; a rerun skips the consumed units and continues,
and the final output equals an uninterrupted run's. A rerun whose inputs changed (a file added, removed, grown
or touched) is refused: the fingerprint holds every input file with its size and modification time.

Accounting: records are counted where the readers produce them and again where their outcomes come back; the
two must agree, and read == kept + sum(dropped). The first few drops of each reason are logged with file:line
and kept in the manifest.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np

from common.files import file_sha256
from data_prep import chat, manifest, minhash, readers, tokenizer as tok, work
from data_prep.clean import FilterConfig
from data_prep.hashset import HashSet
from data_prep.indexed import token_dtype
from data_prep.shards import FINISHED, ShardSet, write_shard_subset

log = logging.getLogger("data_prep")
FORMAT_VERSION = 2  # 2: xxh3-64 exact-dedup hashes, input files fingerprinted
DROP_EXAMPLES = 5  # per reason, logged and kept in the manifest


class EmptyOutput(ValueError):
    """A run that would keep no document at all."""


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
    shard_tokens: int = 256 * 2**20  # a shard is closed at the first unit boundary past this many tokens
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: str = "exact"  # none | exact | near (near also does exact)
    near_threshold: float = 0.8
    num_perm: int = 128  # MinHash buckets (a power of two)
    near_bands: int | None = None  # LSH bands x rows; None: minhash.lsh_params(near_threshold, num_perm)
    near_rows: int | None = None
    strict: bool = False
    rank: int = 0
    world_size: int = 1
    chunk_docs: int = 4096  # a work unit closes at this many records...
    chunk_bytes: int = 2**20  # ...or past this many bytes of input, whichever comes first (1 MB: each unit costs
    # ~1 ms of fixed overhead in gigatoken's awkward output; 256 KB units were 10% slower end to end)
    tokenizer_backend: str = "auto"  # auto | gigatoken | tokenizers (the ids are the same; checked)
    verify_every: int = 256  # check gigatoken against tokenizers on every n-th work unit (0: never)
    progress: bool | None = None  # None: a bar on a terminal, log lines otherwise
    data_format: str = "text"  # text | chat | instruction: conversations with a loss mask (data_prep/chat.py)
    messages_key: str = "messages"  # chat: the field holding [{role, content}, ...]
    chat_template: str | None = None  # chatml | llama3 | PATH.jinja; None: the tokenizer's own
    max_tokens: int | None = None  # chat/instruction: longer conversations are dropped or truncated (too_long)
    too_long: str = "drop"  # drop | truncate (keeps the prompt, cuts the end)

    def row_columns(self) -> tuple[str, ...] | None:
        """The columns a Parquet/Arrow row is read with, for conversations (None: the --text-key column)."""
        return {"chat": (self.messages_key,), "instruction": ("instruction", "input", "output")}.get(self.data_format)

    def fingerprint(self, files: list[str]) -> dict:
        """What determines the output (the worker count, the backend and the checking do not), and the input
        files as they are now. A text run's is what it was before conversations existed (a run interrupted then
        resumes, and merges with ranks of that version)."""
        d = asdict(self)
        for k in ("workers", "progress", "output", "tokenizer_backend", "verify_every"):
            d.pop(k)
        if self.data_format == "text":
            for k in CONVERSATION_OPTIONS:
                d.pop(k)
        d["format"] = FORMAT_VERSION
        if self.data_format != "text":  # the template's text, not only its name or path, decides the ids
            d["chat_template_sha256"] = chat.load_template(os.path.dirname(tok.resolve(self.tokenizer)),
                                                           self.chat_template).sha256
        d["files"] = [[f, *_stat(f)] for f in files]
        return json.loads(json.dumps(d))  # as it reads back from disk (tuples become lists)


CONVERSATION_OPTIONS = ("data_format", "messages_key", "chat_template", "max_tokens", "too_long")


def check_options(opts: PrepareOptions) -> None:
    """Refuse, naming the option, what the run would otherwise ignore or misread."""
    if opts.dedup not in ("none", "exact", "near"):
        raise ValueError(f"--dedup must be none, exact or near, got {opts.dedup!r}")
    if opts.data_format not in ("text", "chat", "instruction"):
        raise ValueError(f"--format must be text, chat or instruction, got {opts.data_format!r}")
    if opts.too_long not in ("drop", "truncate"):
        raise ValueError(f"--too-long must be drop or truncate, got {opts.too_long!r}")
    if opts.max_tokens is not None and opts.max_tokens < 2:
        raise ValueError(f"--max-tokens {opts.max_tokens}: give at least 2 (a token and the end-of-document id)")
    if opts.data_format == "text":
        given = [f"--{k.replace('_', '-')}" for k, default in (("chat_template", None), ("max_tokens", None),
                                                                ("too_long", "drop"), ("messages_key", "messages"))
                 if getattr(opts, k) != default]
        if given:
            raise ValueError(f"{', '.join(given)} apply to conversations only; pass --format chat or instruction "
                             f"(or drop them: --format text documents are cut by --max-chars)")


def _stat(path: str) -> tuple[int, int]:
    if os.path.isdir(path):  # a saved HF dataset: its arrow files
        files = sorted(os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns)
        return sum(os.path.getsize(f) for f in files), max((os.stat(f).st_mtime_ns for f in files), default=0)
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def files_for_rank(files: list[str], rank: int, world_size: int) -> list[str]:
    """Contiguous blocks of the sorted inputs, so that rank order is input order (merge relies on it)."""
    n = len(files)
    return files[rank * n // world_size:(rank + 1) * n // world_size]


# ------------------------------------------------------------------------------------------ reading
RANGE_SUFFIXES = (".jsonl", ".ndjson", ".json")  # plain JSON lines: workers read their byte ranges themselves


class _Reading:
    """The input as work units, in order: byte ranges of plain JSON-lines files (cut at line boundaries here,
    read and split by the workers, so the data does not travel through this process), and lists of records for
    everything else (compressed, Parquet, Arrow, text). Counts records where they are read (here, or in the
    worker for ranges) and notes empty files."""

    def __init__(self, files: list[str], opts: PrepareOptions):
        self.files, self.opts = files, opts
        self.records, self.empty_files = 0, []

    def units(self):
        pending, size = [], 0
        for path in self.files:
            if self._is_ranged(path):
                if pending:
                    yield pending
                    pending, size = [], 0
                yield from self._ranges(path)
                continue
            n = 0
            for rec in readers.read_file(path, self.opts.text_key, self.opts.txt_mode, self.opts.strict,
                                         rows=self.opts.row_columns()):
                n += 1
                self.records += 1
                pending.append((rec.source, rec.line, rec.raw, rec.text, rec.drop))
                size += len(rec.raw if rec.raw is not None else rec.text or "")
                if len(pending) >= self.opts.chunk_docs or size >= self.opts.chunk_bytes:
                    yield pending
                    pending, size = [], 0
            if n == 0:
                self._empty(path)
        if pending:
            yield pending

    def _empty(self, path: str) -> None:
        if self.opts.strict:
            raise readers.InputError(f"{path}: empty file (--strict)")
        self.empty_files.append(path)

    @staticmethod
    def _is_ranged(path: str) -> bool:
        if not path.endswith(RANGE_SUFFIXES) or not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            head = f.read(4096).removeprefix(readers.BOM).lstrip()
        return not (path.endswith(".json") and head.startswith(b"["))  # a JSON array: read whole, as records

    def _ranges(self, path: str):
        """("range", path, start, end, first line) units of --chunk-mb or --chunk-docs lines, whichever comes
        first, ending after a newline."""
        size = os.path.getsize(path)
        if size == 0:
            self._empty(path)
            return
        # Read window by window (a memory map of the whole file would keep every page it touched resident).
        with open(path, "rb") as f:
            def window(at: int, n: int) -> np.ndarray:
                f.seek(at)
                return np.frombuffer(f.read(n), dtype=np.uint8)

            start, line, any_text = 0, 1, False
            while start < size:
                piece = window(start, self.opts.chunk_bytes)
                end = start + len(piece)
                lines = np.flatnonzero(piece == 10)
                if len(lines) >= self.opts.chunk_docs:
                    end = start + int(lines[self.opts.chunk_docs - 1]) + 1
                    n_lines = self.opts.chunk_docs
                else:
                    n_lines = len(lines)
                    nl = []
                    while len(nl) == 0 and end < size:  # up to the end of the line the window stopped in
                        nl = np.flatnonzero(window(end, 1 << 20) == 10)
                        end = end + int(nl[0]) + 1 if len(nl) else min(end + (1 << 20), size)
                    n_lines += 1 if len(nl) else 0
                if not any_text:
                    any_text = bool(np.count_nonzero((piece != 10) & (piece != 32) & (piece != 13) & (piece != 9)))
                yield ("range", path, start, end, line)
                line += n_lines
                start = end
        if not any_text:
            self._empty(path)


# ------------------------------------------------------------------------------------------ run
def prepare(opts: PrepareOptions) -> dict:
    check_options(opts)
    ctx = _worker_context() if opts.workers > 1 else None
    files = files_for_rank(readers.expand_inputs(opts.inputs, tuple(opts.text_suffixes), tuple(opts.exclude),
                                                 tuple(opts.include)), opts.rank, opts.world_size)
    os.makedirs(opts.output, exist_ok=True)
    tokenizer_path = tok.resolve(opts.tokenizer)
    hf = tok.load(tokenizer_path)
    vocab, eod = hf.get_vocab_size(with_added_tokens=True), tok.eod_id(hf, tokenizer_path)
    template = None
    if opts.data_format != "text":  # refused before any worker starts: no template, or one the tokenizer lacks
        template = chat.load_template(os.path.dirname(tokenizer_path), opts.chat_template)
        chat.check_tokens(template, hf)
    cfg = work.WorkConfig(tokenizer=tokenizer_path, eod=eod, dtype=np.dtype(token_dtype(vocab)).name,
                          backend=opts.tokenizer_backend, text_key=opts.text_key, filters=opts.filters,
                          dedup=opts.dedup != "none", near=opts.dedup == "near", num_perm=opts.num_perm,
                          strict=opts.strict, verify_every=opts.verify_every, format=opts.data_format,
                          messages_key=opts.messages_key, chat_template=opts.chat_template,
                          max_tokens=opts.max_tokens, too_long=opts.too_long)
    pool = None
    if ctx is not None:
        pool = ctx.Pool(opts.workers, initializer=work.init, initargs=(cfg,))
    else:
        work.init(cfg)
    try:
        return _prepare(opts, files, cfg, pool, tokenizer_path, vocab, hf, template)
    finally:
        if pool is not None:
            pool.terminate()


def _worker_context():
    """Workers are forked from this process, which has imported everything they need (numpy, awkward, gigatoken:
    forking saves the 0.2-0.3 s a forkserver's fresh interpreter spends importing them again). Forking is safe
    here: at this point the process has started no threads of its own (nothing has encoded yet, so neither
    gigatoken's nor tokenizers' thread pools exist; OpenBLAS re-initialises its threads after fork)."""
    import multiprocessing as mp

    return mp.get_context("fork")


# With one-process `--dedup near`, the shards as first written still hold the near duplicates: they, their hashes,
# MinHash signatures and commit records live in this subdirectory, and the output directory holds only the product
# (new indexes over the same .bin files, hard-linked) and manifest.json, so that a glob or a Megatron prefix list
# over the output never trains on the duplicates (issue 29). A rerun after a kill resumes from this directory.
NEAR_INPUT = "near-input"


def _shard_dir(opts: PrepareOptions) -> str:
    """Where this rank writes its shards: the output directory itself unless a near pass follows in-process."""
    if opts.dedup == "near" and opts.world_size == 1:
        return os.path.join(opts.output, NEAR_INPUT)
    return opts.output


def _prepare(opts: PrepareOptions, files: list[str], cfg, pool, tokenizer_path: str, vocab: int, hf,
             template) -> dict:
    shard_dir = _shard_dir(opts)
    os.makedirs(shard_dir, exist_ok=True)
    shard_set = ShardSet(shard_dir, opts.rank, np.dtype(cfg.dtype))
    seen = HashSet(spill_dir=os.path.join(opts.output, f".dedup-r{opts.rank:03d}"))
    try:
        cursor, counts = shard_set.restore(opts.fingerprint(files), seen)
        counts = Counter(counts)
        if cursor == FINISHED:
            log.info("%d committed shard(s) already hold the whole input; verified, rewriting the manifest",
                     shard_set.index)
        elif cursor:
            log.info("resuming after %d committed shard(s), at input unit %d", shard_set.index, cursor)
        reading = _Reading(files, opts)
        # Skipped units are still read (not tokenized): the reader counts empty files as it goes.
        skip = sys.maxsize if cursor == FINISHED else cursor
        units = itertools.islice(enumerate(reading.units()), skip, None)
        results = pool.imap(work.process, units) if pool is not None else map(work.process, units)
        examples = _keep_or_drop(opts, results, cursor, shard_set, counts, seen, reading, hf)
    except BaseException:
        shard_set.abort()
        raise
    finally:
        seen.close()
    counts["empty_files"] += len(reading.empty_files)
    _check_accounting(counts, reading)
    backend = pool.apply(work.backend) if pool is not None else work.backend()
    shards = list(shard_set.committed)
    if opts.dedup == "near" and opts.world_size == 1:  # with several ranks, merge clusters across all of them
        shards = _near_pass(opts, shards, counts)
    return _write_manifest(opts, shards, counts, examples, tokenizer_path, vocab, cfg, files, backend, template)


def _near_pass(opts: PrepareOptions, shards: list[dict], counts: Counter) -> list[dict]:
    """Near duplicates over the whole output (data_prep/minhash.py): each shard of NEAR_INPUT becomes the shard of
    the same name in the output directory, indexed without them (the .bin is shared through a hard link, so no
    token is copied). Rewritten whole on a rerun, so a kill during this pass only costs the pass."""
    source = _shard_dir(opts)
    keep, dropped = minhash.near_keep_masks(source, shards, opts.near_threshold, opts.near_bands,
                                            opts.near_rows, opts.num_perm)
    if dropped:
        counts["dropped:near_duplicate"] += dropped
        counts["kept"] -= dropped
    out = []
    for shard, mask in zip(shards, keep):
        entry = write_shard_subset(source, shard, opts.output, shard["path"], mask)
        counts["tokens"] -= shard["tokens"] - entry["tokens"]
        out.append(entry)
    return out


def _keep_or_drop(opts: PrepareOptions, results, cursor: int, shard_set: ShardSet, counts: Counter,
                  seen: HashSet, reading: _Reading, hf) -> dict:
    """Every keep/drop decision, in input order (so the output does not depend on the worker count)."""
    progress, examples = _Progress(opts.progress), defaultdict(list)
    tokens_done = 0
    try:
        for unit_index, result in enumerate(results, start=cursor):
            kind, n_records, outcomes, packed, probe, sigs, loss_mask, truncated = result
            if probe is not None:
                work.check_probe(hf, probe)
            if n_records != len(outcomes):
                raise RuntimeError(f"accounting error: work unit {unit_index} had {n_records} records, its worker "
                                   f"returned {len(outcomes)} outcomes")
            counts["processed"] += len(outcomes)
            counts["list_records"] += n_records if kind == "list" else 0
            candidates = [o for o in outcomes if o[0] is None]
            first = seen.first_seen([o[1] for o in candidates]) if opts.dedup != "none" else \
                np.ones(len(candidates), dtype=bool)
            keep = np.ones(len(packed), dtype=bool)  # token mask; documents dropped here are cleared
            lengths, hashes, offset, c = [], [], 0, 0
            for o in outcomes:
                if o[0] is not None:
                    _drop(counts, examples, o[0], o[1])
                    continue
                _, h, n = o
                offset += n
                c += 1
                if not first[c - 1]:
                    counts["dropped:exact_duplicate"] += 1
                    keep[offset - n:offset] = False
                    continue
                lengths.append(n)
                hashes.append(h)
            for where in truncated:  # kept, shortened: counted (and the first few named) like drops
                _drop(counts, examples, "truncated_too_long", where, key="truncated:")
            if lengths:
                shard_set.add(packed if keep.all() else packed[keep], lengths, hashes,
                              sigs[first] if sigs is not None else None,
                              None if loss_mask is None else loss_mask if keep.all() else loss_mask[keep])
            counts["kept"] += len(lengths)
            counts["tokens"] += sum(lengths)
            tokens_done += sum(lengths)
            progress.update(len(outcomes), counts["processed"], tokens_done)
            if shard_set.open_tokens >= opts.shard_tokens:
                shard_set.commit(unit_index + 1, dict(counts))
        shard_set.commit(FINISHED, dict(counts))
    finally:
        progress.close()
    return dict(examples)


def _drop(counts: Counter, examples: dict, reason: str, where: str, key: str = "dropped:") -> None:
    counts[key + reason] += 1
    if len(examples[reason]) < DROP_EXAMPLES:
        examples[reason].append(where)
        log.warning("%s %s: %s%s", key[:-1], where, reason.replace("_", " "),
                    " (further ones counted, not logged)" if len(examples[reason]) == DROP_EXAMPLES else "")


def _check_accounting(counts: Counter, reading: _Reading) -> None:
    """Records the readers of this process produced == records the workers took back (units skipped on resume
    are read again and were counted by the run that processed them; ranges are read and reconciled by the worker,
    unit by unit), and processed == kept + dropped."""
    if reading.records != counts["list_records"]:
        raise RuntimeError(f"accounting error: the readers produced {reading.records} records, the workers "
                           f"accounted for {counts['list_records']}")
    dropped = sum(v for k, v in counts.items() if k.startswith("dropped:"))
    if counts["processed"] != counts["kept"] + dropped:
        raise RuntimeError(f"accounting error: {counts['processed']} records processed != kept {counts['kept']} + "
                           f"dropped {dropped}")


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


def _write_manifest(opts, shards: list[dict], counts: Counter, examples: dict, tokenizer_path, vocab, cfg,
                    files, backend: str, template) -> dict:
    dropped = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("dropped:")}
    read, kept = counts["processed"], counts["kept"]
    if kept == 0:
        raise EmptyOutput(f"no document kept: {read} read, dropped {dropped or 'none'}, {counts['empty_files']} empty "
                          f"file(s); check --text-key and the filters (conversations: --format, --messages-key, "
                          f"--max-tokens; the drops logged above show where)")
    man = {
        "format": manifest.FORMAT,
        "shards": shards,
        "tokenizer": {"path": os.path.abspath(tokenizer_path), "vocab_size": vocab, "eod_id": cfg.eod,
                      "sha256": file_sha256(tokenizer_path), "backend": backend},
        "options": {**opts.fingerprint([]), "filters": opts.filters.to_dict(), "tokenizer": None, "files": None},
        "inputs": files,
        "counts": {"documents_read": read, "documents_kept": kept, "tokens": counts["tokens"],
                   "dropped": dropped, "empty_files": counts["empty_files"],
                   **({"truncated": counts["truncated:truncated_too_long"],
                       "supervised_tokens": sum(s["loss_mask"]["supervised_tokens"] for s in shards)}
                      if template else {})},
        "data": data_section(opts.data_format, template),
        "drop_examples": {k: v for k, v in sorted(examples.items())},
        "rank": opts.rank,
        "world_size": opts.world_size,
    }
    manifest.write(opts.output, man, opts.rank, opts.world_size)
    return man


def data_section(data_format: str, template) -> dict:
    """The manifest's "data": what the documents are, and for conversations the chat template that rendered them
    (its text travels with the data to training, --sample-prompt and the Hugging Face export)."""
    if template is None:
        return {"format": data_format}
    return {"format": data_format, "loss_mask": True,
            "chat_template": {"name": template.name, "sha256": template.sha256, "source": template.source,
                              "end_of_turn": template.end_of_turn, "variables": template.variables}}
