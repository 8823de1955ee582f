"""Multi-rank launches for the tests without paying every rank's imports again: ranks are forked from a
multiprocessing forkserver that imported torch, DeepSpeed, megatron-core and the trainer once per test session.

Why: a 2-rank launch of the tiny model spent ~7 s of its ~8 s starting up (torchrun ~1.6 s, each rank's imports
~3.3 s on 2 busy cores, DeepSpeed's engine), and the suite launches ~150 times (docs/FINDINGS.md). The ranks are
still separate OS processes on gloo with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), each running the script as `python script.py args` would (__main__, its directory first
on sys.path), and a failed rank stops the others as torchrun's agent does. What torchrun itself does (rendezvous,
restarts, its signal handling) is not what these tests prove: the signal, Slurm and launcher tests keep the real
launchers (`deepspeed`, `srun`, `torchrun`).

Forking is safe here because the server imports modules only: one thread (checked from /proc at start), no process
group, OMP_NUM_THREADS=1 while it starts. What forked ranks share that fresh ones would not: the hash seed (a bug
where ranks iterate a set of strings in different orders cannot show here), numpy's unseeded global RNG, and what
modules read from the environment at import (the server's, not launch(env=...)'s: DeepSpeed's accelerator choice,
pretrain/__init__.py's CUDA check). Import-time warnings go to the server's stderr, not the ranks'. Rank 0 hosts the
rendezvous store (torchrun's agent does). `TESTS_LAUNCHER=torchrun bash launch/test.sh` runs every launch through
torchrun instead, for what only fresh processes show.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import tempfile
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

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        # one OpenMP/BLAS thread in the server (numpy's OpenBLAS starts its pool at import otherwise), and the
        # repository on its path; both only for the server's start
        saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS")}
        os.environ.update(PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")] +
                                                     ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else [])),
                          OMP_NUM_THREADS="1")
        try:
            forkserver.ensure_running()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        probe = ctx.Process(target=_preloaded)
        probe.start()
        probe.join()
        if probe.exitcode != 0:
            raise RuntimeError(f"tests/zygote.py: the forkserver {PROBLEMS.get(probe.exitcode, probe.exitcode)}")
        _CTX = ctx
    return _CTX


PROBLEMS = {1: "did not import " + ", ".join(PRELOAD) + " (run `python -c 'import pretrain.main'` from the "
                                                        "repository to see why)",
            2: "runs more than one thread (forking it would copy only one, its locks perhaps held)"}


def _preloaded() -> None:
    """In a child: the server (our parent) holds the imports and runs one thread, native ones included (after a
    fork Python's threading module forgets the others, so it is asked of /proc)."""
    if not all(m in sys.modules for m in PRELOAD):
        os._exit(1)
    os._exit(0 if len(os.listdir(f"/proc/{os.getppid()}/task")) == 1 else 2)


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
    sys.stdout.reconfigure(line_buffering=True, write_through=True)
    sys.stderr.reconfigure(line_buffering=True, write_through=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    registered = _own_exit_hooks()
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
    try:
        _run_exit_hooks(registered)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _own_exit_hooks() -> list:
    """What a normal interpreter exit runs, for this rank only: the server registered exit hooks at import that
    must not run in every rank (wandb deletes its media and artifact temp directories, shared with the server and
    later ranks), so they are set aside, and what the script registers from here on is recorded."""
    import atexit
    import weakref

    for f in list(weakref.finalize._registry):  # the server's finalizers stay out of this rank's exit
        f.atexit = False
    registered, real = [], atexit.register

    def register(func, *args, **kwargs):
        registered.append((func, args, kwargs))
        return real(func, *args, **kwargs)

    atexit.register = register
    return registered


def _run_exit_hooks(registered: list) -> None:
    """The script's atexit hooks (last first) and finalizers, then what multiprocessing's own child exit does
    (daemonic children such as DataLoader workers terminated, the rest joined) and logging's flush."""
    import logging
    import multiprocessing.util
    import traceback
    import weakref

    for func, args, kwargs in reversed(registered):
        try:
            func(*args, **kwargs)
        except Exception:  # noqa: BLE001 - as the interpreter reports a failing exit hook and goes on
            traceback.print_exc()
    weakref.finalize._exitfunc()
    multiprocessing.util._exit_function()
    logging.shutdown()


def run(nproc: int, script: str, args: list[str], env: dict, cwd: str, port: int, timeout: float):
    """-> (returncode, stdout, stderr, timed_out) of the whole job: a failed rank's code (the lowest-numbered among
    those found failed at one 50-ms poll; a negative code is a signal), outputs of every rank in rank order. An
    interruption (pytest's timeout, Ctrl-C) stops every rank before it propagates."""
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
        try:
            while any(p.is_alive() for p in procs):
                failed = [p for p in procs if p.exitcode not in (None, 0)]
                if failed or time.time() > deadline:
                    timed_out, code = not failed, (failed[0].exitcode if failed else -9)
                    _stop(procs)
                    break
                time.sleep(0.05)
        except BaseException:
            _stop(procs)
            raise
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
