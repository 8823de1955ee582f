"""python -m data_prep {train-tokenizer, prepare, merge}"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from data_prep.clean import FilterConfig


def _rank_from_environment() -> tuple[int, int]:
    """Rank and world size from a Slurm job array or an MPI launch; (0, 1) otherwise."""
    if "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    if any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")):
        from mpi4py import MPI

        return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    return 0, 1


def _add_reader_args(p):
    p.add_argument("--input", nargs="+", required=True, help="files, directories and globs")
    p.add_argument("--text-key", default="text", help="JSON field / column holding the text (default: text)")
    p.add_argument("--txt-mode", choices=["file", "block"], default="file",
                   help=".txt: one document per file, or per blank-line-separated block")
    p.add_argument("--text-suffix", nargs="+", default=[], metavar="SUFFIX",
                   help="also read files with these extensions as plain text (e.g. .py .md)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN",
                   help="leave out paths matching these globs (e.g. '*/site-packages/*')")
    p.add_argument("--include", nargs="+", default=[], metavar="PATTERN",
                   help="keep only paths matching these globs (e.g. '*.py')")
    p.add_argument("--strict", action="store_true", help="bad input is an error instead of a counted skip")


def _add_normalize_args(p):
    p.add_argument("--no-normalize", action="store_true", help="skip NFC / control-char / whitespace cleaning")
    p.add_argument("--keep-indent", action="store_true",
                   help="normalise whitespace inside lines but keep each line's indentation (source code)")


def _add_filter_args(p):
    d = FilterConfig()
    _add_normalize_args(p)
    p.add_argument("--min-chars", type=int, default=d.min_chars)
    p.add_argument("--max-chars", type=int, default=d.max_chars, help="longer documents are dropped (too_long)")
    p.add_argument("--gopher", action="store_true", help="turn on the Gopher quality heuristics (below)")
    p.add_argument("--min-words", type=int)
    p.add_argument("--min-alpha-word-fraction", type=float)
    p.add_argument("--min-mean-word-length", type=float)
    p.add_argument("--max-mean-word-length", type=float)
    p.add_argument("--max-symbol-ratio", type=float)
    p.add_argument("--max-duplicate-line-fraction", type=float)


def _filters(a) -> FilterConfig:
    cfg = FilterConfig.gopher() if a.gopher else FilterConfig()
    cfg.normalize, cfg.keep_indent = not a.no_normalize, a.keep_indent
    cfg.min_chars, cfg.max_chars = a.min_chars, a.max_chars
    for name in ("min_words", "min_alpha_word_fraction", "min_mean_word_length", "max_mean_word_length",
                 "max_symbol_ratio", "max_duplicate_line_fraction"):
        if getattr(a, name) is not None:
            setattr(cfg, name, getattr(a, name))
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer -> DIR/tokenizer.json")
    _add_reader_args(t)
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--output", required=True, help="directory")
    t.add_argument("--max-docs", type=int, help="train on at most this many documents")
    t.add_argument("--chat-template", choices=["chatml", "llama3"],
                   help="add this chat template's special tokens and write it into tokenizer_config.json, for "
                        "fine-tuning on conversations (data_prep/chat.py)")
    _add_normalize_args(t)  # train on the text `prepare` will tokenize: give both the same normalisation

    p = sub.add_parser("prepare", help="clean, dedup, tokenize and pack into .bin/.idx shards")
    _add_reader_args(p)
    _add_filter_args(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, or a directory with one")
    p.add_argument("--output", required=True, help="directory for shards and manifest.json")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: one per "
                                                                            "core)")
    p.add_argument("--tokenizer-backend", choices=["auto", "gigatoken", "tokenizers"], default="auto",
                   help="auto: gigatoken when it loads the tokenizer (same ids as tokenizers, checked; ~24x faster)")
    p.add_argument("--verify-every", type=int, default=256, metavar="N",
                   help="encode every N-th work unit with both backends and stop at any difference (0: never)")
    p.add_argument("--shard-size", type=int, default=256 * 2**20,
                   help="tokens per shard (closed at the next chunk boundary past it)")
    p.add_argument("--chunk-docs", type=int, default=4096,
                   help="documents per work unit; shards close (and resume restarts) at unit boundaries")
    p.add_argument("--chunk-mb", type=float, default=1.0,
                   help="a work unit also closes past this many MB of input (keeps workers evenly loaded)")
    p.add_argument("--dedup", choices=["none", "exact", "near"], default="exact",
                   help="exact: hash of the normalised text (default); near: also MinHash-LSH clusters, across all "
                        "ranks after `merge`")
    p.add_argument("--near-threshold", type=float, default=0.8, help="Jaccard similarity for near duplicates")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash buckets (a power of two)")
    p.add_argument("--near-bands", type=int, help="LSH bands (default: chosen for 0.99 recall at the threshold)")
    p.add_argument("--near-rows", type=int, help="LSH rows per band")
    p.add_argument("--rank", type=int, help="this rank's share of the inputs (default: Slurm array / MPI / 0)")
    p.add_argument("--world-size", type=int)
    p.add_argument("--progress", choices=["auto", "bar", "log"], default="auto")
    c = p.add_argument_group("conversations (fine-tuning data, data_prep/chat.py)")
    c.add_argument("--format", choices=["text", "chat", "instruction"], default="text",
                   help="text: --text-key documents (pretraining); chat: rows of --messages-key [{role, content}]; "
                        "instruction: {instruction, input?, output} rows. chat/instruction write a loss mask (1 on "
                        "answers and their end-of-turn) beside the tokens, for --objective sft")
    c.add_argument("--messages-key", default="messages", help="chat: the field holding the messages")
    c.add_argument("--chat-template", metavar="chatml|llama3|PATH.jinja",
                   help="render with this template (default: the tokenizer's own chat_template)")
    c.add_argument("--max-tokens", type=int, metavar="N",
                   help="conversations longer than N tokens (end-of-document included) are --too-long's; set it to "
                        "the fine-tune's --seq-length + 1 (longer ones cannot be packed whole)")
    c.add_argument("--too-long", choices=["drop", "truncate"], default="drop",
                   help="drop them, or cut their end (keeping the prompt); counted either way")

    m = sub.add_parser("merge", help="combine per-rank manifests (global exact dedup); optionally one prefix")
    m.add_argument("--output", required=True, help="the directory the ranks wrote")
    m.add_argument("--into", help="also pack every shard into this one prefix (e.g. 'merged')")
    return parser


EXIT_BAD_INPUT, EXIT_NO_SPACE = 2, 5


def main(argv=None) -> int:
    """Exit codes: 0 done; 2 bad arguments or input (the message names the file and line); 5 the disk is full
    (the message names where; what was being written is removed, committed shards are kept: rerun to resume)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s data_prep %(levelname)s %(message)s")
    a = build_parser().parse_args(argv)
    from common.files import NoSpaceError, is_no_space
    from data_prep import readers
    from data_prep.work import TokenizerMismatch

    try:
        if a.command == "train-tokenizer":
            return _train_tokenizer(a)
        if a.command == "prepare":
            return _prepare(a)
        from data_prep.merge import merge

        man = merge(a.output, a.into)
        print(f"merged {len(man['merged_ranks'])} ranks: {man['counts']['documents_kept']} documents, "
              f"{man['counts']['tokens']} tokens -> {os.path.join(a.output, 'manifest.json')}")
        return 0
    except (readers.InputError, FileNotFoundError, ValueError, TokenizerMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        if not is_no_space(e):
            raise
        where = e.path if isinstance(e, NoSpaceError) else (e.filename or getattr(a, "output", "?"))
        print(f"error: no space left on the filesystem of {where}; free space and rerun the same command (committed "
              f"shards are kept, the unfinished one was removed)", file=sys.stderr)
        return EXIT_NO_SPACE


def _train_tokenizer(a) -> int:
    import itertools

    from data_prep import tokenizer
    from data_prep.clean import clean, parse_json_line
    from data_prep.readers import expand_inputs, read_file

    cfg = FilterConfig(normalize=not a.no_normalize, keep_indent=a.keep_indent)

    def texts():
        for path in expand_inputs(a.input, tuple(a.text_suffix), tuple(a.exclude), tuple(a.include)):
            for rec in read_file(path, a.text_key, a.txt_mode, a.strict):
                text = rec.text
                if rec.raw is not None:
                    text, _ = parse_json_line(rec.raw, a.text_key)
                if text:
                    text, _ = clean(text, cfg)
                    if text:
                        yield text

    stream = itertools.islice(texts(), a.max_docs) if a.max_docs else texts()
    path = tokenizer.train_bpe(stream, a.vocab_size, a.output, chat_template=a.chat_template)
    print(f"tokenizer -> {path}")
    return 0


def _prepare(a) -> int:
    from data_prep.pipeline import PrepareOptions, prepare

    rank, world = _rank_from_environment()
    rank = a.rank if a.rank is not None else rank
    world = a.world_size if a.world_size is not None else world
    if not 0 <= rank < world:
        raise ValueError(f"--rank {rank} is outside --world-size {world}")
    opts = PrepareOptions(inputs=a.input, tokenizer=a.tokenizer, output=a.output, workers=a.workers,
                          text_key=a.text_key, txt_mode=a.txt_mode,
                          text_suffixes=tuple(a.text_suffix), exclude=tuple(a.exclude),
                          include=tuple(a.include), shard_tokens=a.shard_size,
                          tokenizer_backend=a.tokenizer_backend, verify_every=a.verify_every,
                          filters=_filters(a), dedup=a.dedup, near_threshold=a.near_threshold,
                          num_perm=a.num_perm, near_bands=a.near_bands, near_rows=a.near_rows, strict=a.strict,
                          chunk_docs=a.chunk_docs,
                          chunk_bytes=int(a.chunk_mb * 2**20), rank=rank, world_size=world,
                          progress={"auto": None, "bar": True, "log": False}[a.progress], data_format=a.format,
                          messages_key=a.messages_key, chat_template=a.chat_template, max_tokens=a.max_tokens,
                          too_long=a.too_long)
    man = prepare(opts)
    c = man["counts"]
    dropped = ", ".join(f"{k}={v}" for k, v in c["dropped"].items()) or "none"
    what = "documents" if a.format == "text" else "conversations"
    extra = "" if a.format == "text" else (f"; {c['supervised_tokens']} supervised (answer) tokens; truncated: "
                                            f"{c['truncated']}")
    print(f"read {c['documents_read']} {what}, kept {c['documents_kept']} ({c['tokens']} tokens) in "
          f"{len(man['shards'])} shard(s); dropped: {dropped}; empty files: {c['empty_files']}{extra}")
    return 0
