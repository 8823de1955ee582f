"""An instruction set built from this Python's own sources, for launch/finetune.sh (no download): for every function
with a docstring, "write the docstring of this function" with its signature as the input and the first paragraph of
its docstring as the output. Files are split into train and held-out sets by a hash of their path, so no held-out
pair's file was seen in fine-tuning.

    python launch/docstring_pairs.py --output DIR [--max-pairs N]   ->  DIR/train.jsonl, DIR/valid.jsonl
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sysconfig

INSTRUCTION = "Write the docstring of this Python function."
MAX_ANSWER_CHARS = 240


def pairs_of(path: str):
    """(signature, first docstring paragraph) of every function in one file that has a docstring."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        answer = doc.split("\n\n")[0].strip()
        if not answer or len(answer) > MAX_ANSWER_CHARS:
            continue
        prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
        yield f"{prefix} {node.name}({ast.unparse(node.args)}):", answer


def held_out(path: str, share: int = 20) -> bool:
    """One file in `share` is held out (by a hash of its path relative to the stdlib: the same on every machine)."""
    return int(hashlib.sha256(path.encode()).hexdigest(), 16) % share == 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--max-pairs", type=int, default=20000, help="at most this many training pairs")
    a = p.parse_args()
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.join(d, n) for d, dirs, names in os.walk(stdlib) for n in names
                   if n.endswith(".py") and "site-packages" not in d and "/test" not in d[len(stdlib):])
    os.makedirs(a.output, exist_ok=True)
    counts = {"train": 0, "valid": 0}
    with open(os.path.join(a.output, "train.jsonl.tmp"), "w") as train, \
            open(os.path.join(a.output, "valid.jsonl.tmp"), "w") as valid:
        for path in files:
            split = "valid" if held_out(os.path.relpath(path, stdlib)) else "train"
            if split == "train" and counts["train"] >= a.max_pairs:
                continue
            for signature, answer in pairs_of(path):
                row = {"instruction": INSTRUCTION, "input": signature, "output": answer}
                (valid if split == "valid" else train).write(json.dumps(row) + "\n")
                counts[split] += 1
    for name in ("train", "valid"):
        os.replace(os.path.join(a.output, f"{name}.jsonl.tmp"), os.path.join(a.output, f"{name}.jsonl"))
    print(f"docstring pairs from {stdlib}: {counts['train']} train, {counts['valid']} held out -> {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
