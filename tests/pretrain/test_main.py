"""pretrain/main.py end to end on 1-2 CPU ranks: every ds_config, metrics, eval, non-finite steps, exact resume,
preemption signals, a killed rank."""
import contextlib
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import wandb_files

from conftest import MAIN, ROOT, common, free_port, launch, metrics, spawn_ranks, train_losses, wait_for_step

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------- configs, metrics
@pytest.fixture(scope="module")
def zero3_run(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    proc = launch(2, MAIN, "--deepspeed_config", "ds_configs/zero3.json", "--train-iters", "8", "--peak-tflops", "1.0",
                  "--save", tmp / "ckpt", "--save-interval", "4", "--plot", "--sample-prompt", "the model",
                  "--sample-tokens", "5", "--loss-chunks", "4", *common(tiny_data, tmp))
    return tmp, proc.stdout


@pytest.mark.parametrize("config, extra", [("zero2.json", []), ("zero3_offload.json", []),
                                           ("zero1_pp.json", ["--pp", "2", "--loss-chunks", "auto"]),
                                           ("zero3.json", ["--cp", "2", "--document-mask"])])
def test_short_run_per_ds_config(tiny_data, tmp_path, config, extra):
    proc = launch(2, MAIN, "--deepspeed_config", f"ds_configs/{config}", "--train-iters", "4", "--save",
                  tmp_path / "ck", *extra, *common(tiny_data, tmp_path))
    if "auto" in extra:
        assert "--loss-chunks auto: " in proc.stdout
    if "--cp" in extra:  # ZeRO-3 over DP 1 x CP 2
        assert "PP=1 CP=2 DP=1" in proc.stdout and "partitioned over DP=1 x CP=2" in proc.stdout
    losses = train_losses(metrics(tmp_path))
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    assert (tmp_path / "ck" / "latest").read_text() == "iter_0000004"


def test_zero3_run_learns_and_prints_the_summary(zero3_run):
    tmp, out = zero3_run
    losses = train_losses(metrics(tmp))
    assert losses[8] < losses[1]
    for line in ("start loss:", "end loss:", "validation perplexity:", "checkpoint:", "plot:", "sample: 'the model'"):
        assert line in out, out[-2000:]
    assert (tmp / "logs" / "loss.png").stat().st_size > 1000


def test_metrics_jsonl_schema_and_values(zero3_run):
    tmp, _ = zero3_run
    rows = metrics(tmp)
    train = [r for r in rows if "lr" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    for r in train:
        for key in ("step", "consumed_samples", "tokens", "loss", "lr", "grad_norm", "tokens_per_sec",
                    "tflops_per_gpu", "mfu", "step_time", "mem_gb"):
            assert key in r, key
        assert r["consumed_samples"] == 4 * r["step"] and r["tokens"] == 32 * r["consumed_samples"]
        assert r["tokens_per_sec"] > 0 and r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 1.0)
        assert math.isfinite(r["grad_norm"]) and r["mem_gb"] > 0
    assert train[0]["lr"] == pytest.approx(1e-3) and train[1]["lr"] == pytest.approx(2e-3)  # warmup 2
    assert train[-1]["lr"] == pytest.approx(3e-5)  # cosine down to --min-lr's default
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in evals)
    assert any("test_loss" in r for r in rows)
    assert list((tmp / "logs" / "tensorboard").glob("events.out.tfevents.*"))


# --------------------------------------------------------------------------------------- non-finite steps
@pytest.mark.parametrize("inject, extra", [("PRETRAIN_INJECT_NAN_AT", []),
                                           ("PRETRAIN_INJECT_NAN_GRAD_AT", ["--pp", "2"])])
def test_non_finite_step_is_skipped_and_does_not_move_the_model(tiny_data, tmp_path, inject, extra):
    """A NaN loss under ZeRO-3, and a finite loss with NaN gradients under pipeline parallelism."""
    config = "zero1_pp.json" if extra else "zero3.json"
    out = launch(2, MAIN, "--deepspeed_config", f"ds_configs/{config}", "--fp32", "--train-iters", "5", *extra,
                 *common(tiny_data, tmp_path), "--eval-interval", "1", env={inject: "3"}).stdout
    assert f"WARNING: test hooks are active ({inject}=3)" in out
    rows = metrics(tmp_path)
    assert any(r.get("skipped") and r["step"] == 3 for r in rows)
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert val[3] == val[2]  # the skipped step changed no weight
    assert val[4] != val[3]  # and training goes on
    assert all(math.isfinite(v) for s, v in train_losses(rows).items() if s != 3)


def test_too_many_non_finite_steps_stop_with_a_checkpoint(tiny_data, tmp_path):
    procs = spawn_ranks(2, ["--deepspeed_config", "ds_configs/zero3.json", "--train-iters", "20", "--save",
                            tmp_path / "ck", "--max-skipped-steps", "3", *common(tiny_data, tmp_path)],
                        env={"PRETRAIN_INJECT_NAN_AT": "3,4,5"})
    codes = [p.wait(timeout=300) for p in procs]
    out = procs[0].stdout.read()
    assert codes == [4, 4], out[-3000:]
    assert "3 consecutive skipped steps, non-finite or loss spikes" in out
    assert (tmp_path / "ck" / "latest").read_text() == "iter_0000005"
    # "the last good state": the weights saved at 5 are those of step 2, the last step that was applied
    from pretrain.checkpoint import CheckpointReader

    saved = CheckpointReader(str(tmp_path / "ck" / "iter_0000005"))
    assert saved.meta["adam_step"] == 2
    assert all(torch.isfinite(saved.full(name)).all() for name in saved.names())


# --------------------------------------------------------------------------------------- resume, signals
def test_sigkill_then_rerun_resumes_bit_identically(tiny_data, tmp_path):
    args = ["--deepspeed_config", "ds_configs/zero3.json", "--fp32", "--train-iters", "10", "--save-interval", "4"]
    ref = tmp_path / "ref"
    launch(2, MAIN, *args, "--save", ref / "ck", *common(tiny_data, ref))
    run = tmp_path / "run"
    procs = spawn_ranks(2, [*args, "--save", run / "ck", *common(tiny_data, run)])
    wait_for_step(run, 6, procs)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert (run / "ck" / "latest").read_text() == "iter_0000004"
    out = launch(2, MAIN, *args, "--save", run / "ck", *common(tiny_data, run)).stdout
    assert "resumed from" in out and "at iteration 4" in out
    want, got = train_losses(metrics(ref)), train_losses(metrics(run))
    assert [got[s] for s in range(5, 11)] == [want[s] for s in range(5, 11)]  # bit-identical


# Signals as a cluster or a terminal sends them: to every process (pretrain/signals.py), through DeepSpeed's own
# launcher, with DataLoader workers and the W&B service running. Each run is compared step for step with one
# uninterrupted run of the same flags (fp32: bit-identical).
SIGNAL_ITERS = 14


def signal_args(tmp, extra=()):
    return ["--deepspeed_config", "ds_configs/zero3.json", "--fp32", "--train-iters", SIGNAL_ITERS, "--save",
            tmp / "ck", "--save-interval", "1000", *common(DATA[0], tmp), "--num-workers", "2", *extra]


DATA = []  # tiny_data, set by the module fixture below (signal_args is called with plain paths)


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    DATA[:] = [tiny_data]
    tmp = tmp_path_factory.mktemp("uninterrupted")
    launch(2, MAIN, *signal_args(tmp))
    return train_losses(metrics(tmp))


def deepspeed_launch(args, env=None) -> subprocess.Popen:
    """`deepspeed --num_gpus 2 pretrain/main.py ...` as a user starts it, in a session of its own (a terminal's
    foreground process group)."""
    return subprocess.Popen([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                             str(free_port()), str(MAIN), *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})})


def stop_with(launcher: subprocess.Popen, how: str) -> str:
    """Send the signal as `how` says once step 3 is logged; -> everything the job printed, after every process
    (ranks, DataLoader workers, W&B service) is gone."""
    everyone = [psutil.Process(launcher.pid)] + psutil.Process(launcher.pid).children(recursive=True)
    if how == "SIGINT to the process group":  # Ctrl-C (the W&B service has a session of its own: wandb starts it so)
        os.killpg(launcher.pid, signal.SIGINT)
    else:  # scancel, preemption, a time limit: slurmstepd signals every process of the step
        for p in everyone:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(everyone, timeout=120)
    assert not alive, f"still running 120 s after {how}: {alive}"
    return launcher.communicate(timeout=30)[0]


@pytest.mark.parametrize("how", ["SIGTERM to every process", "SIGINT to the process group"])
def test_a_signal_to_every_process_saves_and_the_rerun_equals_an_uninterrupted_run(uninterrupted, tmp_path, how):
    wandb = how.startswith("SIGTERM")  # the W&B service gets the SIGTERM too (it dies of it: wandb issue 9963)
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"} if wandb else {}
    extra = ["--wandb-project", "dsllm-test", "--wandb-run-name", "tiny"] if wandb else []
    launcher = deepspeed_launch(signal_args(tmp_path, extra), env)
    wait_for_step(tmp_path, 3, [launcher])
    out = stop_with(launcher, how)
    tag = (tmp_path / "ck" / "latest").read_text()
    stopped = int(tag.split("_")[1])
    assert 3 <= stopped < SIGNAL_ITERS, out[-3000:]
    assert f"saved checkpoint {tmp_path / 'ck' / tag} (preemption)" in out, out[-3000:]
    assert "rank 0: exit code 3" in out and "rank 1: exit code 3" in out, out[-3000:]
    assert "killed by signal" not in out and "exited unexpectedly" not in out
    assert max(train_losses(metrics(tmp_path))) == stopped  # the step the signal arrived in was finished, no more
    rerun = launch(2, MAIN, *signal_args(tmp_path, extra), env=env).stdout
    assert f"at iteration {stopped}" in rerun
    got = train_losses(metrics(tmp_path))
    assert [got[s] for s in range(1, SIGNAL_ITERS + 1)] == [uninterrupted[s] for s in range(1, SIGNAL_ITERS + 1)]
    if wandb:
        files = sorted(glob.glob(str(tmp_path / "logs" / "wandb" / "offline-run-*" / "run-*.wandb")))
        assert len(files) == 2, files  # one per session, from rank 0 only
        logged = [step for f in files for step, values in wandb_files.history(f).items() if "train/loss" in values]
        assert sorted(logged) == list(range(1, SIGNAL_ITERS + 1))  # every step exactly once across the sessions
        values = {}
        for f in files:
            values.update(wandb_files.history(f))
        assert all(values[s]["train/loss"] == pytest.approx(got[s]) for s in got)
        assert f"re-sent steps 1-{stopped}" in rerun  # the killed service had kept none of them
        evals = [r for r in metrics(tmp_path) if "val_loss" in r]
        assert evals and all(values[r["step"]]["eval/val_loss"] == pytest.approx(r["val_loss"]) for r in evals)
        meta = json.loads((tmp_path / "ck" / f"iter_{SIGNAL_ITERS:07d}" / "meta.json").read_text())
        ids = set().union(*(wandb_files.run_ids(f) for f in files))
        assert ids == {meta["run_config"]["wandb_run_id"]}  # one W&B run, its id kept with the checkpoint
        config = wandb_files.config(files[-1])
        assert config["model_config"]["hidden_size"] == 64 and config["dp"] == 2


def test_sigkill_during_a_preemption_save_leaves_latest_complete_and_the_rerun_exact(uninterrupted, tmp_path):
    """Slurm's KillWait (or a launcher's grace) shorter than the save: SIGTERM to every process, SIGKILL 3 s later
    while every rank's file is written and the tag not yet complete. `latest` still names the interval save."""
    args = [a if a != "1000" else "2" for a in signal_args(tmp_path)]  # --save-interval 2
    launcher = deepspeed_launch(args, env={"PRETRAIN_SLOW_SAVE": "3:60"})
    wait_for_step(tmp_path, 3, [launcher])
    everyone = [psutil.Process(launcher.pid)] + psutil.Process(launcher.pid).children(recursive=True)
    for p in everyone:
        p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(everyone, timeout=3)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    out = launcher.communicate(timeout=30)[0]
    assert alive and "saved checkpoint" not in out.split("iter_0000002 (interval)")[-1], out[-3000:]
    assert (tmp_path / "ck" / "latest").read_text() == "iter_0000002"
    partial = [d.name for d in (tmp_path / "ck").iterdir() if d.name.startswith("iter_") and d.name != "iter_0000002"]
    assert partial and not any((tmp_path / "ck" / d / "complete").exists() for d in partial)  # killed mid-save
    rerun = launch(2, MAIN, *args).stdout
    assert "at iteration 2" in rerun
    got = train_losses(metrics(tmp_path))
    assert [got[s] for s in range(1, SIGNAL_ITERS + 1)] == [uninterrupted[s] for s in range(1, SIGNAL_ITERS + 1)]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_a_dead_or_stuck_rank_ends_the_job_naming_it(tiny_data, tmp_path, sig):
    """A killed rank, or a stopped one (how a stuck GPU or node looks), ends its peers within
    --dist-timeout-minutes plus a minute, with exit code 6 and a message naming the rank that does not answer."""
    procs = spawn_ranks(2, ["--deepspeed_config", "ds_configs/zero3.json", "--train-iters", "500",
                            "--dist-timeout-minutes", "0.25", *common(tiny_data, tmp_path)])
    try:
        wait_for_step(tmp_path, 2, procs)
        procs[1].send_signal(sig)
        t0 = time.time()
        code = procs[0].wait(timeout=180)
        elapsed = time.time() - t0
        out = procs[0].stdout.read()
    finally:
        procs[1].kill()
    assert code == 6, out[-3000:]
    assert elapsed < 15 + 60, elapsed
    assert "a collective failed in step" in out and "not answering (stuck, dead or much slower): rank 1 on" in out
