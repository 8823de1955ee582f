"""Benchmark corpora built from what every machine of ours has, no download.

`prose_jsonl(path, megabytes)`: English prose (and some code and tables) from the system's documentation:
/usr/share/doc (READMEs, changelogs, copyright files, gzip-compressed or not) and /usr/share/man pages with their
troff markup stripped, cut into documents of roughly 1-8 KB at paragraph breaks (none over ~72 KB), in a fixed
order, as JSON lines
{"text": ...}. Past the end of the material it starts over, each document marked with its pass number, so a
large file holds no exact duplicates (nor does one pass: repeated texts are skipped). The same machine image
gives the same bytes.

`python bench/corpus.py OUT.jsonl --mb 70` writes one.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re

SOURCES = ("/usr/share/doc", "/usr/share/man")
_TROFF = re.compile(r"^\.[A-Za-z]+ ?|\\f[BIRP]|\\-|\\\(..|\\&|\\e", re.MULTILINE)


def _files() -> list[str]:
    out = []
    for root in SOURCES:
        for d, dirs, names in os.walk(root):
            dirs.sort()
            out += [os.path.join(d, n) for n in sorted(names) if not os.path.islink(os.path.join(d, n))]
    return out


def _text(path: str) -> str | None:
    try:
        raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None
    if "\x00" in text:
        return None  # binary
    return _TROFF.sub("", text) if "/man/" in path else text


def documents():
    """Documents of roughly 1-8 KB, cut at blank lines, in a fixed order; each distinct text once (the same
    licence is installed with hundreds of packages)."""
    seen = set()
    for doc in _all_documents():
        h = hash(doc)
        if h not in seen:
            seen.add(h)
            yield doc


def _all_documents():
    for path in _files():
        text = _text(path)
        if not text:
            continue
        doc = []
        size = 0
        for para in _pieces(text):
            doc.append(para)
            size += len(para)
            if size >= 1024 and (size >= 8192 or len(doc) >= 6):
                yield "\n\n".join(doc)
                doc, size = [], 0
        if doc and size >= 200:
            yield "\n\n".join(doc)


MAX_DOC = 1 << 16


def _pieces(text: str):
    """Paragraphs, and paragraphs longer than MAX_DOC characters (a PostScript file, a data dump) cut at line
    ends, so that no document is much larger than 64 KB: memory then measures the input's size, not its
    largest file."""
    for para in re.split(r"\n\s*\n", text):
        while len(para) > MAX_DOC:
            cut = para.rfind("\n", 0, MAX_DOC)
            cut = cut if cut > 0 else MAX_DOC
            yield para[:cut]
            para = para[cut:].lstrip("\n")
        if para:
            yield para


def prose_jsonl(path: str, megabytes: float) -> dict:
    target = int(megabytes * 2**20)
    written = docs = passes = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            passes += 1
            before = written
            for doc in documents():
                text = doc if passes == 1 else f"[pass {passes}] {doc}"
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                docs += 1
                if written >= target:
                    break
            if written == before:
                raise RuntimeError(f"no readable documentation under {SOURCES} to build a corpus from")
    return {"path": path, "bytes": written, "documents": docs, "passes": passes}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--mb", type=float, default=70)
    a = ap.parse_args()
    print(prose_jsonl(a.out, a.mb))
