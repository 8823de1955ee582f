"""Find DeepSpeed op builds that died holding their lock, so that setup and training stop naming it, not hang.

DeepSpeed JIT-compiles C++ ops on first use (on CPU: CPU Adam for offload; the shared-memory all-reduce it would
load at every launch is switched off by pretrain/compat.py) through torch.utils.cpp_extension, which guards each
build directory with a `lock` file (torch's FileBaton: created with O_EXCL, removed when the build ends). A builder
that is killed (Ctrl-C, a job's time limit, OOM) leaves the file behind, and every later load of that op polls for
it to vanish, forever and without a word: launch/setup.sh's prebuild hung 17 minutes on one in CI, and a training
launch hangs the same way before its first step (docs/FINDINGS.md). torch offers no stale-lock check, so this one
looks at the lock's age: a build takes 30-90 s on 2 cores, and a lock older than STALE_AFTER_S has no live builder.

    python -m launch.op_builds            # exit 1 and say what to remove if a stale lock exists
    python -m launch.op_builds --max-age 0  # list every lock, stale or not (used after a prebuild timed out)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

STALE_AFTER_S = 1800


def extension_root() -> Path:
    """Where torch builds extensions: $TORCH_EXTENSIONS_DIR, or its default root (which holds one folder per Python
    and CUDA version, e.g. py311_cpu/)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def stale_locks(max_age_s: float = STALE_AFTER_S, root: Path | None = None) -> list[tuple[Path, float]]:
    """(lock file, age in seconds) for every build lock at least max_age_s old, oldest first."""
    root = root or extension_root()
    now, found = time.time(), []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # the build just ended
            continue
        if age >= max_age_s:
            found.append((lock, age))
    return sorted(found, key=lambda f: -f[1])


def describe(locks: list[tuple[Path, float]]) -> str:
    """The error for stale locks: which op, how old, and the command that clears them."""
    names = ", ".join(f"{lock.parent.name} ({age / 60:.0f} min old)" for lock, age in locks)
    paths = " ".join(str(lock) for lock, _ in locks)
    return (f"a DeepSpeed op build was killed and left its lock behind: {names}. Every load of that op waits on it "
            f"forever. If no build is running on this machine, remove it: rm {paths}")


class StaleLockError(Exception):
    pass


def check() -> None:
    """Raise StaleLockError (with the fix) when a killed build's lock would hang this process's op loads."""
    locks = stale_locks()
    if locks:
        raise StaleLockError(describe(locks))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-age", type=float, default=STALE_AFTER_S, help="seconds after which a lock counts as stale")
    locks = stale_locks(p.parse_args(argv).max_age)
    if locks:
        print(f"error: {describe(locks)}", file=sys.stderr)
    return 1 if locks else 0


if __name__ == "__main__":
    sys.exit(main())
