"""Signals as clusters send them: the ranks decide what a stop signal means, their helper processes never do.

Slurm's scancel, preemption and time limit signal every process of the job step (SIGTERM, then SIGKILL after
KillWait); Ctrl-C sends SIGINT to the whole foreground process group; DeepSpeed's launch.py sends SIGTERM to each
rank's whole process tree; `--signal=USR1@N` warns before the time limit. The ranks finish the step they are in,
save a checkpoint tagged preemption and exit 3 (pretrain/main.py). Their helpers must not decide the run's fate:

- A DataLoader worker takes the default action for a SIGTERM that does not come from its parent (torch installs a
  C handler that exits quietly only when si_pid is the parent's), so it dies first and the rank fails at its next
  batch with "DataLoader worker (pid N) is killed by signal: Terminated" -- no checkpoint at all (measured:
  docs/FINDINGS.md, "Signals on a cluster"). SIGINT makes it leave its loop (KeyboardInterrupt), with the same
  result. `shield_worker` is the DataLoader's worker_init_fn: SIGTERM/SIGINT/SIGUSR1 are blocked and collected by
  a thread with sigwaitinfo, which sees who sent them: from the parent (torch's own shutdown of a worker that did
  not stop on its sentinel) the worker exits at once, exactly as torch's handler does; from anyone else the signal
  is dropped. A worker still ends when its rank ends: torch's sentinel on a normal shutdown, and its watchdog
  (the parent pid changes) when the rank dies.
- The W&B service (wandb-core, a Go binary) exits on any SIGTERM without flushing; Go's runtime cannot be told to
  ignore it from outside (an inherited SIG_IGN is kept for SIGHUP/SIGINT only), and wandb has no option for it
  (wandb issue 9963, open). pretrain/metrics.py makes up for it: the resumed session re-sends from metrics.jsonl
  what the killed session had not confirmed.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignal:
    """In a rank: SIGTERM (scancel, preemption, time limit, launchers), SIGINT (Ctrl-C) and SIGUSR1 (Slurm's
    --signal warning) -> the loop finishes the step it is in, saves and exits 3. A second SIGINT stops at once
    without saving (Ctrl-C twice: what a user at a terminal means by it)."""

    def __init__(self):
        self.received = None
        self.interrupts = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt("second Ctrl-C: stopping without saving")
        if self.received is None:
            self.received = signal.Signals(signum).name
            # os.write, not print: a handler that prints while the loop is printing raises "reentrant call"
            os.write(2, f"received {self.received}: finishing the current step, then saving a checkpoint and "
                        f"exiting (Ctrl-C again stops at once without saving)\n".encode())

    def agreed(self) -> str | None:
        """Every rank must stop at the same step: a signal seen by any rank stops all. -> None (go on), "warning"
        (SIGUSR1 only: the time limit is near, the job should requeue itself) or "stop" (SIGTERM/SIGINT anywhere:
        scancel, preemption, the time limit itself or Ctrl-C -- Slurm requeues a preempted job on its own, and a
        cancelled one must stay cancelled)."""
        level = {None: 0.0, "SIGUSR1": 1.0}.get(self.received, 2.0)
        flag = torch.tensor([level])
        if dist.is_initialized():
            from pretrain.compat import device

            flag = flag.to(device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return {0: None, 1: "warning", 2: "stop"}[int(flag.item())]


@contextlib.contextmanager
def stop_signals_blocked():
    """Around the creation of helper processes (a DataLoader iterator forks its workers): they are born with the
    stop signals blocked, so one that arrives before shield_worker runs waits for it instead of killing the worker.
    In this thread the signals are only delayed: they are delivered when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def shield_worker(_worker_id: int | None = None) -> None:
    """worker_init_fn of every DataLoader with workers: ignore stop signals unless the parent sends SIGTERM."""
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # threads started from here on inherit the mask

    def collect():
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)  # torch's handler_SIGTERM (torch/csrc/DataLoader.cpp) does the same

    threading.Thread(target=collect, name="stop-signal-shield", daemon=True).start()
