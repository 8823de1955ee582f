"""pretrain/metrics.py's sinks: Weights & Biases (offline here) gets the scalars metrics.jsonl gets, from rank 0 only,
as one W&B run across a preemption and the resumed run; wandb is optional, and asking for it without it installed
says how to install it."""
import glob
import json
import signal

import pytest

import wandb_files
from conftest import MAIN, common, launch, metrics, spawn_ranks, train_losses, wait_for_step


def test_asking_for_wandb_without_it_installed_says_how(hide_package, capsys):
    from pretrain import main

    hide_package("wandb")
    code = main.main(["--data-path", "nowhere", "--train-iters", "1", "--wandb-project", "p"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install wandb==" in err and "--wandb-project p" in err


@pytest.mark.slow
def test_wandb_offline_is_one_run_across_preemption_and_resume(tiny_data, tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}

    def args(iters):
        return ["--deepspeed_config", "ds_configs/zero3.json", "--fp32", "--train-iters", iters, "--save",
                tmp_path / "ck", "--save-interval", "1000", "--wandb-project", "dsllm-test", "--wandb-run-name",
                "tiny", *common(tiny_data, tmp_path)]

    procs = spawn_ranks(2, args(500), env=env)
    wait_for_step(tmp_path, 3, procs)
    procs[0].send_signal(signal.SIGTERM)
    assert [p.wait(timeout=120) for p in procs] == [3, 3]
    stopped = int((tmp_path / "ck" / "latest").read_text().split("_")[1])
    launch(2, MAIN, *args(stopped + 3), env=env)

    files = sorted(glob.glob(str(tmp_path / "logs" / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2, files  # one per process lifetime, from rank 0 only
    ids = set().union(*(wandb_files.run_ids(f) for f in files))
    meta = json.loads((tmp_path / "ck" / f"iter_{stopped + 3:07d}" / "meta.json").read_text())
    assert ids == {meta["run_config"]["wandb_run_id"]}  # one W&B run, its id kept with the checkpoint
    logged = {}
    for f in files:
        for step, values in wandb_files.history(f).items():
            logged.setdefault(step, {}).update(values)
    want = train_losses(metrics(tmp_path))
    assert sorted(s for s in logged if "train/loss" in logged[s]) == sorted(want) == list(range(1, stopped + 4))
    assert all(logged[s]["train/loss"] == pytest.approx(want[s]) for s in want)
    evals = [r for r in metrics(tmp_path) if "val_loss" in r]
    assert evals and all(logged[r["step"]]["eval/val_loss"] == pytest.approx(r["val_loss"]) for r in evals)
    config = wandb_files.config(files[-1])
    assert config["model_config"]["hidden_size"] == 64 and config["dp"] == 2
