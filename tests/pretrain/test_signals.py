"""pretrain/signals.py: a DataLoader worker survives the stop signals a cluster or a terminal sends to every
process, and still ends when its rank ends it (torch's shutdown) -- without the shield the same signal kills it and
fails the rank, which is what the end-to-end tests in test_main.py would otherwise hit."""
import os
import signal
import subprocess
import time

import pytest
import torch

from pretrain.signals import shield_worker, stop_signals_blocked


class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 30

    def __getitem__(self, i):
        time.sleep(0.02)
        return i


def workers(shield: bool):
    """An iterator over a 2-worker DataLoader made as pretrain/data.py makes it (or without the shield)."""
    loader = torch.utils.data.DataLoader(Slow(), batch_size=1, num_workers=2,
                                         worker_init_fn=shield_worker if shield else None)
    if not shield:
        return iter(loader)
    with stop_signals_blocked():
        return iter(loader)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[1].split()[0] != "Z"


def signal_from_another_process(pids, sig):
    subprocess.run(["kill", f"-{sig.name[3:]}", *map(str, pids)], check=True)  # si_pid: kill's, not the parent's


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_shielded_worker_survives_a_stop_signal_from_outside(sig):
    it = workers(shield=True)
    pids = [w.pid for w in it._workers]
    signal_from_another_process(pids, sig)  # at once: a worker may not have reached its worker_init_fn yet
    got = [int(next(it))]
    time.sleep(0.3)
    assert all(alive(p) for p in pids)
    got += [int(x) for x in it]
    assert got == list(range(30))  # nothing lost, nothing failed
    deadline = time.time() + 10
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)  # torch's own shutdown still ends them


def test_a_shielded_worker_still_stops_when_its_parent_terminates_it():
    it = workers(shield=True)
    next(it)
    pid = it._workers[0].pid
    os.kill(pid, signal.SIGTERM)  # what torch's _shutdown_workers does to a worker that did not stop on its sentinel
    deadline = time.time() + 5
    while alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    del it


def test_without_the_shield_the_signal_kills_the_worker_and_fails_the_rank():
    it = workers(shield=False)
    next(it)
    signal_from_another_process([w.pid for w in it._workers], signal.SIGTERM)
    with pytest.raises(RuntimeError, match="killed by signal|exited unexpectedly"):
        list(it)
