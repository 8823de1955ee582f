"""What the benchmarks share: printing a result as JSON (and appending it to --json FILE, which the run_all
table and bench/results_*.jsonl read), and the environment of a one-process torch.distributed run."""
from __future__ import annotations

import json
import os


def single_rank_env(port: int) -> None:
    """RANK/WORLD_SIZE/... for init_distributed in a plain `python bench/x.py` (a launcher's values win)."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


def emit(result: dict, json_path: str | None, indent: int | None = None) -> int:
    print(json.dumps(result, indent=indent), flush=True)
    if json_path:
        with open(json_path, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0
