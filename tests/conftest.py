import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORKERS = ROOT / "tests" / "workers"


def launch(nproc: int, script, *args, timeout: int = 300, env: dict | None = None, check: bool = True):
    """Run a script on `nproc` local CPU ranks with torchrun (gloo), returning the completed process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="session")
def train_layout(tmp_path_factory):
    """train_layout(nproc, **flags) -> {"losses": [...], "grad_norms": [...], ...}, cached per layout."""
    cache = {}
    out_dir = tmp_path_factory.mktemp("layouts")

    def run(nproc: int, **flags):
        key = (nproc, tuple(sorted(flags.items())))
        if key not in cache:
            out = out_dir / f"run{len(cache)}.json"
            args = []
            for k, v in sorted(flags.items()):
                flag = "--" + k.replace("_", "-")
                if v is True:
                    args.append(flag)
                elif v is not False:
                    args += [flag, v]
            launch(nproc, WORKERS / "train_layout.py", *args, "--out", out)
            cache[key] = json.loads(out.read_text())
        return cache[key]

    return run
