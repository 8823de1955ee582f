"""Files that appear whole or not at all: write to a temporary name, fsync, rename. A reader (or a rerun after a
kill) never sees half a manifest, tokenizer config, shard record or checkpoint pointer."""
from __future__ import annotations

import json
import os


def write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    """Sorted keys: the same object always gives the same bytes (outputs are compared byte for byte)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def save_npy(path: str, arr) -> None:
    import numpy as np

    tmp = path + ".tmp.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)
