"""pretrain/main.py end to end on 1-2 CPU ranks: every ds_config, metrics, eval, non-finite steps, exact resume,
preemption signals, a killed rank."""
import math
import signal
import time

import pytest
import torch

from conftest import MAIN, common, launch, metrics, spawn_ranks, train_losses, wait_for_step

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------- configs, metrics
@pytest.fixture(scope="module")
def zero3_run(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    proc = launch(2, MAIN, "--deepspeed_config", "ds_configs/zero3.json", "--train-iters", "8", "--peak-tflops", "1.0",
                  "--save", tmp / "ckpt", "--save-interval", "4", "--plot", "--sample-prompt", "the model",
                  "--sample-tokens", "5", *common(tiny_data, tmp))
    return tmp, proc.stdout


@pytest.mark.parametrize("config, extra", [("zero2.json", []), ("zero3_offload.json", []),
                                           ("zero1_pp.json", ["--pp", "2"])])
def test_short_run_per_ds_config(tiny_data, tmp_path, config, extra):
    launch(2, MAIN, "--deepspeed_config", f"ds_configs/{config}", "--train-iters", "4", "--save", tmp_path / "ck",
           *extra, *common(tiny_data, tmp_path))
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
    assert "3 consecutive non-finite steps" in out
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


@pytest.mark.parametrize("sig", [signal.SIGTERM])  # SIGUSR1: tests/slurm/test_slurm.py, through scancel
def test_preemption_signal_saves_and_exits_then_resumes(tiny_data, tmp_path, sig):
    def args(iters):
        return ["--deepspeed_config", "ds_configs/zero3.json", "--train-iters", iters, "--save", tmp_path / "ck",
                "--save-interval", "1000", *common(tiny_data, tmp_path)]

    procs = spawn_ranks(2, args(500))
    wait_for_step(tmp_path, 3, procs)
    procs[1].send_signal(sig)  # one rank is enough: all agree to stop at the same step
    t0 = time.time()
    codes = [p.wait(timeout=120) for p in procs]
    out = procs[0].stdout.read()
    assert codes == [3, 3], out[-3000:]
    assert time.time() - t0 < 60
    tag = (tmp_path / "ck" / "latest").read_text()
    step = int(tag.split("_")[1])
    assert step >= 3 and f"saved checkpoint {tmp_path / 'ck' / tag} (preemption)" in out
    out = launch(2, MAIN, *args(step + 2)).stdout
    assert f"at iteration {step}" in out and max(train_losses(metrics(tmp_path))) == step + 2


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
