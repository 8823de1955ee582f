"""Multi-rank launches for the tests without paying every rank's imports again: ranks are forked from a
multiprocessing forkserver that imported torch, DeepSpeed, megatron-core and the trainer once per test session.

Why: a 2-rank launch of the tiny model spent ~7 s of its ~8 s starting up (torchrun ~1.6 s, each rank's imports
~3.3 s on 2 busy cores, DeepSpeed's engine), and the suite launches ~150 times (docs/FINDINGS.md). The ranks are
still separate OS processes on gloo with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), each running the script as `python script.py args` would (__main__, its directory first
on sys.path), and a failed rank stops the others as torchrun's agent does. What torchrun itself does (rendezvous,
restarts, its signal handling) is not what these tests prove: the signal, Slurm and launcher tests keep the real
launchers (`deepspeed`, `srun`, `torchrun`).

Forking is safe here because the server imports modules only: no thread (checked at start), no process group, no
intra-op pool sized (OMP_NUM_THREADS is fixed before it starts).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the server imports once, in the order every entry point does (pretrain first: pretrain/__init__.py).
PRELOAD = ["pretrain", "pretrain.main", "deepspeed.runtime.zero.stage3", "deepspeed.runtime.pipe.engine",
           "zygote"]
_CTX = None


def context():
    """The forkserver context, started on first use (once per test session) and checked to hold the imports:
    Python 3.11's forkserver ignores an ImportError in its preload, and ignores the parent's sys.path, so the
    server starts with PYTHONPATH naming the repository and tests/."""
    global _CTX
    if _CTX is None:
        from multiprocessing import forkserver

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")] + ([saved] if saved else []))
        try:
            forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
        probe = ctx.Process(target=_preloaded)
        probe.start()
        probe.join()
        if probe.exitcode != 0:
            raise RuntimeError("tests/zygote.py: the forkserver did not import " + ", ".join(PRELOAD) + "; run "
                               "`python -c 'import pretrain.main'` from the repository to see why")
        _CTX = ctx
    return _CTX


def _preloaded() -> None:
    os._exit(0 if all(m in sys.modules for m in PRELOAD) else 1)


def _rank(script: str, args: list[str], env: dict, out: str, err: str, cwd: str) -> None:
    """In the forked rank: torchrun's environment, output to files, the script as __main__."""
    import runpy
    import traceback

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if threading.active_count() > 1:  # a thread in the server would be missing here, its locks perhaps held
        print(f"zygote: the server had threads {threading.enumerate()}", file=sys.stderr)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported as torchrun's failed rank would be
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(nproc: int, script: str, args: list[str], env: dict, cwd: str, port: int, timeout: float):
    """-> (returncode, stdout, stderr, timed_out) of the whole job: the first failing rank's code, outputs of every
    rank in rank order."""
    ctx = context()
    with tempfile.TemporaryDirectory(prefix="zygote-") as tmp:
        procs, files = [], []
        for r in range(nproc):
            rank_env = {**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                        "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}
            files.append((os.path.join(tmp, f"{r}.out"), os.path.join(tmp, f"{r}.err")))
            p = ctx.Process(target=_rank, args=(script, args, rank_env, *files[-1], cwd), daemon=False)
            p.start()
            procs.append(p)
        deadline, code, timed_out = time.time() + timeout, 0, False
        while any(p.is_alive() for p in procs):
            failed = [p for p in procs if p.exitcode not in (None, 0)]
            if failed or time.time() > deadline:
                timed_out, code = not failed, (failed[0].exitcode if failed else -9)
                _stop(procs)
                break
            time.sleep(0.05)
        for p in procs:
            p.join()
        if not code:
            code = next((p.exitcode for p in procs if p.exitcode), 0)
        outs = [(open(o).read(), open(e).read()) for o, e in files]
    return code, "".join(o for o, _ in outs), "".join(e for _, e in outs), timed_out


def _stop(procs, grace: float = 5.0) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    t0 = time.time()
    while any(p.is_alive() for p in procs) and time.time() - t0 < grace:
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            p.kill()
