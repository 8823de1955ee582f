"""launch/op_builds.py: a DeepSpeed op build killed midway leaves a lock that hangs every later load of the op;
setup and training name it and stop instead of waiting forever."""
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT


def aged_lock(root, op="deepspeed_shm_comm", age_s=3600.0):
    lock = root / op / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def op_builds(tmp_path, *args):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "launch.op_builds", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_stale_lock_is_named_with_the_command_that_clears_it_and_a_live_one_is_not(tmp_path):
    assert op_builds(tmp_path).returncode == 0  # no locks
    live = aged_lock(tmp_path, "cpu_adam", age_s=30)  # a build in progress
    assert op_builds(tmp_path).returncode == 0
    stale = aged_lock(tmp_path)
    res = op_builds(tmp_path)
    assert res.returncode == 1
    assert "deepspeed_shm_comm (60 min old)" in res.stderr and f"rm {stale}" in res.stderr
    assert "cpu_adam" not in res.stderr
    listed = op_builds(tmp_path, "--max-age", "0")  # what setup.sh prints after a prebuild timed out
    assert listed.returncode == 1 and str(live) in listed.stderr and str(stale) in listed.stderr


def test_training_stops_on_a_stale_lock_before_deepspeed_loads_anything(tmp_path, monkeypatch, capsys):
    from pretrain import main

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = aged_lock(tmp_path)
    code = main.main(["--data-path", "nowhere", "--train-iters", "1"])
    err = capsys.readouterr().err
    assert code == 2 and f"rm {stale}" in err


@pytest.mark.slow
def test_the_hang_being_guarded_is_real(tmp_path):
    """The premise: with a killed build's lock in place, DeepSpeed's op load waits instead of building or failing.
    Without the lock, build.ninja is written within seconds (checked by hand: 12 s ran into the compile); with it,
    nothing but the lock is there. If torch ever times such locks out, this fails and the guard can go."""
    lock = aged_lock(tmp_path)
    load = "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder as B; B().load()"
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", load], env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)},
                       capture_output=True, timeout=12)
    assert list(lock.parent.iterdir()) == [lock]
