"""What every benchmark does with its result: print it as JSON, and append it to --json FILE when given (the
run_all table and bench/results_*.jsonl read those lines)."""
from __future__ import annotations

import json


def emit(result: dict, json_path: str | None, indent: int | None = None) -> int:
    print(json.dumps(result, indent=indent), flush=True)
    if json_path:
        with open(json_path, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0
