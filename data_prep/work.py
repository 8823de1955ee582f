"""One work unit of prepare, as a worker process runs it: parse -> clean and filter -> hash -> tokenize -> pack.

A unit is a list of records in input order; the result is, per record, either a drop (reason, where) or a
candidate (exact hash, token count with EOD), plus one flat array of the candidates' token ids, each followed
by EOD, in the shard's dtype, and with --dedup near their MinHash signatures (data_prep/minhash.py). Everything
per token happens here (numpy on the tokenizer's flat buffers, no per-document Python lists), so the main
process only decides and writes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

import awkward  # noqa: F401 - gigatoken returns awkward arrays; imported here so the forkserver preloads it (0.4 s)
import numpy as np
import xxhash

from data_prep import readers, tokenizer as tok
from data_prep.clean import FilterConfig, clean, parse_json_line
from data_prep import chat, minhash

STRICT_REASONS = ("bad_json", "bad_text_field", "bad_utf8")
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


class TokenizerMismatch(RuntimeError):
    """gigatoken and HF tokenizers disagreed on a document."""


@dataclass
class WorkConfig:
    tokenizer: str
    eod: int
    dtype: str  # of the shards: uint16 or int32
    backend: str = "auto"
    text_key: str = "text"
    filters: FilterConfig = None
    dedup: bool = True  # compute exact-dedup hashes
    near: bool = False
    num_perm: int = 128
    strict: bool = False
    verify_every: int = 256  # check gigatoken against tokenizers on unit 0 and every n-th unit after (0: never)
    format: str = "text"  # text | chat | instruction (data_prep/chat.py)
    messages_key: str = "messages"
    chat_template: str | None = None  # a built-in name or a .jinja path; None: the tokenizer's own
    max_tokens: int | None = None  # chat/instruction: longest conversation kept, its end-of-document id included
    too_long: str = "drop"  # drop | truncate


_W: dict = {}


def init(cfg: WorkConfig) -> None:
    """Load what every unit needs once per worker process."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # our processes are the parallelism
    _W.update(cfg=cfg, encoder=tok.Encoder(cfg.tokenizer, cfg.backend), baseline_mb=None)
    if cfg.format != "text":
        _W["template"] = chat.load_template(os.path.dirname(cfg.tokenizer), cfg.chat_template)


CACHE_MB = 1024  # a worker's growth past its first units before its tokenizer (and its cache) is rebuilt


def _bound_memory() -> None:
    """Keep a worker's memory flat as the input grows. glibc keeps freed memory from unit to unit (a worker grew
    from 117 to 227 MiB over 1 GB of text; returning it after each unit held it at 161 MiB), and gigatoken 0.10.0
    caches every distinct pre-token it has seen, without bound (~80 bytes each: +325 MiB after 4M new words; the
    "cachefix" fork bounds nothing more in that test). Past CACHE_MB of growth the encoder is rebuilt (0.1 s)."""
    _LIBC.malloc_trim(0)
    with open("/proc/self/statm") as f:
        rss_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
    if _W["baseline_mb"] is None:
        _W["baseline_mb"] = rss_mb
    elif rss_mb > _W["baseline_mb"] + CACHE_MB:
        cfg = _W["cfg"]
        _W["encoder"] = tok.Encoder(cfg.tokenizer, cfg.backend)


def backend() -> str:
    return _W["encoder"].backend


VERIFY_BYTES = 1 << 16  # text checked against tokenizers per verified unit (HF encodes ~30x slower)


def _sample(n_texts: list[int]) -> list[int]:
    """Indices of the unit's first documents up to VERIFY_BYTES characters in all, skipping any larger than that
    alone (tokenizers needs ~130x a document's size to encode it: one huge document would cost gigabytes)."""
    out, size = [], 0
    for i, n in enumerate(n_texts):
        if n > VERIFY_BYTES:
            continue
        if size + n > VERIFY_BYTES:
            break
        out.append(i)
        size += n
    return out


def read_range(path: str, start: int, end: int, first_line: int):
    """The JSON lines in bytes [start, end) of a plain file (a unit cut at line boundaries by the main process,
    which never reads them itself), as records."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    if start == 0 and data.startswith(readers.BOM):
        data = data[len(readers.BOM):]
    for i, line in enumerate(data.split(b"\n")):
        if line.strip():
            yield path, first_line + i, line, None, None


def process(job: tuple) -> tuple:
    """job = (unit index, records) with records either [(source, line, raw, text, drop), ...] or
    ("range", path, start, end, first line) -> (kind, records seen, outcomes, packed ids, probe: a sample of the
    texts and their gigatoken ids on every --verify-every-th unit, else None, MinHash signatures of the
    candidates with --dedup near, else None). An outcome is (reason, "file:line") for a drop, or (None, exact
    hash, token count with EOD) for a candidate."""
    index, records = job
    kind = "range" if records and records[0] == "range" else "list"
    if kind == "range":
        records = list(read_range(*records[1:]))
    cfg: WorkConfig = _W["cfg"]
    if cfg.format != "text":
        return _process_conversations(kind, records, cfg)
    outcomes, texts, where = [], [], []
    for source, line, raw, text, drop in records:
        reason = drop
        if reason is None:
            if raw is not None:
                text, reason = parse_json_line(raw, cfg.text_key)
            if reason is None:
                text, reason = clean(text, cfg.filters)
        if reason is not None:
            if cfg.strict and reason in STRICT_REASONS:
                raise readers.InputError(f"{source}:{line}: {reason.replace('_', ' ')} (--strict)")
            outcomes.append((reason, f"{source}:{line}"))
            continue
        h = xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass")) if cfg.dedup else 0
        outcomes.append((None, h))
        texts.append(text)
        where.append(f"{source}:{line}")
    flat, lengths = _W["encoder"].encode(texts)
    probe = None
    if cfg.verify_every and index % cfg.verify_every == 0 and _W["encoder"].giga is not None:
        probe = _probe(texts, where, flat, lengths)
    sigs = minhash.signatures(flat, lengths, cfg.num_perm) if cfg.near else None
    packed = np.insert(flat.astype(cfg.dtype, copy=False), np.cumsum(lengths), cfg.eod)
    _bound_memory()
    counts = iter((lengths + 1).tolist())
    outcomes = [o if o[0] is not None else (*o, next(counts)) for o in outcomes]
    return kind, len(records), outcomes, packed, probe, sigs, None, []


def _conversation(raw: bytes | None, cfg: WorkConfig) -> list[dict]:
    """One row -> its validated messages (chat: the --messages-key list; instruction: {instruction, input?,
    output} as a user and an assistant turn); BadConversation names what is wrong."""
    import orjson

    if raw is None:  # plain text (a .txt file) holds no conversation
        raise chat.BadConversation("not_a_conversation", "a text document, not a JSON row")
    try:
        row = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise chat.BadConversation("bad_json", "not valid JSON") from None
    if not isinstance(row, dict):
        raise chat.BadConversation("bad_json", f"a JSON {type(row).__name__}, not an object")
    if cfg.format == "instruction":
        return chat.validate(chat.instruction_messages(row))
    if cfg.messages_key not in row:
        raise chat.BadConversation("empty", f"no {cfg.messages_key!r} field (--messages-key)")
    return chat.validate(row[cfg.messages_key])


def _process_conversations(kind: str, records: list, cfg: WorkConfig) -> tuple:
    """process() for --format chat|instruction: each row rendered with the chat template and tokenized with its
    loss mask (data_prep/chat.py; HF tokenizers, for the character offsets the mask needs), hashed on the rendered
    text. Returns process()'s tuple plus the packed loss mask (aligned with the packed ids, 0 on each EOD) and the
    places of truncated conversations (--too-long truncate)."""
    hf, template = _W["encoder"].hf, _W["template"]
    outcomes, ids_list, masks, truncated = [], [], [], []
    for source, line, raw, _, drop in records:
        where = f"{source}:{line}"
        if drop is None:
            try:
                try:
                    text, ids, mask = chat.render_and_encode(_conversation(raw, cfg), template, hf)
                except chat.BadConversation:
                    raise
                except ValueError as e:  # the template cannot locate this row's answers: the run's problem
                    raise ValueError(f"{where}: {e}") from None
                if cfg.max_tokens:
                    ids, mask, cut = chat.fit_length(ids, mask, cfg.max_tokens, cfg.too_long)
                    if cut:
                        truncated.append(where)
            except chat.BadConversation as e:
                if cfg.strict and e.reason != "too_long":  # too long is an option's choice, not bad input
                    raise readers.InputError(f"{where}: {e} (--strict)") from None
                drop = e.reason
        if drop is not None:
            if cfg.strict and drop in STRICT_REASONS:
                raise readers.InputError(f"{where}: {drop.replace('_', ' ')} (--strict)")
            outcomes.append((drop, where))
            continue
        h = xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass")) if cfg.dedup else 0
        outcomes.append((None, h, len(ids) + 1))
        ids_list.append(ids + [cfg.eod])
        masks.append(mask + [0])
    packed = np.fromiter((i for ids in ids_list for i in ids), dtype=cfg.dtype)
    loss_mask = np.fromiter((m for mask in masks for m in mask), dtype=np.uint8, count=len(packed))
    sigs = None
    if cfg.near:
        lengths = np.array([len(ids) - 1 for ids in ids_list], dtype=np.int64)
        flat = np.fromiter((i for ids in ids_list for i in ids[:-1]), dtype=np.uint32)
        sigs = minhash.signatures(flat, lengths, cfg.num_perm)
    _bound_memory()
    return kind, len(records), outcomes, packed, None, sigs, loss_mask, truncated


def _probe(texts: list[str], where: list[str], flat: np.ndarray, lengths: np.ndarray):
    """A sample of the unit's texts with their gigatoken ids, for the main process to check against tokenizers
    (which it has loaded); None when the unit has no document small enough."""
    picked = _sample([len(t) for t in texts])
    if not picked:
        return None
    starts = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.concatenate([flat[starts[i]:starts[i + 1]] for i in picked])
    return [texts[i] for i in picked], [where[i] for i in picked], ids, lengths[picked].copy()


def check_probe(hf, probe) -> None:
    """The main process's check of a unit's sample: tokenizers must give gigatoken's ids for every document."""
    texts, where, flat, lengths = probe
    diff = tok.first_difference(flat, lengths, hf.encode_batch_fast(texts, add_special_tokens=False))
    if diff is not None:
        raise TokenizerMismatch(f"{where[diff[0]]}: gigatoken and tokenizers disagree on this document ({diff[1]}); "
                                f"rerun with --tokenizer-backend tokenizers into a new --output directory")
